// Blockwise 8-bit Adam/AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
// Quantization"): the per-element rule shared by the CPU loop and the CUDA kernel. Per block of
// math::kQuantBlock elements, every backend does:
//   1. m = dequantize(signed map, code_m, absmax_m); v = dequantize(unsigned map, code_v, absmax_v)
//   2. adam8bit_update(p, g, m, v)             -- math::adam_update, unchanged
//   3. absmax_m = max |m|, absmax_v = max v    -- over the block: the one backend-specific part
//   4. code_m = quantize_signed(m), code_v = quantize_unsigned(v) with the new absmaxes
//
// Non-finite policy. A block shares one absmax, so one inf/NaN moment would poison the 255 other
// elements of its block (absmax inf or NaN -> every element inf/NaN). An element whose updated m
// or v is not finite (a NaN/inf grad, or a grad so large that g*g overflows) is therefore skipped
// for this step: its param, m and v keep their previous values, and the rest of the block updates
// normally. (bnb instead zeroes m and v of such an element, which makes its next update spike to
// ~(1-beta1)/sqrt(1-beta2) = 3x lr.) With a GradScaler the whole step is skipped first, as in AdamW.
#pragma once

#include "fusedopt/macros.h"
#include "fusedopt/math/adam.h"
#include "fusedopt/math/quant8.h"

namespace fusedopt {
namespace math {

// kCommon: adam_is_common(s) holds (math/adam.h).
template <bool kCommon = false>
FUSEDOPT_HD void adam8bit_update(float& p, float g, float& m, float& v, const AdamScalars& s) {
  float p1 = p, m1 = m, v1 = v, unused = 0.0f;
  adam_update_known<false, kCommon>(p1, g, m1, v1, unused, s);
  const bool ok = is_finite(m1) && is_finite(v1);
  p = ok ? p1 : p;
  m = ok ? m1 : m;
  v = ok ? v1 : v;
}

// The rule as the blockwise 8-bit backends take it (cpu/blockwise8bit.h, cuda/blockwise8bit.cuh):
// moment 0 is exp_avg (signed map), moment 1 exp_avg_sq (unsigned map).
struct Adam8bitRule {
  static constexpr int kMoments = 2;
  using Scalars = AdamScalars;
  AdamConfig config;
  // step: the step number this update makes (1 for the first).
  FUSEDOPT_HD Scalars scalars(double lr, float step, float grad_scale) const {
    return adam_scalars(config, lr, double(step), grad_scale);
  }
  FUSEDOPT_HD static bool common(const Scalars& s) { return adam_is_common(s); }
  template <bool kCommon = false>
  FUSEDOPT_HD static void update(float& p, float g, float (&m)[2], const Scalars& s) {
    adam8bit_update<kCommon>(p, g, m[0], m[1], s);
  }
};

}  // namespace math
}  // namespace fusedopt
