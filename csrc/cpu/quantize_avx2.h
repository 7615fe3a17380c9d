// math/quant8.h's dequantize and quantize for 8 floats at a time in AVX2 intrinsics. GCC's
// vectorization of the scalar loops took 3.6 ns per quantized element on one Zen 3 core (its
// table lookups went through the stack lane by lane); written out, a code is one table lookup and
// a dozen integer ops (1.3 ns). Every operation below is the scalar one of math/quant8.h lane by
// lane, so the results are bitwise those of the baseline loop (tests/test_cpu_isa.py checks).
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>

#include "cpu/parallel.h"
#include "fusedopt/math/quant8.h"

namespace fusedopt {
namespace cpu {

#define FUSEDOPT_AVX2_INLINE __attribute__((target(FUSEDOPT_TARGET_AVX2), always_inline)) inline
// The block entry points are real calls (one per block): a function without the AVX2 target
// cannot inline one with it, even when it is itself inlined into an AVX2 caller later.
#define FUSEDOPT_AVX2_CALL __attribute__((target(FUSEDOPT_TARGET_AVX2))) inline

// Table lookups as scalar loads: on Zen 3 vpgatherdd/vgatherdps take 0.77 ns per element where
// these take 0.48-0.51 (measured in isolation), and Intel parts with the GDS microcode fix gather
// slower still.
FUSEDOPT_AVX2_INLINE __m256i gather8_avx2(const uint32_t* table, __m256i idx) {
  const __m128i lo = _mm256_castsi256_si128(idx), hi = _mm256_extracti128_si256(idx, 1);
  const uint64_t a = uint64_t(_mm_cvtsi128_si64(lo)), b = uint64_t(_mm_extract_epi64(lo, 1));
  const uint64_t c = uint64_t(_mm_cvtsi128_si64(hi)), d = uint64_t(_mm_extract_epi64(hi, 1));
  return _mm256_setr_epi32(int(table[uint32_t(a)]), int(table[a >> 32]), int(table[uint32_t(b)]), int(table[b >> 32]),
                           int(table[uint32_t(c)]), int(table[c >> 32]), int(table[uint32_t(d)]), int(table[d >> 32]));
}

// out[k] = values[codes[k]] * absmax for k < 8.
FUSEDOPT_AVX2_INLINE void dequantize8_avx2(const float* values, const uint8_t* codes, __m256 absmax, float* out) {
  uint64_t w;
  __builtin_memcpy(&w, codes, sizeof(w));
  const __m256 v = _mm256_setr_ps(values[w & 0xff], values[(w >> 8) & 0xff], values[(w >> 16) & 0xff],
                                  values[(w >> 24) & 0xff], values[(w >> 32) & 0xff], values[(w >> 40) & 0xff],
                                  values[(w >> 48) & 0xff], values[w >> 56]);
  _mm256_storeu_ps(out, _mm256_mul_ps(v, absmax));
}

// The codes (as int32 lanes) of 8 moments x in a block whose 1 / absmax is inv: math::quantize.
// kZeroAtBottom: q.zero_code == 0, which picks math::zero_forced's comparison.
template <bool kZeroAtBottom>
FUSEDOPT_AVX2_INLINE __m256i quantize8_avx2(const math::QuantMap& q, __m256 x, __m256 inv) {
  using namespace math;
  const __m256i low_mask = _mm256_set1_epi32(int(kSearchLowMask));
  __m256 y = _mm256_mul_ps(x, inv);
  // clamp_to_map: maxps returns its second operand for NaN and minps its second for equal zeros,
  // as the selects do.
  y = _mm256_max_ps(y, _mm256_set1_ps(q.values[0]));
  y = _mm256_min_ps(_mm256_set1_ps(q.values[kQuantMapSize - 1]), y);
  const __m256i bits = _mm256_castps_si256(y);
  // search_bucket
  const __m256i abs_bits = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  const __m256i u = _mm256_max_epi32(
      _mm256_sub_epi32(_mm256_srli_epi32(abs_bits, kSearchLowBits),
                       _mm256_set1_epi32(int(kSearchExponentBias << kSearchMantissaBits))),
      _mm256_setzero_si256());
  const __m256i sign = _mm256_srai_epi32(bits, 31);
  const __m256i bucket = _mm256_add_epi32(_mm256_set1_epi32(kSearchBucketsPerSign), _mm256_xor_si256(u, sign));
  // table_code: (bucket word + search_key) >> 16
  const __m256i e = gather8_avx2(q.bucket, bucket);
  const __m256i key = _mm256_and_si256(_mm256_xor_si256(bits, sign), low_mask);
  const __m256i c = _mm256_srli_epi32(_mm256_add_epi32(e, key), kSearchLowBits);
  // zero_forced: !(x > 0) (unordered: NaN too) where the zero code is the lowest, else x == 0
  const __m256 forced = _mm256_cmp_ps(x, _mm256_setzero_ps(), kZeroAtBottom ? _CMP_NGT_UQ : _CMP_EQ_OQ);
  return _mm256_blendv_epi8(c, _mm256_set1_epi32(q.zero_code), _mm256_castps_si256(forced));
}

// codes[k] = math::quantize(q, x[k], inv) for k < 32.
template <bool kZeroAtBottom>
FUSEDOPT_AVX2_INLINE void quantize32_avx2(const math::QuantMap& q, const float* x, __m256 inv, uint8_t* codes) {
  const __m256i c0 = quantize8_avx2<kZeroAtBottom>(q, _mm256_loadu_ps(x), inv);
  const __m256i c1 = quantize8_avx2<kZeroAtBottom>(q, _mm256_loadu_ps(x + 8), inv);
  const __m256i c2 = quantize8_avx2<kZeroAtBottom>(q, _mm256_loadu_ps(x + 16), inv);
  const __m256i c3 = quantize8_avx2<kZeroAtBottom>(q, _mm256_loadu_ps(x + 24), inv);
  // The packs interleave 128-bit lanes: bytes come out as 4-element groups 0,2,4,6,1,3,5,7.
  const __m256i packed = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
  const __m256i ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), ordered);
}

// dequantize8_avx2 over the first len - len % 8 elements; returns how many it did.
FUSEDOPT_AVX2_CALL int dequantize_block_avx2(const float* values, const uint8_t* codes, int len, float absmax,
                                             float* out) {
  const __m256 scale = _mm256_set1_ps(absmax);
  int k = 0;
  for (; k + 8 <= len; k += 8) dequantize8_avx2(values, codes + k, scale, out + k);
  return k;
}

// quantize32_avx2 over the first len - len % 32 elements; returns how many it did.
FUSEDOPT_AVX2_CALL int quantize_block_avx2(const math::QuantMap& q, const float* x, int len, float inv,
                                           uint8_t* codes) {
  const __m256 inv8 = _mm256_set1_ps(inv);
  int k = 0;
  if (q.zero_code == 0) {
    for (; k + 32 <= len; k += 32) quantize32_avx2<true>(q, x + k, inv8, codes + k);
  } else {
    for (; k + 32 <= len; k += 32) quantize32_avx2<false>(q, x + k, inv8, codes + k);
  }
  return k;
}

}  // namespace cpu
}  // namespace fusedopt

#endif  // __x86_64__
