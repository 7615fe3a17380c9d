// Lion on the CPU: math/lion.h applied over chunked OpenMP work items, a tile at a time
// (cpu/tile_io.h); with an 8-bit momentum, math::Lion8bitRule through cpu/blockwise8bit.h.
#include <algorithm>

#include "cpu/blockwise8bit.h"
#include "cpu/parallel.h"
#include "cpu/tile_io.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/math/lion.h"
#include "fusedopt/math/lion8bit.h"
#include "ops.h"

namespace fusedopt {
namespace {

template <typename P, typename G, typename S, bool UseMaster, cpu::Isa I>
FUSEDOPT_CPU_KERNEL inline void lion_loop(const TensorLists& l, int32_t t, int64_t begin, int64_t end,
                                          const math::LionScalars& s) {
  P* __restrict__ p = reinterpret_cast<P*>(l.ptrs[kParam][t]);
  const G* __restrict__ g = reinterpret_cast<const G*>(l.ptrs[kGrad][t]);
  S* __restrict__ m = reinterpret_cast<S*>(l.ptrs[kExpAvg][t]);
  float* __restrict__ master = reinterpret_cast<float*>(l.ptr(kMaster, t));
  for (int64_t i0 = begin; i0 < end; i0 += cpu::kTile) {
    const int n = int(std::min<int64_t>(cpu::kTile, end - i0));
    const cpu::InTile<P, I> pi(p, i0, UseMaster ? 0 : n);
    const cpu::InTile<G, I> gi(g, i0, n);
    const cpu::InTile<S, I> mi(m, i0, n);
    cpu::OutTile<P, I> po;
    cpu::OutTile<S, I> mo;
    for (int k = 0; k < n; ++k) {
      const int64_t i = i0 + k;
      float pf = UseMaster ? master[i] : pi.get(p, i, k);
      float mf = mi.get(m, i, k);
      math::lion_update(pf, gi.get(g, i, k), mf, s);
      if (UseMaster) master[i] = pf;
      po.put(p, i, k, pf);
      mo.put(m, i, k, mf);
    }
    po.flush(p, i0, n);
    mo.flush(m, i0, n);
  }
}

}  // namespace

void lion_step_cpu(const LionLaunch& L) {
  const HostScalars h = read_host_scalars(L.device_ptrs, L.lr);
  if (h.skip) return;
  const math::LionScalars s = math::lion_scalars(L.config, h.lr, h.grad_scale);
  const bool master = L.dtypes.param != DType::kFloat32 && !L.lists.ptrs[kMaster].empty();
  dispatch_param_grad_state(L.dtypes.param, L.dtypes.grad, L.dtypes.state, [&](auto p_tag, auto g_tag, auto s_tag) {
    dispatch_bool(master, [&](auto mst) {
      using P = decltype(p_tag);
      using G = decltype(g_tag);
      using S = decltype(s_tag);
      cpu::parallel_over_chunks(L.lists.numels, L.num_threads, [&](const cpu::WorkItem& w, auto isa) FUSEDOPT_CPU_KERNEL {
        lion_loop<P, G, S, decltype(mst)::value, decltype(isa)::value>(L.lists, w.tensor, w.begin, w.end, s);
      });
    });
  });
}

void lion8bit_step_cpu(const Lion8bitLaunch& L) {
  const HostScalars h = read_host_scalars(L.device_ptrs, L.lr);
  if (h.skip) return;
  const math::Lion8bitRule rule{L.config};
  const std::vector<math::LionScalars> scalars(L.lists.size(), rule.scalars(h.lr, 0.0f, h.grad_scale));
  const math::QuantMap* maps[1] = {reinterpret_cast<const math::QuantMap*>(L.signed_map)};
  cpu::blockwise8bit_step<math::Lion8bitRule>(L.lists, L.dtypes, maps, scalars, L.num_threads);
}

}  // namespace fusedopt
