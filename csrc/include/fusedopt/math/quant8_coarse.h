// A second form of math/quant8.h's rounding table, small enough to be searched by byte permutes
// from registers: the AVX-512 VBMI quantizer (cpu/quantize_avx512.h) reads it where the other
// tiers gather from QuantMap::bucket. A gather is microcoded on AMD's AVX-512 cores; the two
// quantizers' times per element are in bench/cpu_paths.py's table (results under bench/results/).
//
// 256 buckets instead of 6400: a bucket is a binade of |y| cut into 2^s equal parts, s chosen per
// binade by the builder (more parts where the map is dense), so a bucket may hold up to
// kCoarseChanges code changes. A bucket stores the code at its smallest y and, for each change,
// the low 3 bytes of the int32 order key just below the first y with the higher code (0xffffff
// where there is no change):
//   code(y) = code[b] + sum_j (low24(order_key(y)) > threshold_j[b])
// The keys of one binade share their top byte (the sign and 7 of the 8 exponent bits), so the
// low 3 bytes order them: the byte-permute quantizer compares 64 keys byte by byte, with no
// byte-to-int32 unpacking. (The bucket of every |y| under 2^-24 spans binades: it may hold no
// change.)
// The builder reads every code from QuantMap's table (table_code), and build_quant_map then
// compares the two forms at every point where either one's code can change (both are constant
// between those points), so they agree for every clamped y. Where the map is too dense for 256
// buckets, or the comparison fails, ok stays 0 and the quantizer gathers.
#pragma once

#include <cstdint>

#include "fusedopt/dtype.h"
#include "fusedopt/macros.h"
#include "fusedopt/math/order_key.h"

