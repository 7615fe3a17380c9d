// Blockwise 8-bit optimizers on the CPU: a Rule of math/adam8bit.h or math/lion8bit.h over OpenMP
// work items. A work item is a chunk of cpu::kChunkSize elements, a whole number of quantization
// blocks, so one thread owns each block: its absmax is a plain serial max and results do not
// depend on the thread count.
//
// Per block: dequantize every moment, Rule::update each element (param, master, grad in their
// dtypes) and take the block's new absmax per moment, then requantize (cpu/quantize_block.h).
// The AVX-512 tier with the gather quantizer runs these steps of three blocks interleaved
// (blockwise8bit_loop_overlapped); the others, block after block (blockwise8bit_loop).
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

// One tensor's pointers, and the steps of a block that both loops below share.
template <typename Rule, typename P, typename G, bool UseMaster, bool Common, Isa I>
struct Block8bit {
  static constexpr int K = Rule::kMoments;
  static constexpr int B = math::kQuantBlock;
  P* __restrict__ p;
  const G* __restrict__ g;
  float* __restrict__ master;
  uint8_t* codes[K];
  float* absmax[K];
  int64_t numel;

  FUSEDOPT_CPU_KERNEL Block8bit(const TensorLists& l, int32_t t)
      : p(reinterpret_cast<P*>(l.ptrs[kParam][t])),
        g(reinterpret_cast<const G*>(l.ptrs[kGrad][t])),
        master(reinterpret_cast<float*>(l.ptr(kMaster, t))),
        numel(l.numels[t]) {
    for (int j = 0; j < K; ++j) {
      codes[j] = reinterpret_cast<uint8_t*>(l.ptrs[moment_code_slot(j)][t]);
      absmax[j] = reinterpret_cast<float*>(l.ptrs[moment_absmax_slot(j)][t]);
    }
  }

  // The hardware prefetchers stop at every 4 KiB page (4 blocks of fp32 p, 16 of codes) and the
  // loop is compute-bound: without this, a 16M-param AdamW8bit step took 20% longer per param than
  // a 1M one on 2 Sapphire Rapids cores (bench/results/xeon_avx512_amx/before_f53f55c/).
  FUSEDOPT_CPU_KERNEL void prefetch(int64_t b0) const {
    auto lines = [](const void* ptr, int bytes) FUSEDOPT_CPU_KERNEL {
      for (int o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(ptr) + o);
    };
    if (const int64_t f = b0 + kPrefetchBlocks * B; f < numel) {
      if (UseMaster) lines(master + f, B * int(sizeof(float)));
      lines(p + f, B * int(sizeof(P)));
      lines(g + f, B * int(sizeof(G)));
      for (int j = 0; j < K; ++j) lines(codes[j] + f, B);
    }
  }

  FUSEDOPT_CPU_KERNEL void dequantize(const math::QuantMap* const* maps, int64_t b0, int len, float (&m)[K][B]) const {
    for (int j = 0; j < K; ++j) dequantize_block<I>(*maps[j], codes[j] + b0, len, absmax[j][b0 / B], m[j]);
  }

  // Rule::update on elements [k0, k1) of the block at b0, its moments in m; the block's absmax
  // per moment is taken as they are written (a second pass would reload every moment for a max
  // the update loop gets for one op per register).
  // The max goes to amax_bits[j][0] (L = 1: over a whole block) or to amax_bits[j][k - k0]
  // (L = k1 - k0: a few registers' worth per call, where one scalar max would be reduced across
  // the vector at every call).
  template <int L>
  FUSEDOPT_CPU_KERNEL void update(int64_t b0, int k0, int k1, const InTile<P, I>& pi, const InTile<G, I>& gi,
                                  OutTile<P, I>& po, float (&m)[K][B], uint32_t (&amax_bits)[K][L],
                                  const typename Rule::Scalars& s) const {
    // p, g, master and the block's moments (a local buffer) overlap at most element for element (a
    // grad that is its param): without this GCC checks at run time, ~20 scalar instructions per 16
    // elements in the overlapped loop.
#pragma GCC ivdep
    for (int k = k0; k < k1; ++k) {
      const int64_t i = b0 + k;
      float pf = UseMaster ? master[i] : pi.get(p, i, k);
      float mf[K];
      for (int j = 0; j < K; ++j) mf[j] = m[j][k];
      Rule::template update<Common>(pf, gi.get(g, i, k), mf, s);
      if (UseMaster) master[i] = pf;
      po.put(p, i, k, pf);
      for (int j = 0; j < K; ++j) {
        m[j][k] = mf[j];
        uint32_t& a = amax_bits[j][L == 1 ? 0 : k - k0];
        a = std::max(a, float_bits(mf[j]) & 0x7fffffffu);  // as block_absmax
      }
    }
  }

