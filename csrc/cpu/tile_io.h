// The CPU loops' 16-bit loads and stores, a tile at a time, through conversion instructions where
// the CPU has them. dtype.h's conversions are integer code (float -> bf16 ~11 vector ops per 16
// values; fp16 both ways more), paid per element per tensor. The instructions round as dtype.h
// does for every input but a few (each compared over all 2^32 floats / 2^16 halves, throwaway
// checks), and a tile holding one of those goes through dtype.h instead, so every tier gives the
// same bits and the same as the CUDA backend:
//   vcvtneps2bf16 (AVX512-BF16), float -> bf16: flushes subnormal inputs to zero;
//   vcvtps2ph (F16C), float -> fp16: keeps NaN payloads where dtype.h (and torch) give 0x7e00;
//   vcvtph2ps (F16C), fp16 -> float: quiets signaling NaNs, which dtype.h keeps.
#pragma once

#include <cstdint>

#include "cpu/parallel.h"
#include "fusedopt/dtype.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fusedopt {
namespace cpu {

// Elements per tile: the loops compute a tile into float buffers, then store it with one call
// per buffer. Measured on AdamW with bf16 p, m, v (one thread, 64K elements in L2, Zen 4,
// throwaway harness): 256 elements 0.47 ns per param, 64 elements 0.52, element by element 0.65.
constexpr int kTile = 256;

inline void store_bf16_portable(uint16_t* dst, const float* src, int n) {
  for (int k = 0; k < n; ++k) dst[k] = from_float<bf16_t>(src[k]).bits;
}
inline void store_fp16_portable(uint16_t* dst, const float* src, int n) {
  for (int k = 0; k < n; ++k) dst[k] = from_float<fp16_t>(src[k]).bits;
}
inline void load_fp16_portable(float* dst, const uint16_t* src, int n) {
  for (int k = 0; k < n; ++k) dst[k] = to_float(fp16_t{src[k]});
}

#if defined(__x86_64__)
inline bool has_avx512_bf16() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}
inline bool has_f16c() {
  static const bool yes = has_avx2_fma() && __builtin_cpu_supports("f16c");
  return yes;
}

template <bool kDaz>
__attribute__((target(FUSEDOPT_TARGET_AVX512 ",avx512bf16"), always_inline)) inline void store_bf16_avx512bf16_impl(
    uint16_t* dst, const float* src, int n) {
  __mmask16 subnormal = 0;
  for (int k = 0; k < n; k += 16) {
    const __mmask16 lanes = n - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - k)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(lanes, src + k);
    _mm256_mask_storeu_epi16(dst + k, lanes, (__m256i)_mm512_cvtneps_pbh(x));
    if (kDaz) {
      // Under MXCSR.DAZ (torch.set_flush_denormal) vfpclassps sees a subnormal as zero: test the
      // bits, |x| - 1 < 0x7fffff (masked-off lanes, 0, wrap high). Two ops more per 16 values.
      const __m512i magnitude = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff));
      subnormal |= _mm512_cmplt_epu32_mask(_mm512_sub_epi32(magnitude, _mm512_set1_epi32(1)),
                                           _mm512_set1_epi32(0x7fffff));
    } else {
      subnormal |= _mm512_fpclass_ps_mask(x, 0x20);
    }
  }
  if (__builtin_expect(subnormal != 0, 0)) store_bf16_portable(dst, src, n);
}

// Not inlined, as the F16C ones below: the tiers' loops are compiled without these extensions;
// one call per tile.
__attribute__((target(FUSEDOPT_TARGET_AVX512 ",avx512bf16"), noinline)) inline void store_bf16_avx512bf16(
    uint16_t* dst, const float* src, int n) {
  if (t_mxcsr_daz) return store_bf16_avx512bf16_impl<true>(dst, src, n);
  store_bf16_avx512bf16_impl<false>(dst, src, n);
}

__attribute__((target(FUSEDOPT_TARGET_AVX2 ",f16c"), noinline)) inline void store_fp16_f16c(uint16_t* dst,
                                                                                         const float* src, int n) {
  int nan = 0, k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 x = _mm256_loadu_ps(src + k);
    nan |= _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  if (__builtin_expect(nan != 0, 0)) k = 0;
  store_fp16_portable(dst + k, src + k, n - k);
}

