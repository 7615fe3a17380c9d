// Blockwise 8-bit optimizers on the CPU: a Rule of math/adam8bit.h or math/lion8bit.h over OpenMP
// work items. A work item is a chunk of cpu::kChunkSize elements, a whole number of quantization
// blocks, so one thread owns each block: its absmax is a plain serial max and results do not
// depend on the thread count.
//
// Per block: dequantize every moment, Rule::update each element (param, master, grad in their
// dtypes) and take the block's new absmax per moment, then requantize (cpu/quantize_block.h).
#pragma once

#include <algorithm>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/quantize_block.h"
#include "cpu/tile_io.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/math/quant8.h"
#include "fusedopt/tensor_list.h"

namespace fusedopt {
namespace cpu {

static_assert(kChunkSize % math::kQuantBlock == 0, "a CPU work item must hold whole quantization blocks");
static_assert(math::kQuantBlock <= kTile, "a block's params are stored as one tile");

constexpr int64_t kPrefetchBlocks = 4;

template <typename Rule, typename P, typename G, bool UseMaster, bool Common, Isa I>
FUSEDOPT_CPU_KERNEL inline void blockwise8bit_loop(const TensorLists& l, const math::QuantMap* const* maps, int32_t t,
                                                   int64_t begin, int64_t end, const typename Rule::Scalars& s) {
  constexpr int K = Rule::kMoments;
  constexpr int B = math::kQuantBlock;
  P* __restrict__ p = reinterpret_cast<P*>(l.ptrs[kParam][t]);
  const G* __restrict__ g = reinterpret_cast<const G*>(l.ptrs[kGrad][t]);
  float* __restrict__ master = reinterpret_cast<float*>(l.ptr(kMaster, t));
  uint8_t* codes[K];
  float* absmax[K];
  for (int j = 0; j < K; ++j) {
    codes[j] = reinterpret_cast<uint8_t*>(l.ptrs[moment_code_slot(j)][t]);
    absmax[j] = reinterpret_cast<float*>(l.ptrs[moment_absmax_slot(j)][t]);
  }
  // The hardware prefetchers stop at every 4 KiB page (4 blocks of fp32 p, 16 of codes) and the
  // loop is compute-bound: without this, a 16M-param AdamW8bit step took 20% longer per param than
  // a 1M one on 2 Sapphire Rapids cores (bench/results/xeon_avx512_amx/before_f53f55c/).
  const int64_t numel = l.numels[t];
  auto prefetch_lines = [](const void* ptr, int bytes) FUSEDOPT_CPU_KERNEL {
    for (int o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(ptr) + o);
  };
  float m[K][B];  // the block's updated moments, between update and requantize
  for (int64_t b0 = begin; b0 < end; b0 += B) {
    const int64_t b = b0 / B;
    const int len = int(std::min<int64_t>(B, end - b0));
    if (const int64_t f = b0 + kPrefetchBlocks * B; f < numel) {
      if (UseMaster) prefetch_lines(master + f, B * int(sizeof(float)));
      prefetch_lines(p + f, B * int(sizeof(P)));
      prefetch_lines(g + f, B * int(sizeof(G)));
      for (int j = 0; j < K; ++j) prefetch_lines(codes[j] + f, B);
    }
    for (int j = 0; j < K; ++j) {
      dequantize_block<I>(*maps[j], codes[j] + b0, len, absmax[j][b], m[j]);
    }
    // The block's absmax per moment, taken as the moments are written: a second pass would
    // reload every moment for a max the update loop gets for one op per register.
    uint32_t amax_bits[K] = {};
    const InTile<P, I> pi(p, b0, UseMaster ? 0 : len);
    const InTile<G, I> gi(g, b0, len);
    OutTile<P, I> po;
    for (int k = 0; k < len; ++k) {
      const int64_t i = b0 + k;
      float pf = UseMaster ? master[i] : pi.get(p, i, k);
      float mf[K];
      for (int j = 0; j < K; ++j) mf[j] = m[j][k];
      Rule::template update<Common>(pf, gi.get(g, i, k), mf, s);
      if (UseMaster) master[i] = pf;
      po.put(p, i, k, pf);
      for (int j = 0; j < K; ++j) {
        m[j][k] = mf[j];
        amax_bits[j] = std::max(amax_bits[j], float_bits(mf[j]) & 0x7fffffffu);  // as block_absmax
      }
    }
    po.flush(p, b0, len);
    for (int j = 0; j < K; ++j) {
      const float amax = bits_float(amax_bits[j]);  // the rules keep moments finite
      absmax[j][b] = amax;
      quantize_block<I>(*maps[j], m[j], len, math::inv_absmax(amax), codes[j] + b0);
    }
  }
}

// One step of Rule over every tensor of `lists`; scalars[t] are tensor t's (Adam's depend on its
// step count).
template <typename Rule>
void blockwise8bit_step(const TensorLists& lists, const DTypes& dtypes, const math::QuantMap* const* maps,
                        const std::vector<typename Rule::Scalars>& scalars, int num_threads) {
  const bool master = dtypes.param != DType::kFloat32 && !lists.ptrs[kMaster].empty();
  // Rule::common reads flags of the launch's one config: the same for every tensor.
  const bool common = !scalars.empty() && Rule::common(scalars[0]);
  dispatch_float(dtypes.param, "param", [&](auto p_tag) {
    dispatch_float(dtypes.grad, "grad", [&](auto g_tag) {
      dispatch_bool(master, [&](auto mst) {
        dispatch_bool(common, [&](auto cmn) {
          using P = decltype(p_tag);
          using G = decltype(g_tag);
          parallel_over_chunks(lists.numels, num_threads, [&](const WorkItem& w, auto isa) FUSEDOPT_CPU_KERNEL {
            blockwise8bit_loop<Rule, P, G, decltype(mst)::value, decltype(cmn)::value, decltype(isa)::value>(
                lists, maps, w.tensor, w.begin, w.end, scalars[w.tensor]);
          });
        });
      });
    });
  });
}

}  // namespace cpu
}  // namespace fusedopt
