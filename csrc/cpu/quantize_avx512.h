// math/quant8.h's quantize and dequantize (with VBMI) in AVX-512 intrinsics, for the AVX-512
// tier. The quantizer's table lookup is one vpgatherdd where AVX2 moves each lane through a
// general register; with VBMI, and a map whose coarse table was built (q.coarse.ok), byte
// permutes search math/quant8_coarse.h's table from registers instead, computing its
// coarse_bucket and coarse_code lane by lane. Either way the codes and values are bitwise those
// of the baseline loop (tests/test_cpu_isa.py and tests/test_quant.py check).
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>

#include "cpu/parallel.h"
#include "fusedopt/math/quant8.h"

// GCC 12 builds the unmasked AVX-512 intrinsics on an _mm512_undefined_* source and then warns,
// at -O3, that it "may be used uninitialized" (hundreds of lines per file, all in its headers).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace fusedopt {
namespace cpu {

#define FUSEDOPT_AVX512_INLINE __attribute__((target(FUSEDOPT_TARGET_AVX512), always_inline)) inline
// Real calls, one per block, for the reason given in cpu/quantize_avx2.h.
#define FUSEDOPT_AVX512_CALL __attribute__((target(FUSEDOPT_TARGET_AVX512))) inline

// math::clamp_to_map(values, x * inv) for a map whose lowest and highest values are lo and hi:
// maxps returns its second operand for NaN and minps its second for equal zeros, as the selects do.
FUSEDOPT_AVX512_INLINE __m512 clamped_y_avx512(__m512 lo, __m512 hi, __m512 x, __m512 inv) {
  return _mm512_min_ps(hi, _mm512_max_ps(_mm512_mul_ps(x, inv), lo));
}

FUSEDOPT_AVX512_INLINE __m512 clamped_y_avx512(const math::QuantMap& q, __m512 x, __m512 inv) {
  return clamped_y_avx512(_mm512_set1_ps(q.values[0]), _mm512_set1_ps(q.values[math::kQuantMapSize - 1]), x, inv);
}

// math::zero_forced: !(x > 0) (unordered: NaN too) where the zero code is the lowest, else x == 0.
template <bool kZeroAtBottom>
FUSEDOPT_AVX512_INLINE __mmask16 zero_forced_avx512(__m512 x) {
  return _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), kZeroAtBottom ? _CMP_NGT_UQ : _CMP_EQ_OQ);
}

// What the gather quantizer reads of a map, in registers and locals: loaded once per block or
// loop, since every uint8_t code store may alias the map as far as the compiler knows.
struct GatherQuantizer {
  __m512 lo, hi;   // the map's lowest and highest value
  __m512i zero;    // its zero code
  const int* bucket;  // QuantMap::bucket from its middle (kSearchBucketsPerSign)
  bool zero_at_bottom;
};

FUSEDOPT_AVX512_INLINE GatherQuantizer gather_quantizer(const math::QuantMap& q) {
  return {_mm512_set1_ps(q.values[0]), _mm512_set1_ps(q.values[math::kQuantMapSize - 1]),
          _mm512_set1_epi32(q.zero_code), reinterpret_cast<const int*>(q.bucket + math::kSearchBucketsPerSign),
          q.zero_code == 0};
}

// The codes (as int32 lanes) of 16 moments x in a block whose 1 / absmax is inv: math::quantize.
// Fewer vector ops than a lane-by-lane copy of the scalar steps: saturating 16-bit subtraction
// clamps the bucket at 0, and the sign's complement is taken before the shift that extracts it.
// kZeroAtBottom: q.zero_code == 0, which picks math::zero_forced's comparison.
template <bool kZeroAtBottom>
FUSEDOPT_AVX512_INLINE __m512i quantize16_avx512(const GatherQuantizer& q, __m512 x, __m512 inv) {
  using namespace math;
  const __m512i bits = _mm512_castps_si512(clamped_y_avx512(q.lo, q.hi, x, inv));
  const __m512i sign = _mm512_srai_epi32(bits, 31);
  // search_bucket - kSearchBucketsPerSign: magnitude_bucket u in the high half (as |y|'s top 16
  // bits minus the bias, floored at 0), complemented for negative y, shifted down with its sign.
  __m512i u = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff0000));
  u = _mm512_subs_epu16(u, _mm512_set1_epi32(int(kSearchExponentBias << (kSearchMantissaBits + 16))));
  const __m512i bucket = _mm512_srai_epi32(_mm512_xor_si512(u, sign), 16);
  // table_code: (bucket word + search_key) >> 16
  const __m512i e = _mm512_i32gather_epi32(bucket, q.bucket, 4);
  const __m512i key = _mm512_ternarylogic_epi32(bits, sign, _mm512_set1_epi32(int(kSearchLowMask)), 0x28);  // (a^b)&c
  const __m512i c = _mm512_srli_epi32(_mm512_add_epi32(e, key), kSearchLowBits);
  return _mm512_mask_mov_epi32(c, zero_forced_avx512<kZeroAtBottom>(x), q.zero);
}