  // Stores the block's new absmax per moment (the rules keep moments finite), and its inverse in inv.
  template <int L>
  FUSEDOPT_CPU_KERNEL void finish_absmax(int64_t b0, const uint32_t (&amax_bits)[K][L], float (&inv)[K]) const {
    for (int j = 0; j < K; ++j) {
      uint32_t bits = 0;
      for (int k = 0; k < L; ++k) bits = std::max(bits, amax_bits[j][k]);
      const float amax = bits_float(bits);
      absmax[j][b0 / B] = amax;
      inv[j] = math::inv_absmax(amax);
    }
  }
};

// The blocks of [begin, end) one after another: dequantize, update, requantize.
template <typename Rule, typename P, typename G, bool UseMaster, bool Common, Isa I>
FUSEDOPT_CPU_KERNEL inline void blockwise8bit_loop(const TensorLists& l, const math::QuantMap* const* maps, int32_t t,
                                                   int64_t begin, int64_t end, const typename Rule::Scalars& s) {
  using Blk = Block8bit<Rule, P, G, UseMaster, Common, I>;
  constexpr int K = Blk::K, B = Blk::B;
  const Blk blk(l, t);
  float m[K][B];  // the block's updated moments, between update and requantize
  for (int64_t b0 = begin; b0 < end; b0 += B) {
    const int len = int(std::min<int64_t>(B, end - b0));
    blk.prefetch(b0);
    blk.dequantize(maps, b0, len, m);
    uint32_t amax_bits[K][1] = {};
    const InTile<P, I> pi(blk.p, b0, UseMaster ? 0 : len);
    const InTile<G, I> gi(blk.g, b0, len);
    OutTile<P, I> po;
    blk.update(b0, 0, len, pi, gi, po, m, amax_bits, s);
    po.flush(blk.p, b0, len);
    float inv[K];
    blk.finish_absmax(b0, amax_bits, inv);
    for (int j = 0; j < K; ++j) quantize_block<I>(*maps[j], m[j], len, inv[j], blk.codes[j] + b0);
  }
}

