"""Batched Newton-Schulz orthogonalization ("zeropower") for Muon, in torch ops.

    O = zeropower(G)   # G: [..., m, n]  ->  O ~= U S' V^T  with  G = U S V^T,  S' in ~[0.7, 1.2]

Same-shape matrices are stacked and run through one bmm/baddbmm chain (``orthogonalize``), not
one matmul chain per parameter. fusedopt.Muon feeds ``iterate`` from a fused kernel that does the
momentum, the normalization and the bf16 cast in two passes (csrc/include/fusedopt/math/muon.h);
``zeropower`` is the same chain from any input, in torch ops.

Numerics (each choice is a fix for a failure seen in other implementations):
- Normalization is done in fp32, per matrix, before the cast to the iteration dtype. The input is
  first divided by its max |x|, so the Frobenius norm is computed on values in [-1, 1]: squaring
  1e-22 underflows in fp32 (torch's norm is then 0.1% off at ||X|| = 1e-20) and squaring 1e30
  overflows to inf. The divisor is max(||X|| * safety, eps, fp32 tiny), so NS(0) = 0 with no NaN,
  and with the default eps=0 NS(c X) = NS(X) for every c that keeps X in the fp32 range
  (bit-exactly when c is a power of two).
- The iteration runs in bf16 by default (as torch.optim.Muon and Keller Jordan's reference).
- The input is never written: a no-op dtype cast returns the same tensor, so an in-place divide
  would silently rescale the caller's momentum buffer or grad (pytorch PR #194664).
"""
from __future__ import annotations

import numbers

from collections.abc import Sequence

import torch

from fusedopt._ops import nvtx_range, symmetric_gram

Triple = tuple[float, float, float]

# Keller Jordan's quintic: one (a, b, c) for every iteration; output singular values ~[0.7, 1.2].
KJ_QUINTIC: Triple = (3.4445, -4.775, 2.0315)
# Polar Express (Amsel et al., arXiv 2505.16932), 5 iterations, as modded-nanogpt and dion use it
# together with a 1.02 safety factor on the norm (POLAR_EXPRESS_SAFETY).
POLAR_EXPRESS: tuple[Triple, ...] = (
    (8.1566, -22.4833, 15.8788),
    (4.0429, -2.8089, 0.5000),
    (3.8917, -2.7725, 0.5061),
    (3.2858, -2.3681, 0.4645),
    (2.3465, -1.7098, 0.4232),
)
POLAR_EXPRESS_SAFETY = 1.02
MAX_STEPS = 100  # torch.optim.Muon's limit

_TINY = torch.finfo(torch.float32).tiny


def schedule_of(coefficients: Triple | Sequence[Triple], steps: int) -> list[Triple]:
    """The (a, b, c) of each iteration. One triple is used for every step; with a list, step t
    uses entry min(t, len - 1), i.e. the last triple repeats when steps > len (as Polar Express)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps < MAX_STEPS:
        raise ValueError(f"ns_steps must be an int in [1, {MAX_STEPS}), got {steps!r}")
    shape_error = ValueError(f"Newton-Schulz coefficients must be one (a, b, c) triple or a list of them, got {coefficients!r}")
    try:
        coefficients = list(coefficients)
    except TypeError:
        raise shape_error from None
    if coefficients and all(isinstance(v, numbers.Real) for v in coefficients):
        if len(coefficients) != 3:
            raise shape_error
        coefficients = [tuple(coefficients)]
    triples = []
    for t in coefficients:
        try:
            t = tuple(float(v) for v in t)
        except TypeError:
            raise shape_error from None
        if len(t) != 3:
            raise ValueError(f"Newton-Schulz coefficients must be (a, b, c) triples, got {t!r}")
        triples.append(t)
    if not triples:
        raise ValueError("empty Newton-Schulz coefficient schedule")
    return [triples[min(t, len(triples) - 1)] for t in range(steps)]


def normalize(x: torch.Tensor, eps: float = 0.0, safety: float = 1.0) -> torch.Tensor:
    """x / max(||x||_F * safety, eps, tiny) per matrix over the last two dims, as a new fp32 tensor."""
    x = x.float()  # may alias the caller's tensor when it is fp32: only out-of-place ops below
    scale = x.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(_TINY)
    norm = torch.linalg.vector_norm(x / scale, dim=(-2, -1), keepdim=True) * scale
    return x / (norm * safety).clamp_min(max(float(eps), _TINY))


def zeropower(
    g: torch.Tensor,
    coefficients: Triple | Sequence[Triple] = KJ_QUINTIC,
    steps: int = 5,
    *,
    eps: float = 0.0,
    safety: float = 1.0,
    dtype: torch.dtype = torch.bfloat16,
    kernel: str = "torch",
) -> torch.Tensor:
    """Orthogonalize every matrix of g ([..., m, n]); returns a new tensor of ``dtype``, g's shape."""
    if g.ndim < 2:
        raise ValueError(f"zeropower needs a matrix or a batch of matrices, got shape {tuple(g.shape)}")
    return iterate(normalize(g, eps, safety).to(dtype), schedule_of(coefficients, steps), kernel)


