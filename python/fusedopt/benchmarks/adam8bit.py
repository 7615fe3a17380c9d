"""8-bit AdamW step time: fusedopt.AdamW8bit vs bitsandbytes and torchao AdamW8bit.

A suite of `python -m fusedopt bench` (see fusedopt/benchmarks/harness.py); bench/README.md has
the bytes model behind each row's B/param.
"""
from __future__ import annotations

import torch

import fusedopt
from fusedopt.benchmarks.harness import SIZES as DEFAULT_SIZES
from fusedopt.benchmarks.harness import Impl, peer

NAME = "adam8bit"
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
BnbAdamW8bit = peer("bitsandbytes.optim", "AdamW8bit", "bitsandbytes")
TorchaoAdamW8bit = peer("torchao.optim", "AdamW8bit", "torchao")

# fp32 params: read and write p (4+4), read g (4), read and write the codes of m and v (1+1 each)
# = 16 B/param; bf16 params: 2+2, 2, 2 x (1+1) = 10 B/param (plus 16 B of absmax per 256 elements).
GROUPS = [
    [
        Impl("fusedopt AdamW8bit", torch.float32, "fp32 p,g + 8-bit m,v", 16,
             lambda ps: fusedopt.AdamW8bit(ps, **HYPER), True),
        Impl("bnb AdamW8bit", torch.float32, "fp32 p,g + 8-bit m,v", 16, lambda ps: BnbAdamW8bit(ps, **HYPER)),
        Impl("torchao AdamW8bit", torch.float32, "fp32 p,g + 8-bit m,v", 16, lambda ps: TorchaoAdamW8bit(ps, **HYPER)),
    ],
    [
        Impl("fusedopt AdamW8bit bf16", torch.bfloat16, "bf16 p,g + 8-bit m,v", 10,
             lambda ps: fusedopt.AdamW8bit(ps, **HYPER), True),
        Impl("bnb AdamW8bit bf16", torch.bfloat16, "bf16 p,g + 8-bit m,v", 10, lambda ps: BnbAdamW8bit(ps, **HYPER)),
        Impl("torchao AdamW8bit bf16", torch.bfloat16, "bf16 p,g + 8-bit m,v", 10,
             lambda ps: TorchaoAdamW8bit(ps, **HYPER)),
    ],
]
# bitsandbytes takes ~40 ns a param on a CPU core: 32M is left out there to keep the run short
SIZES = {"cpu": [1, 4, 16, 64], "cuda": DEFAULT_SIZES["cuda"]}
IMPLS = {impl.name: impl for group in GROUPS for impl in group}


def check(impl_name: str, device: str) -> str | None:
    """Three steps of `impl` vs torch.optim.AdamW (fp32, for-loop) from the same values; None if ok.
    The 8-bit moments are within 0.7% of their block's largest value, so the distance each param
    travelled may differ from AdamW's by a few percent: 5% (of the total distance) is allowed."""
    impl = IMPLS[impl_name]
    torch.manual_seed(0)
    shapes = [(3, 70001), (1000,), (7,)]
    # At |p| ~ 0.01 bf16's rounding of p (2^-9 |p| a step) stays well below the steps (~lr), so
    # the slack below cannot hide a wrong or missing update.
    params = [(0.01 * torch.randn(s, device=device)).to(impl.dtype) for s in shapes]
    refs = [p.detach().float().clone() for p in params]  # float() alone returns fp32 params themselves
    init = [r.clone() for r in refs]
    opt, ref_opt = impl.make(params), torch.optim.AdamW(refs, **HYPER, foreach=False)
    for _ in range(3):  # a new gradient each step: under a constant one m-hat is g whatever beta1 is
        for p, r in zip(params, refs):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.float()
        opt.step()
        ref_opt.step()
    travelled = sum(((r - i) ** 2).sum() for r, i in zip(refs, init)) ** 0.5
    diff = sum(((p.float() - r) ** 2).sum() for p, r in zip(params, refs)) ** 0.5
    # bf16 params round every step: up to 2^-9 of |p| each
    slack = 0.0 if impl.dtype == torch.float32 else 3 * 2**-9 * sum((r ** 2).sum() for r in refs) ** 0.5
    ok = diff <= 0.05 * travelled + slack
    return None if ok else f"distance to AdamW {float(diff):.3g} > 5% of distance travelled {float(travelled):.3g}"
