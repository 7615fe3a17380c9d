// Dequantizing and quantizing one block on the CPU with math/quant8.h's rounding: the scalar loops
// (the baseline tier, and every tier's tail), cpu/quantize_avx2.h's intrinsics in the AVX2 tier and
// cpu/quantize_avx512.h's in the AVX-512 tier.
#pragma once

#include <cstdint>

#include "cpu/parallel.h"
#include "cpu/quantize_avx2.h"
#include "cpu/quantize_avx512.h"
#include "fusedopt/math/quant8.h"

namespace fusedopt {
namespace cpu {

// max |x[k]| for k < len over finite x: finite |x| order as their bits do, and an integer max
// vectorizes where a float one (NaN rules) stays scalar.
FUSEDOPT_CPU_KERNEL inline float block_absmax(const float* __restrict__ x, int len) {
  uint32_t amax_bits = 0;
  for (int k = 0; k < len; ++k) {
    const uint32_t bits = float_bits(x[k]) & 0x7fffffffu;
    amax_bits = amax_bits > bits ? amax_bits : bits;
  }
  return bits_float(amax_bits);
}

// out[k] = q.values[codes[k]] * absmax for k < len. (An AVX-512 CPU without VBMI dequantizes
// with the AVX2 tier's code.)
template <Isa I>
FUSEDOPT_CPU_KERNEL inline void dequantize_block(const math::QuantMap& q, const uint8_t* __restrict__ codes, int len,
                                                 float absmax, float* __restrict__ out) {
  int k = 0;
#if defined(__x86_64__)
  if constexpr (I == Isa::kAvx2) k = dequantize_block_avx2(q.values, codes, len, absmax, out);
  if constexpr (I == Isa::kAvx512) {
    k = has_avx512_vbmi() ? dequantize_block_avx512_vbmi(q, codes, len, absmax, out)
                          : dequantize_block_avx2(q.values, codes, len, absmax, out);
  }
#endif
  for (; k < len; ++k) out[k] = math::dequantize(q.values, codes[k], absmax);
}

// codes[k] = math::quantize(q, x[k], inv) for k < len <= kQuantBlock.
template <Isa I>
FUSEDOPT_CPU_KERNEL inline void quantize_block(const math::QuantMap& q, const float* __restrict__ x, int len,
                                               float inv, uint8_t* __restrict__ codes) {
  int k = 0;
#if defined(__x86_64__)
  if constexpr (I == Isa::kAvx2) k = quantize_block_avx2(q, x, len, inv, codes);
  if constexpr (I == Isa::kAvx512) {
    k = q.coarse.ok && use_byte_permute_quantizer() ? quantize_block_avx512_vbmi(q, x, len, inv, codes)
                                                    : quantize_block_avx512(q, x, len, inv, codes);
  }
#endif
  for (; k < len; ++k) codes[k] = math::quantize(q, x[k], inv);
}

}  // namespace cpu
}  // namespace fusedopt
