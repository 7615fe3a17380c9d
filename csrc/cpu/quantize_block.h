// Quantizing one block on the CPU with math/quant8.h's rounding: a loop the compiler vectorizes,
// the table lookups becoming AVX2 gathers (three per element).
#pragma once

#include <cstdint>

#include "cpu/parallel.h"
#include "fusedopt/math/quant8.h"

namespace fusedopt {
namespace cpu {

// codes[k] = math::quantize(q, x[k], inv) for k < len <= kQuantBlock.
FUSEDOPT_CPU_KERNEL inline void quantize_block(const math::QuantMap& q, const float* __restrict__ x, int len,
                                               float inv, uint8_t* __restrict__ codes) {
  for (int k = 0; k < len; ++k) {
    const float y = math::clamp_to_map(q.values, x[k] * inv);
    codes[k] = uint8_t(math::keep_sign(q.zero_code, x[k], math::nearest_code(q, y)));
  }
}

}  // namespace cpu
}  // namespace fusedopt
