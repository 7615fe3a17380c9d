// Blockwise 8-bit Adam/AdamW on the CPU: math/adam8bit.h over OpenMP work items. A work item is a
// chunk of cpu::kChunkSize elements, a whole number of quantization blocks, so one thread owns
// each block: its absmax is a plain serial max and results do not depend on the thread count.
#include <algorithm>

#include "cpu/parallel.h"
#include "cpu/quantize_block.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/math/adam8bit.h"
#include "ops.h"

namespace fusedopt {
namespace {

using math::kQuantBlock;
static_assert(cpu::kChunkSize % kQuantBlock == 0, "a CPU work item must hold whole quantization blocks");

template <typename P, typename G, bool UseMaster>
FUSEDOPT_HD void adam8bit_loop(const TensorLists& l, int32_t t, int64_t begin, int64_t end, const float* smap,
                               const float* umap, const math::AdamScalars& s) {
  P* __restrict__ p = reinterpret_cast<P*>(l.ptrs[kParam][t]);
  const G* __restrict__ g = reinterpret_cast<const G*>(l.ptrs[kGrad][t]);
  uint8_t* __restrict__ cm = reinterpret_cast<uint8_t*>(l.ptrs[kExpAvg][t]);
  uint8_t* __restrict__ cv = reinterpret_cast<uint8_t*>(l.ptrs[kExpAvgSq][t]);
  float* __restrict__ am = reinterpret_cast<float*>(l.ptrs[kExpAvgAbsmax][t]);
  float* __restrict__ av = reinterpret_cast<float*>(l.ptrs[kExpAvgSqAbsmax][t]);
  float* __restrict__ master = reinterpret_cast<float*>(l.ptr(kMaster, t));
  float m[kQuantBlock], v[kQuantBlock];  // the block's updated moments, between update and requantize
  for (int64_t b0 = begin; b0 < end; b0 += kQuantBlock) {
    const int64_t b = b0 / kQuantBlock;
    const int len = int(std::min<int64_t>(kQuantBlock, end - b0));
    const float old_am = am[b], old_av = av[b];
    float new_am = 0.0f, new_av = 0.0f;
    for (int k = 0; k < len; ++k) {
      const int64_t i = b0 + k;
      float pf = UseMaster ? master[i] : load_float(p, i);
      float mf = math::dequantize(smap, cm[i], old_am);
      float vf = math::dequantize(umap, cv[i], old_av);
      math::adam8bit_update(pf, load_float(g, i), mf, vf, s);
      if (UseMaster) master[i] = pf;
      store_float(p, i, pf);
      m[k] = mf;
      v[k] = vf;
      new_am = math::max_of(new_am, fabsf(mf));
      new_av = math::max_of(new_av, vf);
    }
    am[b] = new_am;
    av[b] = new_av;
    cpu::quantize_block(smap, m, len, math::inv_absmax(am[b]), cm + b0);
    cpu::quantize_block(umap, v, len, math::inv_absmax(av[b]), cv + b0);
  }
}

}  // namespace

void adam8bit_step_cpu(const Adam8bitLaunch& L) {
  const HostScalars h = read_host_scalars(L.device_ptrs, L.lr);
  if (h.skip) return;

  const size_t n = L.lists.size();
  std::vector<math::AdamScalars> scalars(n);
  for (size_t t = 0; t < n; ++t) {
    float* step = reinterpret_cast<float*>(L.lists.steps[t]);
    *step += 1.0f;
    scalars[t] = math::adam_scalars(L.config, h.lr, double(*step), h.grad_scale);
  }
  const float* smap = reinterpret_cast<const float*>(L.signed_map);
  const float* umap = reinterpret_cast<const float*>(L.unsigned_map);
  const bool master = L.dtypes.param != DType::kFloat32 && !L.lists.ptrs[kMaster].empty();
  dispatch_float(L.dtypes.param, "param", [&](auto p_tag) {
    dispatch_float(L.dtypes.grad, "grad", [&](auto g_tag) {
      dispatch_bool(master, [&](auto mst) {
        using P = decltype(p_tag);
        using G = decltype(g_tag);
        cpu::parallel_over_chunks(L.lists.numels, L.num_threads, [&](const cpu::WorkItem& w) FUSEDOPT_CPU_KERNEL {
          adam8bit_loop<P, G, decltype(mst)::value>(L.lists, w.tensor, w.begin, w.end, smap, umap, scalars[w.tensor]);
        });
      });
    });
  });
}

}  // namespace fusedopt
