"""Muon step time: fusedopt.Muon (same-shape matrices batched through one Newton-Schulz) vs
torch.optim.Muon (one Newton-Schulz per matrix).

A suite of `python -m fusedopt bench` (see fusedopt/benchmarks/harness.py). Muon's step is
matmul-bound, so rows report the Newton-Schulz TFLOP/s (5 quintic iterations on the short side
of each matrix: 4 m^2 n + 2 m^3 flops per iteration for an m x n matrix, m <= n), not GB/s.
Cases: the hidden matrices of a GPT-2-like model (12 layers of qkv, proj, fc, fc-proj) and a
batch of same-size square matrices; on the CPU both are scaled down (bf16 matmuls there run at a
few hundred GFLOP/s at best).
"""
from __future__ import annotations

import torch

import fusedopt
from fusedopt.benchmarks.harness import Impl, Missing

NAME = "muon"
HYPER = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
NS_STEPS = 5
SIZES = {"cpu": [], "cuda": []}  # not used: the cases are matrix sets (see cases)

SYMMETRIC = "fusedopt Muon, ns_kernel='symmetric'"


def _symmetric_muon(params):
    if params[0].device.type != "cuda":
        raise Missing("missing (CUDA only)")
    return fusedopt.Muon(params, ns_kernel="symmetric", **HYPER)


GROUPS = [
    [
        Impl("fusedopt Muon", torch.float32, "fp32 p,g,m; bf16 NS", None, lambda ps: fusedopt.Muon(ps, **HYPER), True),
        Impl("torch.optim.Muon", torch.float32, "fp32 p,g,m; bf16 NS", None, lambda ps: torch.optim.Muon(ps, **HYPER)),
    ],
]
if torch.cuda.is_available():  # on a CPU-only machine its row would only say 'missing' after timing the peer again
    GROUPS.append([
        Impl(SYMMETRIC, torch.float32, "fp32 p,g,m; bf16 NS", None, _symmetric_muon, True),
        Impl("torch.optim.Muon", torch.float32, "fp32 p,g,m; bf16 NS", None, lambda ps: torch.optim.Muon(ps, **HYPER)),
    ])
IMPLS = {impl.name: impl for group in GROUPS for impl in group}


def gpt2_matrices(hidden: int, layers: int = 12) -> list[tuple[int, int]]:
    h = hidden
    return [s for _ in range(layers) for s in [(3 * h, h), (h, h), (4 * h, h), (h, 4 * h)]]


def cases(device: str, sizes: list[int], mix_scale: int) -> list[tuple[str, list[tuple]]]:
    hidden = mix_scale if device == "cuda" else min(mix_scale, 256)
    square, count = (4096, 8) if device == "cuda" else (512, 8)
    return [(f"GPT-2 matrices, hidden {hidden}", gpt2_matrices(hidden)),
            (f"{count} x {square}x{square}", [(square, square)] * count)]


def flops(shapes: list[tuple]) -> float:
    total = 0.0
    for a, b in shapes:
        m, n = min(a, b), max(a, b)
        total += NS_STEPS * (4 * m * m * n + 2 * m**3)
    return total


def check(impl_name: str, device: str) -> str | None:
    """Two steps of `impl` vs torch.optim.Muon from the same values; None if ok. Both orthogonalize
    in bf16 (the batched and per-matrix products round differently), so params may differ by about
    1% of the distance they moved (tests/test_muon.py measures 0.3-0.4%); 2% is allowed."""
    if impl_name == SYMMETRIC and device != "cuda":
        return None  # the rows report 'missing (CUDA only)'
    torch.manual_seed(0)
    shapes = [(96, 32), (96, 32), (32, 32), (48, 80)]
    params = [torch.randn(s, device=device) for s in shapes]
    refs = [p.clone() for p in params]
    init = [p.clone() for p in params]
    for p, r in zip(params, refs):
        p.grad = torch.randn_like(p)
        r.grad = p.grad.clone()
    opt, ref = IMPLS[impl_name].make(params), torch.optim.Muon(refs, **HYPER)
    for _ in range(2):
        opt.step()
        ref.step()
    travelled = sum(((r - i) ** 2).sum() for r, i in zip(refs, init)) ** 0.5
    diff = sum(((p - r) ** 2).sum() for p, r in zip(params, refs)) ** 0.5
    return None if diff <= 0.02 * travelled else f"distance to torch.optim.Muon {float(diff):.3g} > 2% of {float(travelled):.3g}"
