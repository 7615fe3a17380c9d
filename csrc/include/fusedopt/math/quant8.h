// Blockwise 8-bit quantization: the one definition of code <-> float used by the CPU loops and
// the CUDA kernels (and, through the CPU entry points, by checkpoint conversion in Python).
//
// A tensor is cut into blocks of kQuantBlock consecutive elements (in memory order). A block stores
// one fp32 absmax and one uint8 code per element; the code indexes a 256-entry map of sorted
// values in [-1, 1] (signed) or [0, 1] (unsigned), built by python/fusedopt/quant.py:
//   x ~= map[code] * absmax
// Quantizing rounds x / absmax to the nearest map entry (a tie goes to the smaller entry), except
// that a nonzero x never rounds to 0 or across it (part 3 below). Both maps hold 0 and 1 exactly,
// the signed one -1 too, so a block's largest element and zeros round-trip exactly.
//
// cpu/quantize_avx2.h and cpu/quantize_avx512.h transcribe clamp_to_map, search_bucket,
// search_key, table_code and zero_forced lane by lane in intrinsics (the AVX-512 VBMI quantizer:
// clamp_to_map, zero_forced, and math/quant8_coarse.h's coarse_bucket and coarse_code in place
// of the search): change them together (tests/test_quant.py and tests/test_cpu_isa.py compare
// every tier's codes bitwise with a torch reference).
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedopt/dtype.h"
#include "fusedopt/macros.h"
#include "fusedopt/math/order_key.h"
#include "fusedopt/math/quant8_coarse.h"

