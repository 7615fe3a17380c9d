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
// Computed for every case and selected, without branches, so the CPU loops vectorize.
FUSEDOPT_HD float to_float(fp16_t x) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  const uint32_t body = (uint32_t(x.bits) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & body;
  const uint32_t normal = body + ((127u - 15u) << 23);
  const uint32_t inf_nan = normal + ((128u - 16u) << 23);
  // zero / subnormal: renormalize through a float subtraction
  const uint32_t subnormal = float_bits(bits_float(normal + (1u << 23)) - bits_float(113u << 23));
  const uint32_t o = exp == shifted_exp ? inf_nan : (exp == 0 ? subnormal : normal);
  return bits_float(o | ((uint32_t(x.bits) & 0x8000u) << 16));
}

template <typename T> FUSEDOPT_HD T from_float(float x);

template <> FUSEDOPT_HD float from_float<float>(float x) { return x; }

template <> FUSEDOPT_HD bf16_t from_float<bf16_t>(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x0040u;
  return bf16_t{uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded)};
}

// Every case is computed and one selected (no branches), so the CPU loop vectorizes.
template <> FUSEDOPT_HD fp16_t from_float<fp16_t>(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t f = u ^ sign;
  // overflows to inf, or inf/nan
  const uint32_t special = f > (255u << 23) ? 0x7e00u : 0x7c00u;
  // half subnormal or zero: let the FPU round at 2^-24 spacing
  const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t subnormal = float_bits(bits_float(f) + bits_float(magic)) - magic;
  // normal: rebias the exponent, round the mantissa to nearest even
  const uint32_t normal = (f + ((15u - 127u) << 23) + 0xfffu + ((f >> 13) & 1u)) >> 13;
  const uint32_t o = f >= ((127u + 16u) << 23) ? special : (f < (113u << 23) ? subnormal : normal);
  return fp16_t{uint16_t(o | (sign >> 16))};
}

// Element i of a buffer as float, and back. 16-bit buffers are read as raw uint16_t (not as the
// wrapper structs) so the CPU loops vectorize.
FUSEDOPT_HD float load_float(const float* p, int64_t i) { return p[i]; }
FUSEDOPT_HD float load_float(const bf16_t* p, int64_t i) { return to_float(bf16_t{reinterpret_cast<const uint16_t*>(p)[i]}); }
FUSEDOPT_HD float load_float(const fp16_t* p, int64_t i) { return to_float(fp16_t{reinterpret_cast<const uint16_t*>(p)[i]}); }
FUSEDOPT_HD void store_float(float* p, int64_t i, float x) { p[i] = x; }
FUSEDOPT_HD void store_float(bf16_t* p, int64_t i, float x) { reinterpret_cast<uint16_t*>(p)[i] = from_float<bf16_t>(x).bits; }
FUSEDOPT_HD void store_float(fp16_t* p, int64_t i, float x) { reinterpret_cast<uint16_t*>(p)[i] = from_float<fp16_t>(x).bits; }

}  // namespace fusedopt
