// Dequantizing and quantizing one block on the CPU with math/quant8.h's rounding: the scalar loops
// (the baseline tier, and every tier's tail), and cpu/quantize_avx2.h's intrinsics where the tier
// has AVX2.
#pragma once

#include <cstdint>

#include "cpu/parallel.h"
#include "cpu/quantize_avx2.h"
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

// out[k] = values[codes[k]] * absmax for k < len.
template <Isa I>
FUSEDOPT_CPU_KERNEL inline void dequantize_block(const float* __restrict__ values, const uint8_t* __restrict__ codes,
                                                 int len, float absmax, float* __restrict__ out) {
  int k = 0;
#if defined(__x86_64__)
  if constexpr (I != Isa::kBaseline) k = dequantize_block_avx2(values, codes, len, absmax, out);
#endif
  for (; k < len; ++k) out[k] = math::dequantize(values, codes[k], absmax);
}

// codes[k] = math::quantize(q, x[k], inv) for k < len <= kQuantBlock.
template <Isa I>
FUSEDOPT_CPU_KERNEL inline void quantize_block(const math::QuantMap& q, const float* __restrict__ x, int len,
                                               float inv, uint8_t* __restrict__ codes) {
  int k = 0;
#if defined(__x86_64__)
  if constexpr (I != Isa::kBaseline) k = quantize_block_avx2(q, x, len, inv, codes);
#endif
  for (; k < len; ++k) codes[k] = math::quantize(q, x[k], inv);
}

}  // namespace cpu
}  // namespace fusedopt