template <bool kZeroAtBottom>
FUSEDOPT_AVX512_INLINE int quantize_block_avx512_impl(const GatherQuantizer& q, const float* x, int len, float inv,
                                                      uint8_t* codes) {
  const __m512 inv16 = _mm512_set1_ps(inv);
  // The packs work per 128-bit lane: lane L of the bytes holds 4 codes of each of c0..c3, in order.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  int k = 0;
  for (; k + 64 <= len; k += 64) {
    const __m512i c0 = quantize16_avx512<kZeroAtBottom>(q, _mm512_loadu_ps(x + k), inv16);
    const __m512i c1 = quantize16_avx512<kZeroAtBottom>(q, _mm512_loadu_ps(x + k + 16), inv16);
    const __m512i c2 = quantize16_avx512<kZeroAtBottom>(q, _mm512_loadu_ps(x + k + 32), inv16);
    const __m512i c3 = quantize16_avx512<kZeroAtBottom>(q, _mm512_loadu_ps(x + k + 48), inv16);
    const __m512i packed = _mm512_packus_epi16(_mm512_packus_epi32(c0, c1), _mm512_packus_epi32(c2, c3));
    _mm512_storeu_si512(codes + k, _mm512_permutexvar_epi32(order, packed));
  }
  return k;
}

// quantize16_avx512 over the first len - len % 64 elements; returns how many it did.
FUSEDOPT_AVX512_CALL int quantize_block_avx512(const math::QuantMap& q, const float* x, int len, float inv,
                                               uint8_t* codes) {
  const GatherQuantizer g = gather_quantizer(q);
  return g.zero_at_bottom ? quantize_block_avx512_impl<true>(g, x, len, inv, codes)
                          : quantize_block_avx512_impl<false>(g, x, len, inv, codes);
}

// The codes of x[0, 16) stored to codes[0, 16): quantize_block_avx512's, 16 at a time, for
// cpu/blockwise8bit.h's loop that interleaves them with the update.
// (A predictable branch on the map's zero code: a loop keeps each moment's map.)
FUSEDOPT_AVX512_INLINE void quantize16_store_avx512(const GatherQuantizer& q, const float* x, __m512 inv,
                                                    uint8_t* codes) {
  const __m512 v = _mm512_loadu_ps(x);
  const __m512i c = q.zero_at_bottom ? quantize16_avx512<true>(q, v, inv) : quantize16_avx512<false>(q, v, inv);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtepi32_epi8(c));
}

#define FUSEDOPT_AVX512_VBMI_INLINE __attribute__((target(FUSEDOPT_TARGET_AVX512 ",avx512vbmi"), always_inline)) inline

// A 256-byte table in four registers, for lookup256_vbmi.
struct Table256 {
  __m512i part[4];
};

FUSEDOPT_AVX512_VBMI_INLINE Table256 load_table256(const uint8_t* t) {
  return {{_mm512_loadu_si512(t), _mm512_loadu_si512(t + 64), _mm512_loadu_si512(t + 128), _mm512_loadu_si512(t + 192)}};
}

// t[b] for 64 byte lanes b: two 128-entry byte permutes, blended on b's top bit (high).
FUSEDOPT_AVX512_VBMI_INLINE __m512i lookup256_vbmi(const Table256& t, __m512i b, __mmask64 high) {
  return _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(t.part[0], b, t.part[1]),
                                _mm512_permutex2var_epi8(t.part[2], b, t.part[3]));
}

