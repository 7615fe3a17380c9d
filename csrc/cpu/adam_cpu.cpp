// Adam/AdamW on the CPU: math/adam.h applied over chunked OpenMP work items, a tile at a time
// (cpu/tile_io.h: 16-bit values are converted per tile).
#include <algorithm>
#include <stdexcept>

#include "cpu/parallel.h"
#include "cpu/tile_io.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/math/adam.h"
#include "ops.h"

namespace fusedopt {
namespace {

using math::AdamScalars;

// Common: math::adam_is_common; the rest reads the flags.
template <typename P, typename G, typename S, bool Amsgrad, bool UseMaster, bool Common, cpu::Isa I>
FUSEDOPT_CPU_KERNEL inline void adam_loop(const TensorLists& l, int32_t t, int64_t begin, int64_t end,
                                          const AdamScalars& s) {
  P* __restrict__ p = reinterpret_cast<P*>(l.ptrs[kParam][t]);
  const G* __restrict__ g = reinterpret_cast<const G*>(l.ptrs[kGrad][t]);
  S* __restrict__ m = reinterpret_cast<S*>(l.ptrs[kExpAvg][t]);
  S* __restrict__ v = reinterpret_cast<S*>(l.ptrs[kExpAvgSq][t]);
  S* __restrict__ vm = reinterpret_cast<S*>(l.ptr(kMaxExpAvgSq, t));
  float* __restrict__ master = reinterpret_cast<float*>(l.ptr(kMaster, t));
  for (int64_t i0 = begin; i0 < end; i0 += cpu::kTile) {
    const int n = int(std::min<int64_t>(cpu::kTile, end - i0));
    const cpu::InTile<P, I> pi(p, i0, UseMaster ? 0 : n);
    const cpu::InTile<G, I> gi(g, i0, n);
    const cpu::InTile<S, I> mi(m, i0, n), vi(v, i0, n), vmi(vm, i0, Amsgrad ? n : 0);
    cpu::OutTile<P, I> po;
    cpu::OutTile<S, I> mo, vo, vmo;
    for (int k = 0; k < n; ++k) {
      const int64_t i = i0 + k;
      float pf = UseMaster ? master[i] : pi.get(p, i, k);
      float mf = mi.get(m, i, k);
      float vf = vi.get(v, i, k);
      float vmf = Amsgrad ? vmi.get(vm, i, k) : 0.0f;
      math::adam_update_known<Amsgrad, Common>(pf, gi.get(g, i, k), mf, vf, vmf, s);
      if (UseMaster) master[i] = pf;
      po.put(p, i, k, pf);
      mo.put(m, i, k, mf);
      vo.put(v, i, k, vf);
      if (Amsgrad) vmo.put(vm, i, k, vmf);
    }
    po.flush(p, i0, n);
    mo.flush(m, i0, n);
    vo.flush(v, i0, n);
    if (Amsgrad) vmo.flush(vm, i0, n);
  }
}

}  // namespace

void adam_step_cpu(const AdamLaunch& L) {
  const HostScalars h = read_host_scalars(L.device_ptrs, L.lr);
  if (h.skip) return;

  const size_t n = L.lists.size();
  std::vector<AdamScalars> scalars(n);
  for (size_t t = 0; t < n; ++t) {
    float* step = reinterpret_cast<float*>(L.lists.steps[t]);
    *step += 1.0f;
    scalars[t] = math::adam_scalars(L.config, h.lr, double(*step), h.grad_scale);
  }
  const bool master = L.dtypes.param != DType::kFloat32 && !L.lists.ptrs[kMaster].empty();
  const bool common = n > 0 && math::adam_is_common(scalars[0]);
  dispatch_param_grad_state(L.dtypes.param, L.dtypes.grad, L.dtypes.state, [&](auto p_tag, auto g_tag, auto s_tag) {
    dispatch_bool(L.amsgrad, [&](auto ams) {
      dispatch_bool(master, [&](auto mst) {
        dispatch_bool(common, [&](auto cmn) {
          using P = decltype(p_tag);
          using G = decltype(g_tag);
          using S = decltype(s_tag);
          cpu::parallel_over_chunks(L.lists.numels, L.num_threads,
                                    [&](const cpu::WorkItem& w, auto isa) FUSEDOPT_CPU_KERNEL {
            adam_loop<P, G, S, decltype(ams)::value, decltype(mst)::value, decltype(cmn)::value, decltype(isa)::value>(
                L.lists, w.tensor, w.begin, w.end, scalars[w.tensor]);
          });
        });
      });
    });
  });
}

}  // namespace fusedopt
