// Muon's elementwise parts on the CPU (math/muon.h): the momentum step fused with the per-matrix
// norm and the bf16 cast of the Newton-Schulz input, and the update with decoupled weight decay.
// Two passes for prepare (the norm sits between them); the sums are reduced per matrix in chunk
// order, so the result does not depend on the thread count.
#include <vector>

#include "cpu/parallel.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/math/muon.h"
#include "ops.h"

namespace fusedopt {
namespace {

// The sum of squares runs in kSumLanes accumulators (element i into lane (i - begin) % kSumLanes),
// added in lane order at the end: one serial chain of double adds was latency-bound at about 4
// cycles per element (a third of a Muon step on a Sapphire-Rapids-class core), while independent
// lanes vectorize. The order is fixed by the code, so every instruction set gives the same bits.
constexpr int kSumLanes = 16;

template <typename S, typename G>
FUSEDOPT_CPU_KERNEL inline double momentum_pass(const TensorLists& l, const cpu::WorkItem& w, const math::MuonScalars& s) {
  const G* __restrict__ g = reinterpret_cast<const G*>(l.ptrs[kGrad][w.tensor]);
  S* __restrict__ buf = reinterpret_cast<S*>(l.ptrs[kMuonBuffer][w.tensor]);
  // in double: no underflow of u^2 at |u| = 1e-22, no overflow at 1e30
  double lane[kSumLanes] = {};
  auto step = [&](int64_t i) FUSEDOPT_CPU_KERNEL {
    float bf = load_float(buf, i);
    const float u = math::muon_momentum<S>(load_float(g, i), bf, s);
    store_float(buf, i, bf);
    return double(u) * double(u);
  };
  int64_t i = w.begin;
  for (; i + kSumLanes <= w.end; i += kSumLanes) {
    for (int k = 0; k < kSumLanes; ++k) lane[k] += step(i + k);
  }
  for (int k = 0; i < w.end; ++i, ++k) lane[k] += step(i);
  double sum = 0.0;
  for (int k = 0; k < kSumLanes; ++k) sum += lane[k];
  return sum;
}

template <typename S, typename G>
FUSEDOPT_CPU_KERNEL inline void cast_pass(const TensorLists& l, const cpu::WorkItem& w, const math::MuonScalars& s,
                                          float divisor) {
  const G* __restrict__ g = reinterpret_cast<const G*>(l.ptrs[kGrad][w.tensor]);
  const S* __restrict__ buf = reinterpret_cast<const S*>(l.ptrs[kMuonBuffer][w.tensor]);
  bf16_t* __restrict__ out = reinterpret_cast<bf16_t*>(l.ptrs[kMuonOut][w.tensor]);
  for (int64_t i = w.begin; i < w.end; ++i) {
    store_float(out, i, math::muon_update_direction<S>(load_float(g, i), load_float(buf, i), s) / divisor);
  }
}

}  // namespace

void muon_prepare_cpu(const MuonPrepareLaunch& L) {
  const HostScalars h = read_host_scalars(L.device_ptrs, 0.0);
  if (h.skip) return;
  const math::MuonScalars s = math::muon_scalars(L.momentum, L.nesterov, h.grad_scale);
  const size_t n = L.lists.size();
  // one partial sum per (tensor, chunk), at offset[t] + chunk
  std::vector<int64_t> offset(n + 1, 0);
  for (size_t t = 0; t < n; ++t) offset[t + 1] = offset[t] + (L.lists.numels[t] + cpu::kChunkSize - 1) / cpu::kChunkSize;
  std::vector<double> partial(static_cast<size_t>(offset[n]), 0.0);
  std::vector<float> divisor(n);
  dispatch_float(L.dtypes.state, "momentum buffer", [&](auto s_tag) {
    dispatch_float(L.dtypes.grad, "grad", [&](auto g_tag) {
      using S = decltype(s_tag);
      using G = decltype(g_tag);
      cpu::parallel_over_chunks(L.lists.numels, L.num_threads, [&](const cpu::WorkItem& w) FUSEDOPT_CPU_KERNEL {
        partial[size_t(offset[w.tensor] + w.begin / cpu::kChunkSize)] = momentum_pass<S, G>(L.lists, w, s);
      });
      for (size_t t = 0; t < n; ++t) {
        double sum = 0.0;
        for (int64_t c = offset[t]; c < offset[t + 1]; ++c) sum += partial[size_t(c)];
        divisor[t] = math::muon_divisor(sum, L.safety, L.eps);
      }
      cpu::parallel_over_chunks(L.lists.numels, L.num_threads, [&](const cpu::WorkItem& w) FUSEDOPT_CPU_KERNEL {
        cast_pass<S, G>(L.lists, w, s, divisor[w.tensor]);
      });
    });
  });
}

void muon_apply_cpu(const MuonApplyLaunch& L) {
  const HostScalars h = read_host_scalars(L.device_ptrs, L.lr);
  if (h.skip) return;
  const float decay = float(1.0 - h.lr * L.weight_decay);
  const float neg_lr_scaled = float(-h.lr * L.lr_factor);
  dispatch_float(L.dtypes.param, "param", [&](auto p_tag) {
    using P = decltype(p_tag);
    cpu::parallel_over_chunks(L.lists.numels, L.num_threads, [&](const cpu::WorkItem& w) FUSEDOPT_CPU_KERNEL {
      P* __restrict__ p = reinterpret_cast<P*>(L.lists.ptrs[kParam][w.tensor]);
      const bf16_t* __restrict__ o = reinterpret_cast<const bf16_t*>(L.lists.ptrs[kMuonOut][w.tensor]);
      for (int64_t i = w.begin; i < w.end; ++i) {
        float pf = load_float(p, i);
        math::muon_apply<P>(pf, load_float(o, i), decay, neg_lr_scaled);
        store_float(p, i, pf);
      }
    });
  });
}

}  // namespace fusedopt