// The same from memory: the quantizer's seven tables do not fit in registers beside its work
// (hoisting them spilled, 4% slower), so each lookup loads its operands.
FUSEDOPT_AVX512_VBMI_INLINE __m512i lookup256_vbmi(const uint8_t* t, __m512i b, __mmask64 high) {
  return lookup256_vbmi(load_table256(t), b, high);
}

// math::quantize through math/quant8_coarse.h's table (q.coarse.ok), 64 elements at a time: the
// bucket as a byte per element, then the bucket's code and thresholds by byte permutes, compared
// with the order keys' bytes (coarse_code) in the same byte order.
template <bool kZeroAtBottom>
FUSEDOPT_AVX512_VBMI_INLINE int quantize_block_avx512_vbmi_impl(const math::QuantMap& q, const float* x, int len,
                                                                float inv, uint8_t* codes) {
  using namespace math;
  const CoarseTable& t = q.coarse;
  const __m512 inv16 = _mm512_set1_ps(inv);
  const __m512i offset0 = _mm512_loadu_si512(t.offset), offset1 = _mm512_loadu_si512(t.offset + 16);
  const __m512i shift0 = _mm512_loadu_si512(t.shift), shift1 = _mm512_loadu_si512(t.shift + 16);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  // packus order (below): byte 16L + 4r + d is register r's lane 4L + d. kKeyByte is that lane's
  // byte 0 within the register pair holding r ((0, 1) or (2, 3): + 64 for odd r), + i its byte i;
  // kFromRegisters23 marks the bytes of r = 2, 3.
  alignas(64) static constexpr uint8_t kKeyByte[64] = {
      0,  4,  8,  12, 64, 68, 72, 76,  0,  4,  8,  12, 64, 68, 72, 76,  16, 20, 24, 28, 80, 84,
      88, 92, 16, 20, 24, 28, 80, 84, 88, 92, 32, 36, 40, 44, 96, 100, 104, 108, 32, 36, 40, 44,
      96, 100, 104, 108, 48, 52, 56, 60, 112, 116, 120, 124, 48, 52, 56, 60, 112, 116, 120, 124};
  const __m512i key_byte = _mm512_load_si512(kKeyByte);
  constexpr __mmask64 kFromRegisters23 = 0xff00ff00ff00ff00ull;
  int k = 0;
  for (; k + 64 <= len; k += 64) {
    __m512i bucket[4], key[4];
    for (int r = 0; r < 4; ++r) {
      const __m512 xr = _mm512_loadu_ps(x + k + 16 * r);
      const __m512i bits = _mm512_castps_si512(clamped_y_avx512(q, xr, inv16));
      // A map whose lowest value is 0 clamps every y to +0 or above (maxps returns its second
      // operand, the map's +0, for y = -0 and NaN): no sign to take apart, 4 ops fewer per 16.
      const __m512i sign = kZeroAtBottom ? _mm512_setzero_si512() : _mm512_srai_epi32(bits, 31);
      // order_key: a ^ (b & c)
      key[r] = kZeroAtBottom ? bits : _mm512_ternarylogic_epi32(bits, sign, _mm512_set1_epi32(0x7fffffff), 0x78);
      // coarse_bucket: the binade floored at 0 (saturating 16-bit subtraction), its offset and
      // shift from 32-entry tables, mirrored for negative y; zero_forced elements to kCoarseForced.
      const __m512i a = kZeroAtBottom ? bits : _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
      const __m512i e = _mm512_subs_epu16(_mm512_srli_epi32(a, 23), _mm512_set1_epi32(kCoarseExponentBase));
      const __m512i mantissa = _mm512_and_si512(a, _mm512_set1_epi32(0x7fffff));
      const __m512i u = _mm512_add_epi32(_mm512_permutex2var_epi32(offset0, e, offset1),
                                         _mm512_srlv_epi32(mantissa, _mm512_permutex2var_epi32(shift0, e, shift1)));
      // u ^ (sign & 0xff)
      const __m512i b = kZeroAtBottom ? u : _mm512_ternarylogic_epi32(u, sign, _mm512_set1_epi32(0xff), 0x78);
      bucket[r] = _mm512_mask_mov_epi32(b, zero_forced_avx512<kZeroAtBottom>(xr), _mm512_set1_epi32(kCoarseForced));
    }
    const __m512i bytes =
        _mm512_packus_epi16(_mm512_packus_epi32(bucket[0], bucket[1]), _mm512_packus_epi32(bucket[2], bucket[3]));
    const __mmask64 high = _mm512_movepi8_mask(bytes);
    __m512i key_plane[3];  // byte i of the 64 keys, in packus order
    for (int i = 0; i < 3; ++i) {
      const __m512i at = _mm512_add_epi8(key_byte, _mm512_set1_epi8(char(i)));
      key_plane[i] = _mm512_mask_blend_epi8(kFromRegisters23, _mm512_permutex2var_epi8(key[0], at, key[1]),
                                            _mm512_permutex2var_epi8(key[2], at, key[3]));
    }
    __m512i c = lookup256_vbmi(t.code, bytes, high);
    for (int j = 0; j < kCoarseChanges; ++j) {
      // low24(key) > threshold, from the lowest byte up: a byte above decides, an equal byte keeps
      // the verdict of the bytes below it
      __mmask64 above = _mm512_cmpgt_epu8_mask(key_plane[0], lookup256_vbmi(t.threshold[j][0], bytes, high));
      for (int i = 1; i < 3; ++i) {
        const __m512i ti = lookup256_vbmi(t.threshold[j][i], bytes, high);
        above = _mm512_cmpgt_epu8_mask(key_plane[i], ti) | _mm512_mask_cmpeq_epi8_mask(above, key_plane[i], ti);
      }
      c = _mm512_mask_sub_epi8(c, above, c, _mm512_set1_epi8(-1));
    }
    _mm512_storeu_si512(codes + k, _mm512_permutexvar_epi32(order, c));
  }
  return k;
}