__attribute__((target(FUSEDOPT_TARGET_AVX2 ",f16c"), noinline)) inline void load_fp16_f16c(float* dst,
                                                                                        const uint16_t* src, int n) {
  int nan = 0, k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
    const __m128i magnitude = _mm_and_si128(h, _mm_set1_epi16(0x7fff));
    nan |= _mm_movemask_epi8(_mm_cmpgt_epi16(magnitude, _mm_set1_epi16(0x7c00)));
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(h));
  }
  if (__builtin_expect(nan != 0, 0)) k = 0;
  load_fp16_portable(dst + k, src + k, n - k);
}
#endif

template <Isa I>
FUSEDOPT_CPU_KERNEL inline void store_tile(bf16_t* dst, const float* src, int n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#if defined(__x86_64__)
  if (I == Isa::kAvx512 && has_avx512_bf16()) return store_bf16_avx512bf16(d, src, n);
#endif
  store_bf16_portable(d, src, n);
}

template <Isa I>
FUSEDOPT_CPU_KERNEL inline void store_tile(fp16_t* dst, const float* src, int n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#if defined(__x86_64__)
  if (I != Isa::kBaseline && has_f16c()) return store_fp16_f16c(d, src, n);
#endif
  store_fp16_portable(d, src, n);
}

template <Isa I>
FUSEDOPT_CPU_KERNEL inline void load_tile(float* dst, const fp16_t* src, int n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#if defined(__x86_64__)
  if (I != Isa::kBaseline && has_f16c()) return load_fp16_f16c(dst, s, n);
#endif
  load_fp16_portable(dst, s, n);
}

// One input of a loop over the tile [i0, i0 + n): get(ptr, i, k) is element i = i0 + k of ptr.
// fp32 and bf16 (a shift) are read where they lie; fp16 is converted into a buffer first. The
// tiles take the loop's own __restrict__ pointers at each access rather than keeping copies.
template <typename T, Isa I>
struct InTile {
  FUSEDOPT_CPU_KERNEL InTile(const T* /*ptr*/, int64_t /*i0*/, int /*n*/) {}
  FUSEDOPT_CPU_KERNEL float get(const T* ptr, int64_t i, int /*k*/) const { return load_float(ptr, i); }
};

template <Isa I>
struct InTile<fp16_t, I> {
  alignas(64) float buf[kTile];
  FUSEDOPT_CPU_KERNEL InTile(const fp16_t* ptr, int64_t i0, int n) { load_tile<I>(buf, ptr + i0, n); }
  FUSEDOPT_CPU_KERNEL float get(const fp16_t* /*ptr*/, int64_t /*i*/, int k) const { return buf[k]; }
};

// One output of a loop over a tile: put(ptr, i, k, x) sets element i = i0 + k, flush(ptr, i0, n)
// stores the tile. fp32 is stored as it is put; bf16 and fp16 are buffered for store_tile.
template <typename T, Isa I>
struct OutTile {
  FUSEDOPT_CPU_KERNEL void put(T* ptr, int64_t i, int /*k*/, float x) { store_float(ptr, i, x); }
  FUSEDOPT_CPU_KERNEL void flush(T* /*ptr*/, int64_t /*i0*/, int /*n*/) {}
};

template <typename T, Isa I>
struct BufferedOutTile {
  alignas(64) float buf[kTile];  // left uninitialized: put() writes what flush() reads
  FUSEDOPT_CPU_KERNEL void put(T* /*ptr*/, int64_t /*i*/, int k, float x) { buf[k] = x; }
  FUSEDOPT_CPU_KERNEL void flush(T* ptr, int64_t i0, int n) { store_tile<I>(ptr + i0, buf, n); }
};
template <Isa I>
struct OutTile<bf16_t, I> : BufferedOutTile<bf16_t, I> {};
template <Isa I>
struct OutTile<fp16_t, I> : BufferedOutTile<fp16_t, I> {};

}  // namespace cpu
}  // namespace fusedopt
