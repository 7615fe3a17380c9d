// Storage types and float conversions shared by both backends.
//
// 16-bit values are stored as raw bits and converted with integer code (round to nearest even),
// not with compiler intrinsics: the CPU and CUDA backends then round identically by construction.
#pragma once

#include <cstdint>
#include <cstring>

#include "fusedopt/macros.h"

namespace fusedopt {

// Mirrored in python/fusedopt/_ops.py (DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

FUSEDOPT_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FUSEDOPT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

FUSEDOPT_HD float to_float(float x) { return x; }
FUSEDOPT_HD float to_float(bf16_t x) { return bits_float(uint32_t(x.bits) << 16); }

// IEEE half -> float, exact for every input (subnormals renormalized, NaN payload kept).
FUSEDOPT_HD float to_float(fp16_t x) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (uint32_t(x.bits) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (exp == shifted_exp) {  // inf / nan
    o += (128u - 16u) << 23;
  } else if (exp == 0) {  // zero / subnormal: renormalize through a float subtraction
    o += 1u << 23;
    o = float_bits(bits_float(o) - bits_float(113u << 23));
  }
  return bits_float(o | ((uint32_t(x.bits) & 0x8000u) << 16));
}

template <typename T> FUSEDOPT_HD T from_float(float x);

template <> FUSEDOPT_HD float from_float<float>(float x) { return x; }

template <> FUSEDOPT_HD bf16_t from_float<bf16_t>(float x) {
  uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x0040u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}

template <> FUSEDOPT_HD fp16_t from_float<fp16_t>(float x) {
  uint32_t f = float_bits(x);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint32_t o;
  if (f >= ((127u + 16u) << 23)) {  // overflows to inf, or inf/nan
    o = f > (255u << 23) ? 0x7e00u : 0x7c00u;
  } else if (f < (113u << 23)) {  // half subnormal or zero: let the FPU round at 2^-24 spacing
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    o = float_bits(bits_float(f) + bits_float(magic)) - magic;
  } else {
    const uint32_t mant_odd = (f >> 13) & 1u;
    f += ((15u - 127u) << 23) + 0xfffu + mant_odd;
    o = f >> 13;
  }
  return fp16_t{uint16_t(o | (sign >> 16))};
}

}  // namespace fusedopt
