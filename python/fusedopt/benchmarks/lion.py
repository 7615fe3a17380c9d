"""Lion step time: fusedopt.Lion / Lion8bit vs lion-pytorch and bitsandbytes Lion / Lion8bit.

A suite of `python -m fusedopt bench` (see fusedopt/benchmarks/harness.py); bench/README.md has
the bytes model behind each row's B/param.
"""
from __future__ import annotations

import torch

import fusedopt
from fusedopt.benchmarks.harness import SIZES as DEFAULT_SIZES
from fusedopt.benchmarks.harness import Impl, peer

NAME = "lion"
SIZES = DEFAULT_SIZES  # this suite runs the default sizes
HYPER = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
LionPytorch = peer("lion_pytorch", "Lion", "lion-pytorch")
BnbLion = peer("bitsandbytes.optim", "Lion", "bitsandbytes")
BnbLion8bit = peer("bitsandbytes.optim", "Lion8bit", "bitsandbytes")

# fp32 Lion: read p, g, m and write p, m = 5 x 4 B = 20 B/param. 8-bit momentum: p 4+4, g 4,
# m 1+1 (codes) = 14 B/param (+ 8 B per 256-element block for its absmax).
GROUPS = [
    [
        Impl("fusedopt Lion", torch.float32, "fp32 p,g,m", 20, lambda ps: fusedopt.Lion(ps, **HYPER), True),
        Impl("lion-pytorch", torch.float32, "fp32 p,g,m", 20, lambda ps: LionPytorch(ps, **HYPER)),
        Impl("bnb Lion", torch.float32, "fp32 p,g,m", 20, lambda ps: BnbLion(ps, **HYPER)),
    ],
    [
        Impl("fusedopt Lion8bit", torch.float32, "fp32 p,g + 8-bit m", 14, lambda ps: fusedopt.Lion8bit(ps, **HYPER), True),
        Impl("bnb Lion8bit", torch.float32, "fp32 p,g + 8-bit m", 14, lambda ps: BnbLion8bit(ps, **HYPER)),
    ],
]
IMPLS = {impl.name: impl for group in GROUPS for impl in group}


def _reference_lion(params, grads_per_step, lr, betas, weight_decay):
    """Lion in plain fp64 torch ops (google/automl's update), from the same values."""
    ps = [p.detach().double() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    for grads in grads_per_step:
        for p, g, m in zip(ps, grads, ms):
            g = g.double()
            p.mul_(1 - lr * weight_decay).add_(torch.sign(m * betas[0] + g * (1 - betas[0])), alpha=-lr)
            m.mul_(betas[1]).add_(g, alpha=1 - betas[1])
    return ps


def check(impl_name: str, device: str) -> str | None:
    """Three steps of `impl` vs the fp64 reference from the same values; None if ok. Each step moves
    an element by exactly lr * sign(c), so all but the elements whose c is at rounding level of 0
    agree to rounding: at most 0.1% may differ (1% for the 8-bit momentum, whose rounding moves c
    by up to 0.7% of its block's largest |m|)."""
    torch.manual_seed(0)
    shapes = [(3, 70001), (1000,), (7,)]
    params = [torch.randn(s, device=device) for s in shapes]
    # a new gradient each step: under a constant one the sign of the interpolation is the
    # gradient's whatever the betas, and a wrong beta would pass
    grads_per_step = [[torch.randn_like(p) for p in params] for _ in range(3)]
    init = [p.clone() for p in params]
    opt = IMPLS[impl_name].make(params)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    ref = _reference_lion(init, grads_per_step, **HYPER)
    allowed = 0.01 if "8bit" in impl_name else 0.001
    n = sum(p.numel() for p in params)
    off = sum(int(((p.double() - r).abs() > 1e-6).sum()) for p, r in zip(params, ref))
    return None if off <= allowed * n else f"{off} of {n} elements differ from the fp64 reference by > 1e-6"
