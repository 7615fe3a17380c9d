"""fusedopt.newton_schulz: singular-value bands of the coefficient schedules, NS(0) = 0, scale
invariance, batched = per-matrix, the input never written, the CPU 16-bit matmul probe."""
import pytest
import torch

from fusedopt import newton_schulz as ns


pytestmark = pytest.mark.usefixtures("one_thread")


def svd_band(o: torch.Tensor) -> tuple[float, float]:
    s = torch.linalg.svdvals(o.double())
    return s.min().item(), s.max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_quintic_singular_values_in_band(dtype, shape):
    # KJ's coefficients promise S' ~ [0.5, 1.5] (measured here: [0.68, 1.14]) for a full-rank input
    # whose normalized singular values are >= ~0.03 (random Gaussian 64x128: ~0.04).
    lo, hi = svd_band(ns.zeropower(torch.randn(8, *shape), dtype=dtype))
    assert 0.5 <= lo and hi <= 1.5


def test_cpu_16bit_matmul_probe(monkeypatch):
    assert ns.cpu_has_16bit_matmul(torch.float32) and ns.cpu_has_16bit_matmul(torch.float64)
    with monkeypatch.context() as m:  # torch's 16-bit GEMMs without oneDNN are its slow loops
        m.setattr(torch.backends.mkldnn, "is_available", lambda: False)
        assert not ns.cpu_has_16bit_matmul(torch.bfloat16) and not ns.cpu_has_16bit_matmul(torch.float16)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert not ns.cpu_has_16bit_matmul(torch.bfloat16)  # a torch without the probe: the fp32 path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_16bit_products_via_fp32_match_native_16bit_gemms(dtype, monkeypatch):
    # The two CPU paths (newton_schulz.cpu_has_16bit_matmul) differ in summation order only, far
    # below the 16-bit rounding of every product. One iteration shows it directly: the order flips
    # the rounding of a few results (measured: 0.0015% of elements in bf16, 0.014% in fp16), so the
    # paths are far closer to each other than to the fp64 iteration (0.0003x and 0.008x its
    # error); independent roundings would be about sqrt(2)x apart. Over the five iterations those
    # flips are amplified (0.14x and 0.54x apart, on a Zen 5), so there only the accuracy is
    # compared.
    x = ns.normalize(torch.randn(8, 64, 128, generator=torch.Generator().manual_seed(0)))
    for steps, apart_bound in ((1, 0.05), (5, None)):
        schedule = ns.schedule_of(ns.KJ_QUINTIC, steps)
        exact = ns.iterate(x.double(), schedule)
        out = {}
        for native in (True, False):
            monkeypatch.setattr(ns, "cpu_has_16bit_matmul", lambda d, native=native: native)
            out[native] = ns.iterate(x.to(dtype), schedule).double()
        err = {k: ((o - exact).norm() / exact.norm()).item() for k, o in out.items()}
        assert max(err.values()) <= 1.25 * min(err.values()) and max(err.values()) < 0.03
        if apart_bound is not None:
            apart = ((out[True] - out[False]).norm() / exact.norm()).item()
            assert apart <= apart_bound * min(err.values())
            assert (out[True] != out[False]).float().mean().item() < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_polar_express_schedule_is_tighter(dtype):
    o = ns.zeropower(torch.randn(8, 64, 128), ns.POLAR_EXPRESS, 5, safety=ns.POLAR_EXPRESS_SAFETY, dtype=dtype)
    lo, hi = svd_band(o)  # measured [0.857, 1.142]
    assert 0.8 <= lo and hi <= 1.2


def test_schedule_repeats_last_triple_and_checks_steps():
    assert ns.schedule_of(ns.KJ_QUINTIC, 3) == [ns.KJ_QUINTIC] * 3
    sched = ns.schedule_of(ns.POLAR_EXPRESS, 7)
    assert sched[:5] == list(ns.POLAR_EXPRESS) and sched[5:] == [ns.POLAR_EXPRESS[-1]] * 2
    assert ns.schedule_of(ns.POLAR_EXPRESS, 2) == list(ns.POLAR_EXPRESS[:2])
    for bad in (0, 100, 2.5, True):
        with pytest.raises(ValueError, match="ns_steps"):
            ns.schedule_of(ns.KJ_QUINTIC, bad)
    with pytest.raises(ValueError, match="triples"):
        ns.schedule_of([(1.0, 2.0)], 5)


def test_zero_maps_to_zero_without_nan():
    x = torch.randn(4, 16, 32)
    x[2] = 0  # a zero matrix in a batch (e.g. padding) must not disturb the others
    o = ns.zeropower(x)
    assert torch.isfinite(o).all() and (o[2] == 0).all()
    assert torch.equal(o[[0, 1, 3]], ns.zeropower(x[[0, 1, 3]]))
    assert (ns.zeropower(torch.zeros(8, 8), eps=1e-7) == 0).all()


def test_scale_invariant_down_to_tiny_norms():
    x = torch.randn(4, 64, 128)
    ref = ns.zeropower(x)
    # Powers of two rescale every fp32 step exactly, so the output is bit-identical: ||X|| ~ 1e-20
    # and ~1e-35 (where squaring in fp32 would underflow) and ~1e32 (where it would overflow).
    for k in (-66, -120, 100):
        assert torch.equal(ns.zeropower(x * 2.0**k), ref), k
    ref32 = ns.zeropower(x, dtype=torch.float32)
    for c in (1e-20, 1e-30, 3e25):
        torch.testing.assert_close(ns.zeropower(x * c, dtype=torch.float32), ref32, rtol=0, atol=1e-5)
    # torch.optim.Muon's eps semantics, when asked for: below ||X|| = eps the output shrinks
    assert ns.zeropower(x * 1e-14, eps=1e-7, dtype=torch.float32).norm() < 0.05 * ref32.norm()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batched_equals_per_matrix(dtype):
    mats = [torch.randn(32, 48), torch.randn(48, 32), torch.randn(32, 48), torch.randn(16, 16), torch.randn(32, 48)]
    batched = ns.orthogonalize(mats, dtype=dtype)
    for m, o in zip(mats, batched):
        assert o.shape == m.shape and o.dtype == dtype
        torch.testing.assert_close(o, ns.zeropower(m, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ns_never_writes_its_input(dtype):
    # The no-op cast (bf16 -> bf16, fp32 -> fp32) returns the input itself: an in-place normalize
    # would rescale it (the torch.optim.Muon bf16 bug).
    x = torch.randn(2, 24, 40, dtype=dtype)
    before = x.clone()
    ns.zeropower(x, dtype=dtype)
    ns.orthogonalize(list(x), dtype=dtype)
    assert torch.equal(x, before)