// quantize_block_avx512 with byte permutes in place of the gather, for a map whose coarse table
// was built (q.coarse.ok).
__attribute__((target(FUSEDOPT_TARGET_AVX512 ",avx512vbmi"))) inline int quantize_block_avx512_vbmi(
    const math::QuantMap& q, const float* x, int len, float inv, uint8_t* codes) {
  return q.zero_code == 0 ? quantize_block_avx512_vbmi_impl<true>(q, x, len, inv, codes)
                          : quantize_block_avx512_vbmi_impl<false>(q, x, len, inv, codes);
}

// out[k] = values[codes[k]] * absmax for the first len - len % 64 elements, with AVX-512 VBMI;
// returns how many it did. Each of a value's 4 bytes comes from its own 256-byte table
// (QuantMap::value_bytes, 4 registers) by two 128-entry byte permutes, and unpacks put the
// bytes together: 64 values in about 30 ops, where a gather is 16 loads per 16.
__attribute__((target(FUSEDOPT_TARGET_AVX512 ",avx512vbmi"))) inline int dequantize_block_avx512_vbmi(
    const math::QuantMap& q, const uint8_t* codes, int len, float absmax, float* out) {
  const __m512 scale = _mm512_set1_ps(absmax);
  Table256 table[4];
  for (int j = 0; j < 4; ++j) table[j] = load_table256(q.value_bytes[j]);
  // The unpacks below put source byte 16L + 4r + d (128-bit lane L) into output register r,
  // lane L, dword d, which is element 16r + 4L + d: the codes are first permuted to match.
  alignas(64) static constexpr uint8_t kOrder[64] = {
      0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
      8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
  const __m512i order = _mm512_load_si512(kOrder);
  int k = 0;
  for (; k + 64 <= len; k += 64) {
    const __m512i c = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(codes + k));
    const __mmask64 high = _mm512_movepi8_mask(c);  // code >= 128
    __m512i b[4];
    for (int j = 0; j < 4; ++j) {
      b[j] = lookup256_vbmi(table[j], c, high);
    }
    const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
    const __m512i v[4] = {_mm512_unpacklo_epi16(lo01, lo23), _mm512_unpackhi_epi16(lo01, lo23),
                          _mm512_unpacklo_epi16(hi01, hi23), _mm512_unpackhi_epi16(hi01, hi23)};
    for (int r = 0; r < 4; ++r) _mm512_storeu_ps(out + k + 16 * r, _mm512_mul_ps(_mm512_castsi512_ps(v[r]), scale));
  }
  return k;
}

}  // namespace cpu
}  // namespace fusedopt

#pragma GCC diagnostic pop

#endif  // __x86_64__