namespace fusedopt {
namespace math {

constexpr int kQuantBlock = 256;  // elements per absmax (bnb's and torchao's 8-bit block)
constexpr int kQuantMapSize = 256;

// max and clamp as selects: fmaxf/fminf are libm calls on x86 unless -ffinite-math-only (their
// NaN rules differ from maxss), which made the CPU loops several times slower.
FUSEDOPT_HD float max_of(float a, float b) { return a > b ? a : b; }

FUSEDOPT_HD float dequantize(const float* map, uint8_t code, float absmax) { return map[code] * absmax; }

// Finite test that survives -ffinite-math-only style flags and vectorizes: false for NaN and +-inf.
// The 8-bit rules use it to keep non-finite moments out of a block (its absmax is shared).
FUSEDOPT_HD bool is_finite(float x) { return fabsf(x) <= 3.402823466e+38f; }

// 1 / absmax, or 0 for an all-zero block (then every element normalizes to 0 instead of NaN), and
// 0 too where 1 / absmax overflows (absmax under 2.9e-39, a denormal): an inf would make a zero
// element NaN and then -1. Such a block keeps its zeros and signs (part 3) and loses the rest,
// all below 3e-39.
FUSEDOPT_HD float inv_absmax(float absmax) {
  const float inv = absmax > 0.0f ? 1.0f / absmax : 0.0f;
  return inv <= 3.402823466e+38f ? inv : 0.0f;
}

// Rounding x to a code: y = x * inv clamped to the map, then the nearest map entry (a tie, as the
// float differences below judge it, goes to the smaller entry), then part 3's sign rule. A NaN y
// becomes map[0]; y = -0 stays -0 (its sign bit is x's sign, which part 3 reads from y).
FUSEDOPT_HD float clamp_to_map(const float* map, float y) {
  y = y > map[0] ? y : map[0];
  return y > map[kQuantMapSize - 1] ? map[kQuantMapSize - 1] : y;
}

// 1. The definition of "nearest", used once per map by build_quant_map (host). The backends never
//    call it per element: they read its answer from a table (part 2).
inline int nearest_code_reference(const float* map, float y) {
  y = clamp_to_map(map, y);
  int lo = 0;  // the largest lo with map[lo] <= y
  for (int step = kQuantMapSize / 2; step > 0; step >>= 1) lo = map[lo + step] <= y ? lo + step : lo;
  const int hi = lo < kQuantMapSize - 1 ? lo + 1 : lo;
  return map[hi] - y < y - map[lo] ? hi : lo;
}

// 2. The table. y's float bits (sign, binade, the top kSearchMantissaBits of the mantissa) pick a
//    bucket; buckets are even in log scale, as the dynamic maps are, so within one bucket the
//    nearest code changes at most once. A bucket is one 32-bit word: the code at the bucket's
//    smallest y in the high half, and in the low half 2^16 minus the key (the low mantissa bits
//    the bucket leaves free) where the next code begins. Adding y's key carries into the code
//    exactly from that key on: a code is one table load, one add and one shift, where a
//    bisection over 256 entries is eight dependent loads.
//    The table's codes already follow part 3's sign rule for y's sign bit.
constexpr int kSearchMantissaBits = 7;
constexpr int kSearchBinades = 24;  // |y| in [2^-24, 1] is bucketed; smaller |y| share bucket 0
constexpr int kSearchBucketsPerSign = (kSearchBinades + 1) << kSearchMantissaBits;
constexpr int kSearchBuckets = 2 * kSearchBucketsPerSign;
constexpr uint32_t kSearchExponentBias = 127 - kSearchBinades;
constexpr int kSearchLowBits = 23 - kSearchMantissaBits;        // mantissa bits below a bucket's
constexpr uint32_t kSearchLowMask = (1u << kSearchLowBits) - 1;
static_assert(kSearchLowBits == 16, "a bucket word is the code (high half) and a carry threshold (low half)");

// A map as every backend takes it: built once per map on the host (build_quant_map) and passed as
// one buffer.
struct QuantMap {
  float values[kQuantMapSize];
  int32_t zero_code;                 // values[zero_code] == 0
  uint32_t bucket[kSearchBuckets];   // code at the bucket's start << 16 | (2^16 - next code's key)
  // values[c]'s bits as four bytes (value_bytes[j][c] = bits >> 8j): 64 codes are dequantized by
  // byte permutes from registers on AVX-512 VBMI (cpu/quantize_avx512.h).
  uint8_t value_bytes[4][kQuantMapSize];
  // table_code's answers in 256 buckets, for the AVX-512 VBMI quantizer (math/quant8_coarse.h).
  CoarseTable coarse;
};

// |y| <= 1 -> bucket in [0, kSearchBucketsPerSign), non-decreasing in |y|: the binade and top
// mantissa bits of |y| (|y| <= 1 keeps the binade at most kSearchBinades; |y| under 2^-24 goes to 0).
FUSEDOPT_HD int magnitude_bucket(uint32_t abs_bits) {
  const int u = int(abs_bits >> kSearchLowBits) - int(kSearchExponentBias << kSearchMantissaBits);
  return u > 0 ? u : 0;
}

// Non-decreasing in y over [-1, 1]: negative y (-0 too) count down from the middle, the rest up.
FUSEDOPT_HD int search_bucket(float y) {
  const uint32_t bits = float_bits(y);
  const int u = magnitude_bucket(bits & 0x7fffffffu);
  return kSearchBucketsPerSign + ((bits >> 31) != 0 ? ~u : u);
}

// y's position inside its bucket, increasing in y: the free low mantissa bits, reversed for
// negative y (a larger magnitude is a smaller y). Buckets whose y do not share their high bits
// (bucket 0 of each sign) hold no code change, so their keys carry nothing.
FUSEDOPT_HD uint32_t search_key(float y) {
  const uint32_t bits = float_bits(y);
  return (bits & kSearchLowMask) ^ ((bits >> 31) != 0 ? kSearchLowMask : 0u);
}

// The code of a clamped y: its nearest code (nearest_code_reference), moved by part 3's rule for
// y's sign bit (build_quant_map builds the table so, and the tests check it).
FUSEDOPT_HD int table_code(const QuantMap& q, float y) {
  return int((q.bucket[search_bucket(y)] + search_key(y)) >> kSearchLowBits);
}

// 3. A nonzero x never becomes 0 or changes sign: it moves to the nearest code of its own sign.
//    (The nearest code of y >= 0 is at or above zero_code, of y <= 0 at or below it, so the zero
//    code is the only one to fix.) For m the sign is the direction of the update (bnb has this
//    fix for m, one-sided: there a small positive m may round to 0). For v it matters more: an
//    element whose v is below half the smallest code (1.6e-7 of its block's absmax, i.e. |g| under
//    4e-4 of the block's largest) would restart from v = 0 every step and move up to
//    1/sqrt(1 - beta2) times too far (30x at 0.999); measured, such elements made a 64K-element
//    AdamW8bit run travel 4x as far as AdamW. (Li et al. 2023, "Memory Efficient Optimizers with
//    4-bit States", drop zero from v's map for this reason.)
//    A map with no code of x's sign (x < 0 in the unsigned map) keeps the zero code: the nearest.
//    The table applies the rule by y's sign bit, which is x's (inv >= 0; an underflow gives a
//    signed zero, and clamp_to_map keeps -0) except where the clamp to a map bound of 0 turns a
//    negative or NaN x into +0: in maps whose lowest code is zero. zero_forced marks the x that
//    must keep the zero code: x = +-0, and in those maps every x that is not above 0.
FUSEDOPT_HD bool zero_forced(int zero_code, float x) { return zero_code == 0 ? !(x > 0.0f) : x == 0.0f; }

// The code of x in a block whose 1 / absmax is inv (see inv_absmax).
FUSEDOPT_HD uint8_t quantize(const QuantMap& q, float x, float inv) {
  const int c = table_code(q, clamp_to_map(q.values, x * inv));
  return uint8_t(zero_forced(q.zero_code, x) ? q.zero_code : c);
}

// Host: fills q from 256 strictly increasing values in [-1, 1] holding 0. Returns false for a map the table
// cannot serve exactly (no zero, a value outside [-1, 1], or more than one code change in a bucket).
// coarse = false leaves q->coarse.ok = 0 (so that tests reach the gathering quantizer on any CPU).
inline bool build_quant_map(const float* values, QuantMap* q, bool coarse = true) {
  q->zero_code = -1;
  for (int c = 0; c < kQuantMapSize; ++c) {
    q->values[c] = values[c] == 0.0f ? 0.0f : values[c];  // -0 as +0: clamp_to_map's bounds keep y's sign
    for (int j = 0; j < 4; ++j) q->value_bytes[j][c] = uint8_t(float_bits(q->values[c]) >> (8 * j));
    if (values[c] == 0.0f) q->zero_code = c;
    if (c > 0 && !(values[c - 1] < values[c])) return false;
  }
  if (!(values[0] >= -1.0f && values[kQuantMapSize - 1] <= 1.0f)) return false;  // magnitude_bucket needs |y| <= 1
  if (q->zero_code < 0) return false;
  const int zc = q->zero_code;
  // Part 3 for y of one sign: the zero code moves to its neighbour of that sign, where one exists.
  auto signed_code = [zc](int c, bool negative) {
    if (c != zc) return c;
    if (negative) return zc > 0 ? zc - 1 : zc;
    return zc < kQuantMapSize - 1 ? zc + 1 : zc;
  };
  // The bucket holds y in [lo, hi] (clamped y reach only part of some buckets; the rest of a
  // bucket is never looked up). Exact when the nearest code changes at most once in it, and not
  // at all in a bucket whose y differ above the low bits (shared_high false).
  auto fill = [&](int b, float lo, float hi, bool shared_high, bool negative) {
    const int first = nearest_code_reference(values, lo);
    const int last = nearest_code_reference(values, hi);
    int code = signed_code(first, negative);
    uint32_t carry = 0;  // 2^16 - the key where the code goes up by one; 0: it never does
    if (last > first && signed_code(first + 1, negative) != code) {
      const int32_t z = first_key_where(order_key(lo), order_key(hi),
                                        [&](float y) { return nearest_code_reference(values, y) > first; });
      const uint32_t next = search_key(from_order_key(z));
      if (next == 0) code += 1; else carry = (1u << kSearchLowBits) - next;  // from the bucket's first key on
    }
    q->bucket[b] = uint32_t(code) << kSearchLowBits | carry;
    return last - first <= 1 && (shared_high || last == first);
  };
  const uint32_t one = float_bits(1.0f);
  auto first_bits = [&](int u) -> uint32_t {  // smallest |y| bits of magnitude bucket u
    if (u == 0) return 0;
    return ((kSearchExponentBias + uint32_t(u >> kSearchMantissaBits)) << 23) |
           (uint32_t(u & ((1 << kSearchMantissaBits) - 1)) << kSearchLowBits);
  };
  bool exact = true;
  for (int u = 0; u < kSearchBucketsPerSign; ++u) {
    const uint32_t a = first_bits(u);
    const uint32_t b = u + 1 < kSearchBucketsPerSign ? first_bits(u + 1) - 1 : one;
    const float lo = bits_float(a < one ? a : one), hi = bits_float(b < one ? b : one);
    // The positive bucket holds y in [lo, hi], the negative one y in [-hi, -lo].
    exact = fill(kSearchBucketsPerSign + u, lo, hi, u > 0, false) && exact;
    exact = fill(kSearchBucketsPerSign - 1 - u, -hi, -lo, u > 0, true) && exact;
  }
  q->coarse = CoarseTable{};
  if (!exact || !coarse) return exact;
  const float lo = q->values[0], hi = q->values[kQuantMapSize - 1];
  build_coarse_table(lo, hi, zc, [q](float y) { return table_code(*q, y); }, &q->coarse);
  if (!q->coarse.ok) return exact;
  // build_coarse_table checked its own change points; here both ends and the carry point of
  // every bucket of the fine table (both signs), where table_code can change. Between consecutive
  // points of the two sets both forms are constant, so agreeing at all of them is agreeing
  // everywhere in [lo, hi].
  auto agrees = [&](float y) {
    if (!(y >= lo && y <= hi)) return true;  // clamped y never lie outside the map
    return coarse_code(q->coarse, coarse_bucket(q->coarse, y), y) == table_code(*q, y);
  };
  bool same = agrees(lo);
  for (int u = 0; u < kSearchBucketsPerSign && same; ++u) {
    const uint32_t a = first_bits(u);
    if (a > one) break;
    const uint32_t z = u + 1 < kSearchBucketsPerSign ? first_bits(u + 1) - 1 : one;
    const uint32_t carry_up = q->bucket[kSearchBucketsPerSign + u] & kSearchLowMask;
    const uint32_t carry_down = q->bucket[kSearchBucketsPerSign - 1 - u] & kSearchLowMask;
    same = agrees(bits_float(a)) && agrees(bits_float(z)) && agrees(-bits_float(a)) && agrees(-bits_float(z));
    // The code goes up at key 2^16 - carry: low bits of |y| for y > 0, their complement for y < 0.
    if (carry_up != 0) same = same && agrees(bits_float(a | ((1u << kSearchLowBits) - carry_up)));
    if (carry_down != 0) same = same && agrees(-bits_float(a | (((1u << kSearchLowBits) - carry_down) ^ kSearchLowMask)));
  }
  if (!same) q->coarse.ok = 0;
  return exact;
}

}  // namespace math
}  // namespace fusedopt
