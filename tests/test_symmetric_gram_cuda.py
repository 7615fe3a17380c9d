"""The symmetric X X^T kernel (csrc/cuda/symmetric_gram.cu) and Newton-Schulz / Muon through it,
against fp64 references and torch's bmm path. The CUDA tests skip where no GPU or no CUDA build is
present (written without a GPU: not yet run); the argument checks run everywhere."""
import pytest
import torch

import fusedopt
from conftest import requires_cuda
from fusedopt import newton_schulz as ns
from fusedopt._ops import symmetric_gram

# Rows and cols around the 128-row tile and the 32-column k step, odd sizes (scalar loads), 1.
SHAPES = [(1, 1), (1, 40), (17, 7), (128, 32), (130, 64), (300, 1000), (257, 8)]


def _bound(x64: torch.Tensor, cols: int, c64=None, alpha=1.0, beta=0.0) -> torch.Tensor:
    """Per-element error allowed: the bf16 rounding of the result (half an ulp: 2^-9 relative, 2^-8
    allowed) plus fp32 accumulation over cols products of bf16 inputs (exact products; each add
    rounds at 2^-24 of the running sum, bounded by the sum of |products|)."""
    mag = alpha * (x64.abs() @ x64.abs().mT)
    if c64 is not None:
        mag = mag + abs(beta) * c64.abs()
    return 2.0**-8 * mag + cols * 2.0**-23 * mag + 1e-30


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_gram_matches_fp64_and_is_exactly_symmetric(rows, cols):
    x = torch.randn(3, rows, cols, device="cuda").bfloat16()
    out = symmetric_gram(x)
    x64 = x.double()
    ref = x64 @ x64.mT
    assert out.dtype == torch.bfloat16 and out.shape == (3, rows, rows)
    assert torch.equal(out, out.mT)
    assert bool(((out.double() - ref).abs() <= _bound(x64, cols)).all())


@requires_cuda
@pytest.mark.cuda
def test_a_batch_past_one_launchs_65535_matrices_is_sliced():
    """gridDim.y caps a launch at 65535 matrices; the last slice holds two, with C and an offset."""
    x = torch.randn(65537, 3, 8, device="cuda").bfloat16()
    c = torch.randn(65537, 3, 3, device="cuda").bfloat16()
    c = c + c.mT
    out = symmetric_gram(x, c, alpha=0.5, beta=2.0)
    x64, c64 = x.double(), c.double()
    ref = 0.5 * (x64 @ x64.mT) + 2.0 * c64
    assert torch.equal(out, out.mT)
    assert bool(((out.double() - ref).abs() <= _bound(x64, 8, c64, 0.5, 2.0)).all())


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("rows,cols", [(64, 64), (200, 200), (384, 96)])
def test_polynomial_term_matches_fp64(rows, cols):
    """b A + c A A with A from the kernel itself, as Newton-Schulz uses it."""
    x = (torch.randn(2, rows, cols, device="cuda") / cols**0.5).bfloat16()
    a = symmetric_gram(x)
    b, c = -4.775, 2.0315
    out = symmetric_gram(a, a, alpha=c, beta=b)
    a64 = a.double()
    ref = b * a64 + c * (a64 @ a64)
    assert torch.equal(out, out.mT)
    assert bool(((out.double() - ref).abs() <= _bound(a64, rows, a64, c, b)).all())


@requires_cuda
@pytest.mark.cuda
def test_inputs_are_not_written_and_a_side_stream_gives_the_same_bits():
    x = torch.randn(4, 150, 70, device="cuda").bfloat16()
    before = x.clone()
    ref = symmetric_gram(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = symmetric_gram(x)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, ref) and torch.equal(x, before)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(8, 256, 256), (4, 96, 300), (4, 300, 96)])
def test_newton_schulz_through_the_kernel_equals_the_torch_path(shape, monkeypatch):
    """Both run 5 bf16 iterations; they differ only in the rounding of the symmetric products, so the
    outputs agree to a few bf16 ulps of the O(1) result, and so do their singular values.

    The quintic's band (singular values in ~[0.7, 1.2]) holds for the rectangular shapes only: a
    square Gaussian matrix has singular values near 0 (normalized, the smallest of a 256 x 256 one is
    about 1e-5) that 5 iterations cannot lift (the torch path itself leaves them at 0.004-0.01). There
    the kernel's singular values are compared with the torch path's, matrix by matrix, within 0.02:
    by Weyl's inequality they differ by at most ||O_sym - O_ref||_2, and the bf16 rounding of the
    outputs alone (2^-9 of each entry, about 1/sqrt(n)) puts that near 2^-8; measured on the CPU with
    the symmetric products rounded once from fp64 against torch's bf16 bmm path, at most 0.0042
    over 20 seeds x 8 matrices (relative Frobenius difference 0.0055)."""
    calls = []
    monkeypatch.setattr(ns, "symmetric_gram", lambda *a, **k: calls.append(1) or symmetric_gram(*a, **k))
    g = torch.randn(shape, device="cuda")
    o_sym = ns.zeropower(g, kernel="symmetric").float()
    assert len(calls) == 2 * 5  # the kernel ran (X X^T and A A per iteration), not the torch path
    o_ref = ns.zeropower(g).float()
    assert (o_sym - o_ref).norm() <= 0.02 * o_ref.norm()
    s = torch.linalg.svdvals(o_sym)
    assert bool((s < 1.25).all())
    if shape[-2] != shape[-1]:
        assert bool((s > 0.6).all())
    else:
        s_ref = torch.linalg.svdvals(o_ref)
        assert float((s - s_ref).abs().max()) <= 0.02


@requires_cuda
@pytest.mark.cuda
def test_muon_with_the_symmetric_kernel_tracks_the_default_over_50_steps(monkeypatch):
    calls = []
    monkeypatch.setattr(ns, "symmetric_gram", lambda *a, **k: calls.append(1) or symmetric_gram(*a, **k))
    torch.manual_seed(0)
    shapes = [(256, 256)] * 4 + [(512, 128), (64, 3, 3, 3)]
    init = [torch.randn(s, device="cuda") for s in shapes]
    runs = {}
    for kernel in ("torch", "symmetric"):
        ps = [t.clone().requires_grad_() for t in init]
        opt = fusedopt.Muon(ps, lr=0.02, ns_kernel=kernel)
        gen = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(50):
            for p in ps:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            opt.step()
        runs[kernel] = ps
        assert bool(calls) == (kernel == "symmetric")  # ns_kernel reached Newton-Schulz
    travelled = sum(((p - i) ** 2).sum() for p, i in zip(runs["torch"], init)) ** 0.5
    diff = sum(((p - q) ** 2).sum() for p, q in zip(runs["symmetric"], runs["torch"])) ** 0.5
    assert diff <= 0.02 * travelled


# --- argument checks (no GPU needed) ----------------------------------------------------------
def test_symmetric_kernel_refuses_cpu_and_non_bf16_input():
    with pytest.raises(ValueError, match="bfloat16 CUDA"):
        symmetric_gram(torch.randn(2, 4, 4).bfloat16())
    with pytest.raises(ValueError, match="needs bfloat16 CUDA matrices"):
        ns.zeropower(torch.randn(4, 4), kernel="symmetric")


def test_muon_names_the_kernel_option_and_the_fix():
    p = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="ns_kernel must be one of"):
        fusedopt.Muon([p], ns_kernel="cublas")
    with pytest.raises(ValueError, match="use ns_kernel='torch' for CPU params"):
        fusedopt.Muon([p], ns_kernel="symmetric")
