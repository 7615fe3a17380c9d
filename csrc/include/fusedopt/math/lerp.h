// torch's lerp, shared by the update rules that keep an EMA (Adam's m, Muon's momentum).
#pragma once

#include <cmath>

#include "fusedopt/macros.h"

namespace fusedopt {
namespace math {

// How a flag reaches an element loop: read at run time (kRuntime: both paths are
// computed and one is selected, a select of values vectorizes where a branch does not), or fixed
// at compile time by a caller that dispatched on it once per launch (the CPU loop, where the
// selected-away arithmetic costs time whenever the tensors sit in cache).
enum class Known : int { kRuntime, kNo, kYes };

// torch's lerp: self + w * (end - self) for w < 0.5, else end - (end - self) * (1 - w).
// kFromSelf: whether w < 0.5.
template <Known kFromSelf = Known::kRuntime>
FUSEDOPT_HD float lerp(float self, float end, float w) {
  const float from_self = self + w * (end - self);
  const float from_end = end - (end - self) * (1.0f - w);
  if constexpr (kFromSelf == Known::kYes) return from_self;
  if constexpr (kFromSelf == Known::kNo) return from_end;
  return w < 0.5f ? from_self : from_end;
}

// torch's lerp as its vectorized CPU kernel computes it (and its CUDA kernel, where nvcc contracts
// the same formula): one fused multiply-add, fma(w, end - self, self) for w < 0.5, else
// fma(w - 1, end - self, end). fmaf rounds once on every backend and instruction set (a libm call
// where the CPU has no FMA), so all of them agree bitwise, and with torch's low-precision tensors.
FUSEDOPT_HD float lerp_fma(float self, float end, float w) {
  const float diff = end - self;
  return w < 0.5f ? fmaf(w, diff, self) : fmaf(w - 1.0f, diff, end);
}

}  // namespace math
}  // namespace fusedopt