namespace fusedopt {
namespace math {

constexpr int kCoarseChanges = 2;
constexpr int kCoarseBuckets = 256;
// Binade index b' = max(exponent - kCoarseExponentBase, 0): b' = 0 holds every |y| under 2^-24
// (one bucket), b' = 25 only |y| = 1 (one bucket), the 24 binades between are cut.
constexpr int kCoarseExponentBase = 102;
constexpr int kCoarseBinades = 26;
constexpr int kCoarseForced = kCoarseBuckets - 1;  // zero_forced elements: the zero code, no change
constexpr uint32_t kNoChange = 0xffffff;           // no low24 key is above it

struct CoarseTable {
  int32_t ok;          // 0: not built (coarse = false, an inexact fine table, too dense a map, a failed check): gather
  int32_t offset[32];  // first bucket of binade b' (128 + ... where the map has negative codes)
  int32_t shift[32];   // a binade's bucket is its mantissa >> shift[b'] (23 for a binade in one bucket)
  uint8_t code[kCoarseBuckets];
  // threshold_j[b]'s bytes: threshold[j][i][b] = low24 >> 8i, for byte permutes.
  uint8_t threshold[kCoarseChanges][3][kCoarseBuckets];
};

// y's bucket: binade and top mantissa bits of |y|; negative y mirror positive ones (b ^ 255)
// where the map has negative codes. |y| <= 1 (b' <= 25 indexes the 32-entry tables).
FUSEDOPT_HD int coarse_bucket(const CoarseTable& c, float y) {
  const uint32_t bits = float_bits(y), a = bits & 0x7fffffffu;
  const int e = int(a >> 23) - kCoarseExponentBase;
  const int b = e > 0 ? e : 0;
  const int u = c.offset[b] + int((a & 0x7fffffu) >> c.shift[b]);
  return (bits >> 31) != 0 ? u ^ 0xff : u;
}

FUSEDOPT_HD uint32_t coarse_threshold(const CoarseTable& c, int j, int b) {
  uint32_t t = 0;
  for (int i = 0; i < 3; ++i) t |= uint32_t(c.threshold[j][i][b]) << (8 * i);
  return t;
}

// The code of a clamped y in bucket b: table_code(q, y) for a table built by build_coarse_table.
FUSEDOPT_HD int coarse_code(const CoarseTable& c, int b, float y) {
  const uint32_t low24 = uint32_t(order_key(y)) & 0xffffffu;
  int code = c.code[b];
  for (int j = 0; j < kCoarseChanges; ++j) code += low24 > coarse_threshold(c, j, b) ? 1 : 0;
  return code;
}

// Host: fills c from code_of(y) (the code of a clamped y, non-decreasing in y; its table_code)
// over y in [lo, hi], the map's range, and checks it at its own change points (bucket ends and
// thresholds; build_quant_map checks the rest). c->ok = 0 where 256 buckets cannot hold the map
// or a check fails.
template <typename CodeOf>
void build_coarse_table(float lo, float hi, int zero_code, CodeOf code_of, CoarseTable* c) {
  *c = CoarseTable{};
  const bool negative = lo < 0.0f;  // negative codes: each sign gets half the buckets
  const int budget = negative ? kCoarseBuckets / 2 - 1 : kCoarseBuckets - 1;
  const int32_t key_lo = order_key(lo), key_hi = order_key(hi);
  // Code changes in y keys [a, z] clipped to the map's range.
  auto changes = [&](int32_t a, int32_t z) {
    a = a > key_lo ? a : key_lo;
    z = z < key_hi ? z : key_hi;
    return a > z ? 0 : code_of(from_order_key(z)) - code_of(from_order_key(a));
  };
  // The |y| bits of binade b's part j of 2^s, both ends included.
  auto part = [](int b, int s, int j, uint32_t* first, uint32_t* last) {
    if (b == 0) {
      *first = 0;
      *last = (uint32_t(kCoarseExponentBase + 1) << 23) - 1;
      return;
    }
    const uint32_t base = uint32_t(b + kCoarseExponentBase) << 23;
    *first = base + (uint32_t(j) << (23 - s));
    *last = *first + (1u << (23 - s)) - 1;
  };
  auto both_signs = [&](uint32_t first, uint32_t last) {
    const int p = changes(int32_t(first), int32_t(last));
    const int n = negative ? changes(order_key(-bits_float(last)), order_key(-bits_float(first))) : 0;
    return p > n ? p : n;
  };
  const auto whole = [](int b) { return b == 0 || b == kCoarseBinades - 1; };
  {
    uint32_t first, last;
    part(0, 0, 0, &first, &last);
    // The bucket of |y| under 2^-24 spans binades, so low24 does not order its keys. (An exact
    // fine table never has a change there: its own bucket 0 covers more and holds none.)
    if (both_signs(first, last) > 0) return;
  }
  int s[kCoarseBinades] = {};
  for (;;) {
    int total = 0, worst_binade = -1, worst = kCoarseChanges;
    for (int b = 0; b < kCoarseBinades; ++b) {
      total += 1 << s[b];
      for (int j = 0; j < (1 << s[b]); ++j) {
        uint32_t first, last;
        part(b, s[b], j, &first, &last);
        const int n = both_signs(first, last);
        if (n > worst) worst = n, worst_binade = b;
      }
    }
    if (total > budget) return;
    if (worst_binade < 0) break;
    if (whole(worst_binade) || s[worst_binade] == 23) return;
    ++s[worst_binade];
  }
  int next = negative ? kCoarseBuckets / 2 : 0;
  for (int b = 0; b < kCoarseBinades; ++b) {
    c->offset[b] = next;
    c->shift[b] = 23 - s[b];
    next += 1 << s[b];
  }
  for (int j = 0; j < kCoarseChanges; ++j) {
    for (int b = 0; b < kCoarseBuckets; ++b) {
      for (int i = 0; i < 3; ++i) c->threshold[j][i][b] = uint8_t(kNoChange >> (8 * i));
    }
  }
  // Bucket b holds y keys [a, z]: its first code, then where it goes up (a bisection per change).
  // Each end and each change (and the key before it) is read back through coarse_bucket and
  // coarse_code: a table that disagrees with code_of anywhere there is not used.
  bool agrees = true;
  auto same = [&](int bucket, int32_t k) {
    const float y = from_order_key(k);
    return coarse_bucket(*c, y) == bucket && coarse_code(*c, bucket, y) == code_of(y);
  };
  auto fill = [&](int bucket, int32_t a, int32_t z) {
    a = a > key_lo ? a : key_lo;
    z = z < key_hi ? z : key_hi;
    if (a > z) return;  // clamping never lands here
    const int first = code_of(from_order_key(a)), last = code_of(from_order_key(z));
    c->code[bucket] = uint8_t(first);
    int32_t at[kCoarseChanges];
    for (int j = 1; j <= last - first; ++j) {
      const int32_t r = first_key_where(a, z, [&](float y) { return code_of(y) >= first + j; });
      at[j - 1] = r;  // r > a: the key before it is in the bucket, and shares r's top byte
      for (int i = 0; i < 3; ++i) c->threshold[j - 1][i][bucket] = uint8_t(uint32_t(r - 1) >> (8 * i));
    }
    agrees = agrees && same(bucket, a) && same(bucket, z);
    for (int j = 0; j < last - first; ++j) agrees = agrees && same(bucket, at[j]) && same(bucket, at[j] - 1);
  };
  for (int b = 0; b < kCoarseBinades; ++b) {
    for (int j = 0; j < (1 << s[b]); ++j) {
      uint32_t first, last;
      part(b, s[b], j, &first, &last);
      if (b == kCoarseBinades - 1) last = first;  // |y| = 1 only
      fill(c->offset[b] + j, int32_t(first), int32_t(last));
      if (negative) fill((c->offset[b] + j) ^ 0xff, order_key(-bits_float(last)), order_key(-bits_float(first)));
    }
  }
  c->code[kCoarseForced] = uint8_t(zero_code);
  c->ok = agrees ? 1 : 0;
}

}  // namespace math
}  // namespace fusedopt
