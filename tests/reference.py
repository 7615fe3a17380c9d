"""Independent references: a plain-torch Adam/AdamW written from the paper, run in any dtype
(float64 for ground truth), and helpers shared by the tests."""
import math

import torch


class ReferenceAdam:
    """Adam/AdamW on plain tensors, states in the params' dtype. Not the code under test."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled=True, amsgrad=False, maximize=False):
        self.params = params
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.decoupled, self.amsgrad, self.maximize = decoupled, amsgrad, maximize
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.vmax = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v, vmax in zip(self.params, grads, self.m, self.v, self.vmax):
            g = g.to(p.dtype)
            if self.maximize:
                g = -g
            if self.wd:
                if self.decoupled:
                    p.mul_(1 - self.lr * self.wd)
                else:
                    g = g + self.wd * p
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).add_(g * g, alpha=1 - b2)
            second = v
            if self.amsgrad:
                torch.maximum(vmax, v, out=vmax)
                second = vmax
            m_hat = m / (1 - b1 ** self.t)
            v_hat = second / (1 - b2 ** self.t)
            p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


def fp32_ulp_budget(steps: int, magnitude: float) -> float:
    """Worst-case drift between two fp32 implementations of the same update that differ only in
    rounding (FMA contraction, vectorized vs scalar lerp): at most ~1 ulp of |p| per step, added
    linearly over `steps` steps."""
    return steps * magnitude * 2.0 ** -23


def max_abs(a, b) -> float:
    return max(((x.double() - y.double()).abs().max().item() for x, y in zip(a, b) if x.numel()), default=0.0)


def rel_l2(a, b) -> float:
    num = math.sqrt(sum(((x.double() - y.double()) ** 2).sum().item() for x, y in zip(a, b)))
    den = math.sqrt(sum((y.double() ** 2).sum().item() for y in b))
    return num / max(den, 1e-30)


class ReferenceLion:
    """Lion as in google/automl's lion_pytorch.py, on plain tensors in the params' dtype."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        self.params, self.lr, self.betas, self.wd, self.maximize = params, lr, betas, weight_decay, maximize
        self.m = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads):
        b1, b2 = self.betas
        for p, g, m in zip(self.params, grads, self.m):
            g = g.to(p.dtype)
            if self.maximize:
                g = -g
            p.mul_(1 - self.lr * self.wd)
            p.add_(torch.sign(m * b1 + g * (1 - b1)), alpha=-self.lr)
            m.mul_(b2).add_(g, alpha=1 - b2)