#if defined(__x86_64__)
// GCC 12's AVX-512 headers warn at -O3 about their own _mm512_undefined_* sources (as in
// cpu/quantize_avx512.h).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// blockwise8bit_loop for the AVX-512 tier with the gather quantizer, blocks in a pipeline: each
// kStep elements of block n's update are followed, in the same loop body, by the requantization
// of the same kStep elements of block n - 1, so the out-of-order core runs the update's divides
// and square roots (a unit of their own, ~22 cycles per 16 elements on the Sapphire Rapids below,
// in a throwaway microbenchmark) beside the quantizer's gathers and integer work instead of after
// them. Block n + 1 is dequantized as block n starts
// (interleaving that too, 64 codes per 64 elements updated, measured 2-7% slower).
// The same ops on the same values: the codes are bitwise those of blockwise8bit_loop.
// Measured (1M params, 1 thread, Sapphire Rapids, ns per param, the old loop's build alternated
// with it in one throwaway timing script):
// AdamW8bit fp32 1.16-1.19 against 1.31-1.32, bf16 1.20-1.21 against 1.31-1.34; Lion8bit fp32
// 0.77-0.78 against 0.79-0.82, bf16 0.78-0.80 against 0.87-0.88. A real call (not inlined): its
// intrinsics need the AVX-512 target.
template <typename Rule, typename P, typename G, bool UseMaster, bool Common>
__attribute__((target(FUSEDOPT_TARGET_AVX512 ",prefer-vector-width=512"), noinline)) void blockwise8bit_loop_overlapped(
    const TensorLists& l, const math::QuantMap* const* maps, int32_t t, int64_t begin, int64_t end,
    const typename Rule::Scalars& s) {
  constexpr Isa I = Isa::kAvx512;
  using Blk = Block8bit<Rule, P, G, UseMaster, Common, I>;
  constexpr int K = Blk::K, B = Blk::B;
  // Elements per iteration: 16 fp32 fill a register; for 16-bit params or grads GCC vectorizes 16
  // elements as two 8-lane halves, and 32 let it use whole registers (1M bf16 params, 1 thread:
  // 1.22 ns per param against 1.38-1.42 at 16).
  constexpr int kStep = sizeof(P) == 2 || sizeof(G) == 2 ? 32 : 16;
  const Blk blk(l, t);
  const int64_t blocks = (end - begin) / B, full_end = begin + blocks * B;
  // Three blocks in flight, each in its buffer m[n % 3]: n + 1 dequantized, n updated, n - 1
  // requantized.
  float m[3][K][B];
  __m512 prev_inv[K];
  GatherQuantizer quantizer[K];
  for (int j = 0; j < K; ++j) quantizer[j] = gather_quantizer(*maps[j]);
  if (blocks > 0) blk.dequantize(maps, begin, B, m[0]);
  for (int64_t n = 0; n < blocks; ++n) {
    const int64_t b0 = begin + n * B;
    float (&cur)[K][B] = m[n % 3];
    float (&next)[K][B] = m[(n + 1) % 3];
    float (&prev)[K][B] = m[(n + 2) % 3];
    blk.prefetch(b0);
    if (n + 1 < blocks) blk.dequantize(maps, b0 + B, B, next);
    uint32_t amax_bits[K][kStep] = {};
    const InTile<P, I> pi(blk.p, b0, UseMaster ? 0 : B);
    const InTile<G, I> gi(blk.g, b0, B);
    OutTile<P, I> po;
    for (int k0 = 0; k0 < B; k0 += kStep) {
      blk.update(b0, k0, k0 + kStep, pi, gi, po, cur, amax_bits, s);
      if (n > 0) {
        for (int k = k0; k < k0 + kStep; k += 16) {
          for (int j = 0; j < K; ++j) {
            quantize16_store_avx512(quantizer[j], prev[j] + k, prev_inv[j], blk.codes[j] + b0 - B + k);
          }
        }
      }
    }
    po.flush(blk.p, b0, B);
    float inv[K];
    blk.finish_absmax(b0, amax_bits, inv);
    for (int j = 0; j < K; ++j) prev_inv[j] = _mm512_set1_ps(inv[j]);
  }
  if (blocks > 0) {
    const float (&last)[K][B] = m[(blocks - 1) % 3];
    for (int j = 0; j < K; ++j) {
      for (int k0 = 0; k0 < B; k0 += 16) {
        quantize16_store_avx512(quantizer[j], last[j] + k0, prev_inv[j], blk.codes[j] + full_end - B + k0);
      }
    }
  }
  // A tensor's last, partial block.
  if (full_end < end) blockwise8bit_loop<Rule, P, G, UseMaster, Common, I>(l, maps, t, full_end, end, s);
}
#pragma GCC diagnostic pop
#endif

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
            constexpr bool kMaster = decltype(mst)::value, kCommon = decltype(cmn)::value;
#if defined(__x86_64__)
            if constexpr (decltype(isa)::value == Isa::kAvx512) {
              if (!use_byte_permute_quantizer()) {
                return blockwise8bit_loop_overlapped<Rule, P, G, kMaster, kCommon>(lists, maps, w.tensor, w.begin,
                                                                                   w.end, scalars[w.tensor]);
              }
            }
#endif
            blockwise8bit_loop<Rule, P, G, kMaster, kCommon, decltype(isa)::value>(lists, maps, w.tensor, w.begin,
                                                                                   w.end, scalars[w.tensor]);
          });
        });
      });
    });
  });
}

}  // namespace cpu
}  // namespace fusedopt
