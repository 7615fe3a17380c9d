// Muon's elementwise parts (Jordan et al. 2024; torch.optim.Muon), the one definition used by the
// CPU loops and the CUDA kernels around the Newton-Schulz GEMMs:
//   prepare:  g = g * grad_mul (maximize/GradScaler), rounded to the buffer's dtype (a no-op
//             where the buffer has the grad's dtype, as torch makes it; a loaded bf16 buffer
//             with fp32 grads, which torch's step refuses, rounds g)
//             buf = lerp(buf, g, 1 - momentum)                     (stored in the buffer's dtype)
//             u = nesterov ? lerp(g, buf, momentum) : buf          (rounded to the buffer's dtype)
//             X = bf16(u / max(||U||_F * safety, eps, tiny))       (the NS input; the norm: a
//                                                                   per-matrix reduction between passes)
//   apply:    p = p * (1 - lr * weight_decay) - lr * lr_factor * O (O: the NS output)
#pragma once

#include <cmath>

#include "fusedopt/dtype.h"
#include "fusedopt/macros.h"
#include "fusedopt/math/lerp.h"

namespace fusedopt {
namespace math {

struct MuonScalars {
  float grad_mul;  // 1 / grad_scale
  float momentum;
  float one_minus_momentum;
  bool nesterov;
};

FUSEDOPT_HD MuonScalars muon_scalars(double momentum, bool nesterov, float grad_scale) {
  return {1.0f / grad_scale, float(momentum), float(1.0 - momentum), nesterov};
}

// g unscaled (GradScaler) and rounded to S, as torch's grad tensor of that dtype holds it.
template <typename S>
FUSEDOPT_HD float muon_grad(float g, const MuonScalars& s) { return to_float(from_float<S>(g * s.grad_mul)); }

// u from muon_grad's gs and the updated buffer: nesterov's lerp(g, buf, momentum),
// else the buffer.
template <typename S>
FUSEDOPT_HD float muon_direction(float gs, float buf, const MuonScalars& s) {
  return s.nesterov ? to_float(from_float<S>(lerp_fma(gs, buf, s.momentum))) : buf;
}

// One element's momentum step; returns u. S is the buffer's storage type: g, buf and u are
// rounded to it as torch's tensors of that dtype are, and the lerps round as torch's do (lerp_fma),
// so a bf16 buffer follows torch.optim.Muon's bit for bit.
template <typename S>
FUSEDOPT_HD float muon_momentum(float g, float& buf, const MuonScalars& s) {
  g = muon_grad<S>(g, s);
  buf = to_float(from_float<S>(lerp_fma(buf, g, s.one_minus_momentum)));
  return muon_direction<S>(g, buf, s);
}

// The u that muon_momentum returned, from g and the buffer it left (the cast pass recomputes u:
// cheaper than storing it).
template <typename S>
FUSEDOPT_HD float muon_update_direction(float g, float buf, const MuonScalars& s) {
  return muon_direction<S>(muon_grad<S>(g, s), buf, s);
}

// The divisor of a matrix's normalization from the sum of its squares (accumulated in double:
// no underflow at ||U|| = 1e-20, no overflow at 1e30, in fp32 terms).
FUSEDOPT_HD float muon_divisor(double sum_squares, double safety, double eps) {
  const double d = sqrt(sum_squares) * safety;
  const double floor = eps > 1.17549435e-38 ? eps : 1.17549435e-38;  // FLT_MIN, as newton_schulz.py
  return float(d > floor ? d : floor);
}

// P is the param's storage type: the decayed param is rounded to it before the update is added,
// as torch's p.mul_(decay); p.add_(o, alpha) on a bf16/fp16 param does (fp32: no rounding).
template <typename P>
FUSEDOPT_HD void muon_apply(float& p, float o, float decay, float neg_lr_scaled) {
  p = to_float(from_float<P>(p * decay));
  p = p + neg_lr_scaled * o;
}

}  // namespace math
}  // namespace fusedopt
