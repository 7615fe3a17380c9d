// Blockwise 8-bit quantization: the one definition of code <-> float used by the CPU loops and
// the CUDA kernels (and, through the CPU entry points, by checkpoint conversion in Python).
//
// A tensor is cut into blocks of kQuantBlock consecutive elements (in memory order). A block stores
// one fp32 absmax and one uint8 code per element; the code indexes a 256-entry map of sorted
// values in [-1, 1] (signed) or [0, 1] (unsigned), built by python/fusedopt/quant.py:
//   x ~= map[code] * absmax
// Quantizing rounds x / absmax to the nearest map entry (binary search over the sorted map;
// a tie goes to the smaller entry), except that a nonzero x never rounds to 0 or across it (part
// 4 below). Both maps hold 0 and 1 exactly, the signed one -1 too, so a block's largest element
// and zeros round-trip exactly.
#pragma once

#include <cstdint>

#include "fusedopt/macros.h"

namespace fusedopt {
namespace math {

constexpr int kQuantBlock = 256;  // elements per absmax (bnb's and torchao's 8-bit block)
constexpr int kQuantMapSize = 256;

// max and clamp as selects: fmaxf/fminf are libm calls on x86 unless -ffinite-math-only (their
// NaN rules differ from maxss), which made the CPU loops several times slower.
FUSEDOPT_HD float max_of(float a, float b) { return a > b ? a : b; }

FUSEDOPT_HD float dequantize(const float* map, uint8_t code, float absmax) { return map[code] * absmax; }

// 1 / absmax, or 0 for an all-zero block (then every element normalizes to 0 instead of NaN).
FUSEDOPT_HD float inv_absmax(float absmax) { return absmax > 0.0f ? 1.0f / absmax : 0.0f; }

// Rounding x to a code, in four parts (the same for both maps): the CUDA kernels compose them per
// element (quantize below); the CPU loops run each part over a whole block so that the compiler
// vectorizes the search (cpu/quantize_block.h). Both give identical codes.
//
// 1. y = x * inv clamped to [map[0], map[255]] (a NaN ends at map[0]; callers keep NaN out,
//    see math/adam8bit.h).
FUSEDOPT_HD float clamp_to_map(const float* map, float y) {
  y = y > map[0] ? y : map[0];
  return y < map[kQuantMapSize - 1] ? y : map[kQuantMapSize - 1];
}

// 2. Bisection for the largest lo with map[lo] <= y: start at lo = 0 and take the steps
//    128, 64, ..., 1.
FUSEDOPT_HD int bisect(const float* map, float y, int lo, int step) { return map[lo + step] <= y ? lo + step : lo; }

// 3. The nearer of map[lo] and map[lo + 1]; a tie goes to lo (the smaller value).
FUSEDOPT_HD int nearer(const float* map, float y, int lo) {
  const int hi = lo < kQuantMapSize - 1 ? lo + 1 : lo;
  return map[hi] - y < y - map[lo] ? hi : lo;
}

// 4. A nonzero x never becomes 0 or changes sign: it moves to the nearest code of its own sign.
//    For m the sign is the direction of the update (bnb has this fix for m, one-sided: there a
//    small positive m may round to 0). For v it matters more: an element whose v is below half the
//    smallest code (1.6e-7 of its block's absmax, i.e. |g| under 4e-4 of the block's largest) would
//    restart from v = 0 every step and move up to 1/sqrt(1 - beta2) times too far (30x at 0.999);
//    measured, such elements made a 64K-element AdamW8bit run travel 4x as far as AdamW. (Li et al.
//    2023, "Memory Efficient Optimizers with 4-bit States", drop zero from v's map for this reason.)
FUSEDOPT_HD int keep_sign(const float* map, float x, int c) {
  c = (x > 0.0f && map[c] <= 0.0f) ? c + 1 : c;
  return (x < 0.0f && map[c] >= 0.0f) ? c - 1 : c;
}

FUSEDOPT_HD int nearest_code(const float* map, float y) {
  y = clamp_to_map(map, y);
  int lo = 0;
  for (int step = kQuantMapSize / 2; step > 0; step >>= 1) lo = bisect(map, y, lo, step);
  return nearer(map, y, lo);
}

// The code of x in a block whose 1 / absmax is inv (see inv_absmax).
FUSEDOPT_HD uint8_t quantize(const float* map, float x, float inv) {
  return uint8_t(keep_sign(map, x, nearest_code(map, x * inv)));
}

}  // namespace math
}  // namespace fusedopt
