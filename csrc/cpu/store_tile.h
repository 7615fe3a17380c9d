// The CPU loops' 16-bit stores, a tile at a time. dtype.h's float -> bf16 is integer code (~11
// vector ops per 16 values, three times per element for bf16 p, m, v); with AVX512-BF16 one
// vcvtneps2bf16 per 16 values rounds the same way (round to nearest even, NaN quieted) for every
// input but a denormal, which it flushes to zero (compared over all 2^32 inputs, throwaway check).
// A tile holding a denormal is stored by dtype.h instead, so every tier gives the same bits.
#pragma once

#include <cstdint>

#include "cpu/parallel.h"
#include "fusedopt/dtype.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fusedopt {
namespace cpu {

// Elements per tile: the loops compute a tile into float buffers, then store it. Measured (one
// thread, 64K bf16 p, m, v in L2, Zen 4): 64 to 256 elements 0.45-0.47 ns per param against 0.65
// element by element.
constexpr int kTile = 256;

inline void store_bf16_portable(uint16_t* dst, const float* src, int n) {
  for (int k = 0; k < n; ++k) dst[k] = from_float<bf16_t>(src[k]).bits;
}

#if defined(__x86_64__)
inline bool has_avx512_bf16() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

// Not inlined: the AVX-512 tier's loops are compiled without AVX512-BF16; one call per tile.
__attribute__((target(FUSEDOPT_TARGET_AVX512 ",avx512bf16"), noinline)) inline void store_bf16_avx512bf16(
    uint16_t* dst, const float* src, int n) {
  __mmask16 denormal = 0;
  for (int k = 0; k < n; k += 16) {
    const __mmask16 lanes = n - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - k)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(lanes, src + k);
    denormal |= _mm512_fpclass_ps_mask(x, 0x20);
    _mm256_mask_storeu_epi16(dst + k, lanes, (__m256i)_mm512_cvtneps_pbh(x));
  }
  if (__builtin_expect(denormal != 0, 0)) store_bf16_portable(dst, src, n);
}
#endif

template <Isa I>
FUSEDOPT_CPU_KERNEL inline void store_bf16(uint16_t* dst, const float* src, int n) {
#if defined(__x86_64__)
  if (I == Isa::kAvx512 && has_avx512_bf16()) return store_bf16_avx512bf16(dst, src, n);
#endif
  store_bf16_portable(dst, src, n);
}

// One output of a loop over a tile: put(k, x) sets element k, flush stores the tile. fp32 and fp16
// are stored as they are put (fp16 has no such instruction); bf16 is buffered for store_bf16.
template <typename T>
struct OutTile {
  T* base;
  FUSEDOPT_CPU_KERNEL explicit OutTile(T* b) : base(b) {}
  FUSEDOPT_CPU_KERNEL void put(int64_t i, int /*k*/, float x) { store_float(base, i, x); }
  template <Isa I>
  FUSEDOPT_CPU_KERNEL void flush(int64_t /*i0*/, int /*n*/) {}
};

template <>
struct OutTile<bf16_t> {
  bf16_t* base;
  alignas(64) float buf[kTile];  // left uninitialized: put() writes what flush() reads
  FUSEDOPT_CPU_KERNEL explicit OutTile(bf16_t* b) : base(b) {}
  FUSEDOPT_CPU_KERNEL void put(int64_t /*i*/, int k, float x) { buf[k] = x; }
  template <Isa I>
  FUSEDOPT_CPU_KERNEL void flush(int64_t i0, int n) {
    store_bf16<I>(reinterpret_cast<uint16_t*>(base) + i0, buf, n);
  }
};

}  // namespace cpu
}  // namespace fusedopt
