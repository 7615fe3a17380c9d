// Lion update rule (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), the one
// definition used by the CPU loop and the CUDA kernel. Follows the google/automl reference:
//   g = maximize ? -g : g;  g /= grad_scale
//   c = beta1 * m + (1 - beta1) * g        (from the OLD m; only its sign is used)
//   p = p * (1 - lr * wd)                  (decoupled weight decay, outside sign())
//   p = p - lr * sign(c)                   (sign(0) = 0, as torch.sign; NaN propagates)
//   m = beta2 * m + (1 - beta2) * g
// With beta1 == beta2 this is Signum (signSGD with momentum, Bernstein et al. 2018).
#pragma once

#include "fusedopt/macros.h"

namespace fusedopt {
namespace math {

struct LionConfig {
  double beta1;
  double beta2;
  double weight_decay;
  bool maximize;
};

struct LionScalars {
  float grad_mul;  // +-1 / grad_scale
  float decay;     // 1 - lr * wd
  float lr;
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
};

FUSEDOPT_HD LionScalars lion_scalars(const LionConfig& c, double lr, float grad_scale) {
  LionScalars s;
  s.grad_mul = (c.maximize ? -1.0f : 1.0f) / grad_scale;
  s.decay = float(1.0 - lr * c.weight_decay);
  s.lr = float(lr);
  s.beta1 = float(c.beta1);
  s.one_minus_beta1 = float(1.0 - c.beta1);
  s.beta2 = float(c.beta2);
  s.one_minus_beta2 = float(1.0 - c.beta2);
  return s;
}

// torch.sign: -1, 0, +1, NaN for NaN; written as selects so the CPU loop vectorizes.
FUSEDOPT_HD float sign(float x) {
  const float nonneg = x > 0.0f ? 1.0f : x;  // 0, -0 and NaN pass through
  return x < 0.0f ? -1.0f : (x == 0.0f ? 0.0f : nonneg);
}

FUSEDOPT_HD void lion_update(float& p, float g, float& m, const LionScalars& s) {
  g = g * s.grad_mul;
  const float c = m * s.beta1 + g * s.one_minus_beta1;
  p = p * s.decay;
  p = p - s.lr * sign(c);
  m = m * s.beta2 + g * s.one_minus_beta2;
}

}  // namespace math
}  // namespace fusedopt