KERNELS = ("torch", "symmetric")


def check_kernel(kernel: str, x: torch.Tensor | None = None) -> None:
    """kernel must be one of KERNELS; 'symmetric' runs on bf16 CUDA matrices only."""
    if kernel not in KERNELS:
        raise ValueError(f"ns_kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "symmetric" and x is not None and (x.device.type != "cuda" or x.dtype != torch.bfloat16):
        raise ValueError("ns_kernel='symmetric' (fusedopt's CUDA X X^T kernel) needs bfloat16 CUDA matrices, got "
                         f"{x.dtype} on {x.device}; use ns_kernel='torch' on the CPU")


def cpu_has_16bit_matmul(dtype: torch.dtype) -> bool:
    """Whether torch's CPU GEMMs in dtype run on the CPU's own 16-bit instructions (through
    oneDNN). Where they do not, a 16-bit product is computed as an fp32 GEMM on the 16-bit values,
    rounded back to 16 bits: the 16-bit GEMM's own arithmetic (products of 8- or 11-bit mantissas
    are exact in fp32, sums are fp32, one rounding per result; only the summation order differs).
    Measured, batch of 8 x 512^3, 2 threads: on a Zen 3 (no AVX512-BF16) a bf16 bmm took 1.6 s
    against 22 ms in fp32; on a Sapphire-Rapids-class Xeon 0.92 ms for bf16 (AMX) and 6.7 ms for
    fp16 (AVX512-FP16) against 6.9 ms in fp32 (bench/cpu_paths.py, results/xeon_avx512_amx/).

    bf16 asks for AVX512-BF16 itself: oneDNN reports bf16 support on any AVX-512 CPU, where it
    emulates it. The probes are torch's private ones; one that is missing counts as no."""
    if dtype not in (torch.bfloat16, torch.float16):
        return True
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False  # without oneDNN, torch's 16-bit CPU GEMMs are its slow reference loops
    try:
        if dtype == torch.bfloat16:
            return bool(torch.cpu._is_avx512_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def iterate(x: torch.Tensor, schedule: Sequence[Triple], kernel: str = "torch") -> torch.Tensor:
    """The Newton-Schulz iterations on already normalized matrices x ([..., m, n], in the dtype
    they run in): one (a, b, c) per iteration. Returns a new tensor; x is not written.

    kernel='torch' runs the three products as torch bmm/baddbmm; 'symmetric' computes the two
    symmetric ones (A = X X^T, B = b A + c A A) with fusedopt's CUDA kernel, which does only the
    tiles on and above the diagonal, and keeps cuBLAS for a X + B X."""
    check_kernel(kernel, x)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the short side: X X^T is min(m, n)^2
        x = x.mT
    shape = x.shape
    x = x.reshape(-1, shape[-2], shape[-1])
    dtype = x.dtype
    via_fp32 = x.device.type == "cpu" and not cpu_has_16bit_matmul(dtype)

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).float() if via_fp32 else t

    if via_fp32:
        x = x.float()
    for a, b, c in schedule:
        if kernel == "symmetric":
            gram = symmetric_gram(x)
            poly = symmetric_gram(gram, gram, alpha=c, beta=b)  # A A = A A^T: A is exactly symmetric
        else:
            gram = rounded(torch.bmm(x, x.mT))
            poly = rounded(torch.baddbmm(gram, gram, gram, beta=b, alpha=c))  # b*A + c*A@A
        x = rounded(torch.baddbmm(x, poly, x, beta=a))  # a*X + B@X
    x = x.to(dtype)
    x = x.reshape(shape)
    return x.mT if tall else x


def orthogonalize(mats: Sequence[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    """zeropower of each 2-D matrix, run as one batched call per (shape, device); order is kept.
    The stack is a copy, so the inputs (momentum buffers, grads) are never written."""
    by_shape: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        if m.ndim != 2:
            raise ValueError(f"orthogonalize takes 2-D matrices, got shape {tuple(m.shape)} at index {i}")
        by_shape.setdefault((tuple(m.shape), m.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(mats)
    for (shape, device), idx in by_shape.items():
        with nvtx_range(f"fusedopt.newton_schulz {len(idx)}x{shape[0]}x{shape[1]}", device):
            batch = zeropower(torch.stack([mats[i] for i in idx]), **kwargs)
        for i, o in zip(idx, batch.unbind(0)):
            out[i] = o
    return out  # type: ignore[return-value]
