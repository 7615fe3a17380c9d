"""Newton-Schulz's symmetric products alone: fusedopt's upper-triangle X X^T kernel
(csrc/cuda/symmetric_gram.cu) vs torch.bmm / torch.baddbmm (cuBLAS) on the same bf16 batch.

A suite of `python -m fusedopt bench` (see fusedopt/benchmarks/harness.py). TFLOP/s count the
full product (2 m^3 for X X^T and for A A on the square batches timed) for every row, so they
compare as speed; the kernel does about half of those flops. CUDA only: on the CPU the fusedopt rows say so.
"""
from __future__ import annotations

import torch

from fusedopt.benchmarks.harness import Impl, Missing

NAME = "gram"
SIZES = {"cpu": [], "cuda": []}  # not used: the cases are matrix batches (see cases)
B, C = -4.775, 2.0315  # the quintic's b, c


class _Product:
    """An 'optimizer' whose step() is one product on a fixed bf16 batch (what time_group times)."""

    def __init__(self, params, fn):
        self.x = params[0].detach().bfloat16() / params[0].shape[-1] ** 0.5
        self.a = torch.bmm(self.x, self.x.mT)  # a symmetric operand for the polynomial rows
        self.fn = fn

    def step(self):
        self.fn(self)


def _fusedopt(fn):
    def make(params):
        if params[0].device.type != "cuda":
            raise Missing("missing (CUDA only)")
        return _Product(params, fn)
    return make


def _symmetric_gram(*args, **kw):
    from fusedopt._ops import symmetric_gram
    return symmetric_gram(*args, **kw)


GROUPS = [
    [
        Impl("fusedopt symmetric X X^T", torch.float32, "bf16 X, fp32 accumulate", None,
             _fusedopt(lambda s: _symmetric_gram(s.x)), True),
        Impl("torch.bmm X X^T", torch.float32, "bf16 X, fp32 accumulate", None,
             lambda ps: _Product(ps, lambda s: torch.bmm(s.x, s.x.mT))),
    ],
    [
        Impl("fusedopt symmetric b A + c A A", torch.float32, "bf16 A, fp32 accumulate", None,
             _fusedopt(lambda s: _symmetric_gram(s.a, s.a, alpha=C, beta=B)), True),
        Impl("torch.baddbmm b A + c A A", torch.float32, "bf16 A, fp32 accumulate", None,
             lambda ps: _Product(ps, lambda s: torch.baddbmm(s.a, s.a, s.a, beta=B, alpha=C))),
    ],
]
IMPLS = {impl.name: impl for group in GROUPS for impl in group}


def cases(device: str, sizes: list[int], mix_scale: int) -> list[tuple[str, list[tuple]]]:
    if device == "cuda":
        # Square batches only: there X X^T and A A both cost 2 m^3, so one flop count serves both groups.
        return [("1 x 4096x4096", [(1, 4096, 4096)]), ("8 x 4096x4096", [(8, 4096, 4096)]),
                ("48 x 768x768 (GPT-2 hidden)", [(48, 768, 768)])]
    return [("1 x 512x512", [(1, 512, 512)])]


def flops(shapes: list[tuple]) -> float:
    (b, m, n), = shapes
    return 2.0 * b * m * m * n  # X X^T, and A A (n = m in every case; b A adds m^2)


def check(impl_name: str, device: str) -> str | None:
    """The kernel vs fp64 on one odd-sized batch (bound as tests/test_symmetric_gram_cuda.py)."""
    if device != "cuda":
        return None  # the rows report 'missing (CUDA only)'
    x = torch.randn(2, 200, 72, device=device).bfloat16()
    out = _symmetric_gram(x)
    x64 = x.double()
    mag = x64.abs() @ x64.abs().mT
    err = (out.double() - x64 @ x64.mT).abs() - (2.0**-8 + 72 * 2.0**-23) * mag
    if not torch.equal(out, out.mT):
        return "output not exactly symmetric"
    return None if bool((err <= 0).all()) else f"error above the bf16 bound by {float(err.max()):.3g}"
