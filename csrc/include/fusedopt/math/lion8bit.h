// Lion with its momentum in blockwise 8 bits (the signed dynamic map of math/quant8.h): the
// per-element rule shared by the CPU loop and the CUDA kernel. The update is math::lion_update on
// the dequantized momentum; the backends then requantize the block with its new absmax.
//
// Non-finite policy, as for 8-bit Adam (math/adam8bit.h): one inf/NaN momentum would poison its
// block's shared absmax, so an element whose new m is not finite keeps its param and momentum for
// this step; the rest of the block updates. Under a GradScaler the whole step is skipped first.
#pragma once

#include "fusedopt/macros.h"
#include "fusedopt/math/lion.h"
#include "fusedopt/math/quant8.h"

namespace fusedopt {
namespace math {

FUSEDOPT_HD void lion8bit_update(float& p, float g, float& m, const LionScalars& s) {
  float p1 = p, m1 = m;
  lion_update(p1, g, m1, s);
  const bool ok = is_finite(m1);
  p = ok ? p1 : p;
  m = ok ? m1 : m;
}

struct Lion8bitRule {
  static constexpr int kMoments = 1;
  using Scalars = LionScalars;
  LionConfig config;
  FUSEDOPT_HD Scalars scalars(double lr, float /*step: Lion keeps none*/, float grad_scale) const {
    return lion_scalars(config, lr, grad_scale);
  }
  FUSEDOPT_HD static bool common(const Scalars&) { return false; }  // Lion's update has no flags to fix
  template <bool kCommon = false>
  FUSEDOPT_HD static void update(float& p, float g, float (&m)[1], const Scalars& s) { lion8bit_update(p, g, m[0], s); }
};

}  // namespace math
}  // namespace fusedopt
