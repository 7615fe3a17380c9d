// Floats as int32 keys in the same order, for the 8-bit quantizer's tables (math/quant8.h,
// math/quant8_coarse.h): their builders bisect over keys ("the smallest y with ..."), and the
// byte-permute quantizer compares keys' bytes.
#pragma once

#include <cstdint>

#include "fusedopt/dtype.h"
#include "fusedopt/macros.h"

namespace fusedopt {
namespace math {

// Increasing in y over all non-NaN floats (-0 just below +0): the sign bit, then the magnitude's
// bits, reversed for negative y.
FUSEDOPT_HD int32_t order_key(float y) {
  const uint32_t bits = float_bits(y);
  return int32_t(bits ^ ((bits >> 31) != 0 ? 0x7fffffffu : 0u));
}

FUSEDOPT_HD float from_order_key(int32_t k) {
  const uint32_t u = uint32_t(k);
  return bits_float((u >> 31) != 0 ? u ^ 0x7fffffffu : u);
}

// Host: the smallest key in [a, z] whose float satisfies reached, which is false and then true
// over increasing keys and true at z.
template <typename Reached>
int32_t first_key_where(int32_t a, int32_t z, Reached reached) {
  while (a < z) {
    const int32_t mid = int32_t(a + (int64_t(z) - a) / 2);
    if (reached(from_order_key(mid))) z = mid; else a = mid + 1;
  }
  return z;
}

}  // namespace math
}  // namespace fusedopt
