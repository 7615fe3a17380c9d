"""The 16-bit rounding code shared by both backends (csrc/include/fusedopt/dtype.h) against
torch's casts: exhaustive over every 16-bit pattern, and over a wide sample of floats."""
import pytest
import torch

from fusedopt._ext import lib
from fusedopt._ops import DTYPE_CODES


def _convert(src: torch.Tensor, dst_dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(src.shape, dtype=dst_dtype)
    lib().convert(src.data_ptr(), DTYPE_CODES[src.dtype], out.data_ptr(), DTYPE_CODES[dst_dtype], src.numel())
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, except that any NaN matches any NaN (payloads are not specified)."""
    both_nan = torch.isnan(a.float()) & torch.isnan(b.float())
    ia = a.view(torch.int16) if a.element_size() == 2 else a.view(torch.int32)
    ib = b.view(torch.int16) if b.element_size() == 2 else b.view(torch.int32)
    return bool(((ia == ib) | both_nan).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16bit_value_widens_exactly(dtype):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    assert _same(_convert(x, torch.float32), x.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float_to_16bit_rounds_to_nearest_even(dtype, tier):
    """Through the loops' own stores on each tier (cpu/tile_io.h: with AVX512-BF16 an instruction
    that flushes denormal inputs, which a tile holding one must not show)."""
    g = torch.Generator().manual_seed(0)
    # random bit patterns cover every exponent, subnormals, inf and NaN; one in 256 is a
    # subnormal, so most 256-element tiles hold one: the normal ones alone take the fast path
    rnd = torch.randint(-(2**31), 2**31 - 1, (4_000_000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    normal = rnd[(rnd.abs() >= torch.finfo(torch.float32).tiny) | ~torch.isfinite(rnd)]
    lone = normal[:4096].clone()
    lone[1000] = 1e-40  # one subnormal in an otherwise normal tile
    # exact ties and neighbours of every 16-bit value, where rounding mistakes show
    wide = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    wide = wide[torch.isfinite(wide)]
    nxt = torch.nextafter(wide, torch.full_like(wide, float("inf")))
    ties = (wide.double() + (nxt.double() - wide.double()) / 2).float()
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 2.0**-24, 2.0**-25, 3.4e38, float("inf"), -float("inf"), float("nan")])
    for x in (rnd, normal, lone, ties, special):
        assert _same(_convert(x, dtype), x.to(dtype))


@pytest.mark.parametrize("flush_denormal", [False, True], ids=["ieee", "daz-ftz"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_tier_gives_the_baseline_bits_nan_payloads_included(dtype, tier, flush_denormal):
    """The conversion instructions differ from dtype.h on a few inputs (cpu/tile_io.h: subnormals
    for bf16, NaN payloads for fp16 both ways); each tier must still give dtype.h's bits, also
    under torch.set_flush_denormal(True) (DAZ and FTZ in MXCSR, which some instructions honour)."""
    from fusedopt._ext import lib
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    g = torch.Generator().manual_seed(1)
    floats = torch.randint(-(2**31), 2**31 - 1, (1_000_000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    try:
        got = (_convert(halves, torch.float32), _convert(floats, dtype))
        lib().set_cpu_isa_limit("baseline")
        want = (_convert(halves, torch.float32), _convert(floats, dtype))
    finally:
        lib().set_cpu_isa_limit(tier)
        if flush_denormal:
            torch.set_flush_denormal(False)
    for a, b in zip(got, want):
        bits = torch.int16 if a.element_size() == 2 else torch.int32
        assert torch.equal(a.view(bits), b.view(bits))
