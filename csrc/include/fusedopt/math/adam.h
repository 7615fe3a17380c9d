// Adam / AdamW update rule: the one definition used by the CPU loop and the CUDA kernel.
//
// Follows torch.optim.Adam's single-tensor path operation by operation, so fp32 results agree
// with torch to about an ulp per step (not bitwise: torch's vectorized kernels round some steps
// differently, e.g. addcdiv and its CUDA reciprocal of the bias correction):
//   g  = maximize ? -g : g;  g /= grad_scale (GradScaler, exact: power of two)
//   L2 (Adam):        g = g + wd * p
//   decoupled (AdamW): p = p * (1 - lr * wd)
//   m  = lerp(m, g, 1 - beta1)
//   v  = v * beta2 + (1 - beta2) * g * g
//   vm = max(vm, v)                       (amsgrad)
//   p  = p - lr / (1 - beta1^t) * m / (sqrt(v or vm) * (1 / sqrt(1 - beta2^t)) + eps)
// Kingma & Ba 2015 (Adam), Loshchilov & Hutter 2019 (AdamW), Reddi et al. 2018 (AMSGrad).
#pragma once

#include <cmath>

#include "fusedopt/macros.h"
#include "fusedopt/math/lerp.h"

namespace fusedopt {
namespace math {

// Hyperparameters of one launch (one param group), as the host knows them.
struct AdamConfig {
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled;  // AdamW (true) or Adam with L2 (false)
  bool maximize;
};

// Everything the per-element update needs, computed once per tensor (per step value).
// Flags are folded into arithmetic (sign, l2, decay) so the element loop has no branches
// and vectorizes on the CPU; every folded operation is exact when it is a no-op.
struct AdamScalars {
  float grad_mul;       // +-1 / grad_scale
  float l2;             // wd for Adam, 0 for AdamW
  float decay;          // 1 - lr * wd for AdamW, 1 for Adam
  float lerp_w;         // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float neg_step_size;  // -lr / (1 - beta1^t)
  float inv_bc2_sqrt;   // 1 / sqrt(1 - beta2^t), rounded once from double (as torch's CUDA path)
  float eps;
};

// Scalar math in double as torch does on the host (Python floats), rounded to float once.
FUSEDOPT_HD AdamScalars adam_scalars(const AdamConfig& c, double lr, double step, float grad_scale) {
  AdamScalars s;
  s.grad_mul = (c.maximize ? -1.0f : 1.0f) / grad_scale;
  s.l2 = c.decoupled ? 0.0f : float(c.weight_decay);
  s.decay = c.decoupled ? float(1.0 - lr * c.weight_decay) : 1.0f;
  s.lerp_w = float(1.0 - c.beta1);
  s.beta2 = float(c.beta2);
  s.one_minus_beta2 = float(1.0 - c.beta2);
  s.neg_step_size = float(-(lr / (1.0 - pow(c.beta1, step))));
  s.inv_bc2_sqrt = float(1.0 / sqrt(1.0 - pow(c.beta2, step)));
  s.eps = float(c.eps);
  return s;
}

// kL2: whether s.l2 != 0; kLerpFromSelf: whether s.lerp_w < 0.5 (see Known).
template <bool kAmsgrad, Known kL2 = Known::kRuntime, Known kLerpFromSelf = Known::kRuntime>
FUSEDOPT_HD void adam_update(float& p, float g, float& m, float& v, float& vmax, const AdamScalars& s) {
  g = g * s.grad_mul;
  // Selected, not added unconditionally: 0 * inf is NaN, and torch skips the term when wd == 0.
  const float g_l2 = g + s.l2 * p;
  if constexpr (kL2 == Known::kRuntime) g = s.l2 != 0.0f ? g_l2 : g;
  if constexpr (kL2 == Known::kYes) g = g_l2;
  p = p * s.decay;
  m = lerp<kLerpFromSelf>(m, g, s.lerp_w);
  v = v * s.beta2;
  v = v + s.one_minus_beta2 * g * g;
  float second = v;
  if (kAmsgrad) {
    vmax = (vmax != vmax || vmax > v) ? vmax : v;  // torch.maximum propagates a NaN from either side
    second = vmax;
  }
  // A multiply where torch's CPU path divides: one division per element fewer (the CPU loop is
  // divide-bound at 2 cores), at most 1 ulp apart in denom.
  const float denom = sqrtf(second) * s.inv_bc2_sqrt + s.eps;
  p = p + s.neg_step_size * (m / denom);
}

// The form nearly every launch takes: AdamW, or Adam without weight decay (no L2 term), with
// beta1 > 0.5 (lerp from m). The CPU loops compile it apart (the selected-away arithmetic costs
// time); it gives the same values as the general form. l2 and lerp_w come from the launch's one
// AdamConfig, so one tensor's scalars decide for the whole launch.
FUSEDOPT_HD bool adam_is_common(const AdamScalars& s) { return s.l2 == 0.0f && s.lerp_w < 0.5f; }

template <bool kAmsgrad, bool kCommon>
FUSEDOPT_HD void adam_update_known(float& p, float g, float& m, float& v, float& vmax, const AdamScalars& s) {
  adam_update<kAmsgrad, kCommon ? Known::kNo : Known::kRuntime, kCommon ? Known::kYes : Known::kRuntime>(p, g, m, v,
                                                                                                         vmax, s);
}

}  // namespace math
}  // namespace fusedopt
