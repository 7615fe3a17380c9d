"""fusedopt.quant: the dynamic maps and blockwise quantization (native rounding vs a torch reference)."""
import pytest
import torch

from fusedopt import quant
from reference import block_absmax, reference_quantize

SMAP, UMAP = quant.dynamic_map(True), quant.dynamic_map(False)


def _bnb_dynamic_map(signed):
    """bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8), transcribed."""
    data = []
    for i in range(7):
        n = 2**i if signed else 2 ** (i + 1)
        b = torch.linspace(0.1, 1, n + 1)
        means = ((b[:-1] + b[1:]) / 2.0) * 10 ** (i - 6)
        data += means.tolist() + ((-means).tolist() if signed else [])
    return torch.tensor(sorted(data + [0.0, 1.0]))


@pytest.mark.parametrize("signed", [True, False])
def test_map_properties(signed):
    q = quant.dynamic_map(signed)
    assert q.dtype == torch.float32 and q.shape == (256,)
    assert bool((q[1:] > q[:-1]).all())  # strictly increasing: binary search and nearest are well defined
    assert q[quant.zero_code(signed)].item() == 0.0
    assert q[-1].item() == 1.0
    assert q[0].item() == (-1.0 if signed else 0.0)
    # dynamic: the decade [10^-k, 10^(1-k)) holds 2^(8-k) values for k = 1..7 (the signed map
    # splits them between the signs; -1 took one negative slot of the top decade)
    for k in range(1, 8):
        in_decade = ((q.abs() >= 10.0**-k) & (q.abs() < 10.0 ** (1 - k))).sum().item()
        assert in_decade == 2 ** (8 - k) - (1 if signed and k == 1 else 0)
    assert (q.abs() < 1e-7).sum().item() == 1  # nothing but 0 below the last decade


@pytest.mark.parametrize("signed", [True, False])
def test_map_is_bitsandbytes_dynamic_map_except_minus_one(signed):
    ours, bnb = quant.dynamic_map(signed), _bnb_dynamic_map(signed)
    if signed:
        assert bnb[0].item() == pytest.approx(-0.99297, abs=1e-5)  # bnb cannot represent -1
        ours, bnb = ours[1:], bnb[1:]
    torch.testing.assert_close(ours, bnb, rtol=1e-6, atol=0)  # ours: float64 math, rounded once


def _data(n, scale_spread=True):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    if scale_spread:  # blocks of very different scales, some elements tiny, one block all zero
        x = x * torch.logspace(-6, 2, n).flip(0)[torch.randperm(n, generator=g)]
        x[256:512] = 0.0
    return x


def _hard_inputs(q):
    """Where a table-guided search could slip: every map value, the float midpoints between
    neighbours and the floats just around both, every bucket edge of math/quant8.h (powers of two
    and 1/128 steps of each binade down to 2^-30), and a log-uniform sweep of [-1, 1]."""
    mids = (q[1:] + q[:-1]) / 2
    pts = torch.cat([q, mids])
    edges = torch.cat([2.0 ** torch.arange(-30, 1).float() * (1 + torch.arange(128).float()[:, None] / 128)]).flatten()  # bucket edges: 2**kSearchMantissaBits per binade
    pts = torch.cat([pts, edges[edges <= 1], -edges[edges <= 1]])
    ulp = [torch.nextafter(pts, torch.full_like(pts, d)) for d in (2.0, -2.0)]
    sweep = torch.logspace(-12, 0, 400_000)
    x = torch.cat([pts, *ulp, sweep, -sweep, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    return x.clamp(q[0].item(), q[-1].item())


def _maps_for_search_tests():
    """The two dynamic maps, and two whose range is not [-1, 1] (the coarse table's buckets are
    then clipped to it): the signed map scaled by 0.75, and one whose negative half is squeezed."""
    return {"signed": SMAP, "unsigned": UMAP, "scaled": SMAP * 0.75,
            "asymmetric": torch.cat([SMAP[SMAP < 0] * 0.8, SMAP[SMAP >= 0]])}


def _blocks_led_by_one(y):
    """y in blocks of 255 after a 1, so every block's absmax is 1 (the maps reach at most 1 and
    x * inv == x)."""
    y = torch.nn.functional.pad(y, (0, (-y.numel()) % 255))
    return torch.cat([torch.ones(y.numel() // 255, 1), y.view(-1, 255)], dim=1).flatten()


def _expected_quantizer(quantizer, coarse):
    return "avx512 gather" if quantizer == "avx512 byte permutes" and not coarse else quantizer


@pytest.mark.parametrize("which", ["signed", "unsigned", "scaled", "asymmetric"])
@pytest.mark.parametrize("coarse", [True, False], ids=["coarse_table", "no_coarse_table"])
def test_table_search_equals_reference_at_every_edge(which, coarse, quantizer):
    """Every tier's search, and in the AVX-512 tier both (the byte-permute search of
    math/quant8_coarse.h's table, which needs VBMI; the gather from QuantMap::bucket, which also
    serves maps built without that table), give the reference's codes at every edge."""
    q = _maps_for_search_tests()[which]
    y = _hard_inputs(q)
    if which == "unsigned":
        y = y.abs()
    x = _blocks_led_by_one(y)
    qm = _built_map(q, coarse)
    assert _has_coarse_table(qm) == coarse
    from fusedopt._ext import lib
    assert lib().cpu_quantizer(qm.data_ptr()) == _expected_quantizer(quantizer, coarse)
    codes, absmax = _raw_quantize(x, qm)
    assert bool((absmax == 1).all())
    assert torch.equal(codes, reference_quantize(x, absmax, q))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("coarse", [True, False], ids=["coarse_table", "no_coarse_table"])
def test_every_float_of_the_densest_binade(signed, coarse, avx512_quantizer):
    """All 2^23 floats of [0.5, 1) (and their negatives in the signed map), where the maps hold
    the most codes per binade and the coarse table the most changes per bucket."""
    y = torch.arange(0x3F000000, 0x3F800000, dtype=torch.int32).view(torch.float32)
    if signed:
        y = torch.cat([y, -y])
    q = quant.dynamic_map(signed)
    x = _blocks_led_by_one(y)
    qm = _built_map(q, coarse)
    assert _has_coarse_table(qm) == coarse
    codes, absmax = _raw_quantize(x, qm)
    assert torch.equal(codes, reference_quantize(x, absmax, q))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 5000, 70001])
def test_native_quantizer_equals_torch_reference_bitwise(signed, n, quantizer):
    x = _data(n)
    if not signed:
        x = x.abs()
    codes, absmax = quant.quantize_blockwise(x, signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.shape == (quant.num_blocks(n),)
    assert torch.equal(absmax, block_absmax(x))
    q = quant.dynamic_map(signed)
    assert torch.equal(codes.long(), reference_quantize(x, absmax, q))
    back = quant.dequantize_blockwise(codes, absmax, signed)
    assert torch.equal(back, q[codes.long()] * absmax.repeat_interleave(256)[:n])


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_per_block(signed):
    """Each element lands on its nearest map entry, so its error is at most half the gap of the
    map interval around x/absmax (times absmax). That gives per-block bounds of 0.0036 * absmax
    (unsigned) and 0.0106 * absmax (signed; the widest gap is next to -1, see quant.py); nonzero
    elements nudged off zero are within the smallest nonzero entry of it."""
    x = _data(70001)
    if not signed:
        x = x.abs()
    q = quant.dynamic_map(signed)
    codes, absmax = quant.quantize_blockwise(x, signed)
    back = quant.dequantize_blockwise(codes, absmax, signed)
    scale = absmax.repeat_interleave(256)[: x.numel()]
    y = x / torch.where(scale > 0, scale, torch.ones_like(scale))
    lo = (torch.searchsorted(q, y, right=True) - 1).clamp(0, 254)
    half_gap = (q[lo + 1] - q[lo]) / 2
    err = (x - back).abs()
    smallest = q[quant.zero_code(signed) + 1]
    nudgeable = y.abs() < smallest  # 0 < |y| < smallest nonzero entry: 0 or the nudge, both within it
    bound = torch.where(nudgeable, smallest, half_gap) * scale * (1 + 1e-6)
    assert bool((err <= bound).all())
    per_block = torch.nn.functional.pad(err, (0, (-x.numel()) % 256)).view(-1, 256).amax(1)
    assert bool((per_block <= (0.0106 if signed else 0.0036) * absmax * (1 + 1e-6)).all())
    # ...and far below that where it matters: the mean error on a Gaussian block is ~0.1% of absmax
    assert (err / scale.clamp_min(1e-30)).mean().item() < 2e-3


@pytest.mark.parametrize("signed", [True, False])
def test_extremes_zeros_and_all_zero_blocks_are_exact(signed):
    x = torch.zeros(1024)
    x[:256] = torch.rand(256) + 0.1
    x[3] = 7.5  # the block's largest magnitude round-trips exactly
    if signed:
        x[256:512] = -(torch.rand(256) + 0.1)
        x[300] = -9.25  # exact with either sign: -1 is in the signed map
    x[600] = 0.0  # zeros inside a nonzero block
    x[512:] = 0.0
    x[700] = 1e-3
    codes, absmax = quant.quantize_blockwise(x, signed)
    back = quant.dequantize_blockwise(codes, absmax, signed)
    assert back[3].item() == 7.5 and absmax[0].item() == 7.5
    if signed:
        assert back[300].item() == -9.25
    assert absmax[3].item() == 0.0 and bool((back[768:] == 0).all())
    assert bool((codes[768:] == quant.zero_code(signed)).all())
    assert back[600].item() == 0.0 and back[700].item() == x[700].item()  # alone in its block: exact


@pytest.mark.parametrize("signed", [True, False])
def test_denormal_absmax_keeps_zeros_and_signs(signed, quantizer):
    # 1 / absmax overflows below 2.9e-39: such a block must not turn its zeros into NaN and -1.
    x = torch.zeros(512)
    x[:4] = torch.tensor([1e-40, 5e-41, -1e-41, 0.0])
    x[256:259] = torch.tensor([4e-39, -1e-39, 1e-45])  # 1 / 4e-39 is finite: quantized normally
    if not signed:
        x = x.abs()
    codes, absmax = quant.quantize_blockwise(x, signed)
    assert torch.equal(codes.long(), reference_quantize(x, absmax, quant.dynamic_map(signed)))
    zero = quant.zero_code(signed)
    assert bool((codes[x == 0] == zero).all())
    assert bool((codes[x > 0] > zero).all()) and bool((codes[x < 0] < zero).all())
    back = quant.dequantize_blockwise(codes, absmax, signed)
    assert bool(torch.isfinite(back).all()) and bool(((back - x).abs() <= absmax.repeat_interleave(256)).all())
    assert back[256].item() == x[256].item()  # the normal block's largest element round-trips


def test_signed_codes_keep_the_sign_of_tiny_values():
    x = torch.tensor([1.0, 1e-12, -1e-12, 3e-8, -3e-8, 0.0] + [0.5] * 250)
    codes, absmax = quant.quantize_blockwise(x, True)
    back = quant.dequantize_blockwise(codes, absmax, True)
    assert torch.equal(back.sign(), x.sign())


def test_blocks_follow_memory_order():
    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last)
    codes, absmax = quant.quantize_blockwise(x, True)
    assert codes.stride() == x.stride()
    flat_codes, flat_absmax = quant.quantize_blockwise(quant.memory_order_flat(x).clone(), True)
    assert torch.equal(quant.memory_order_flat(codes), flat_codes) and torch.equal(absmax, flat_absmax)
    back = quant.dequantize_blockwise(codes, absmax, True)
    assert back.stride() == x.stride() and (back - x).abs().max().item() <= 0.0106 * x.abs().max().item()


def test_non_finite_or_negative_input_is_refused():
    with pytest.raises(ValueError, match="inf or NaN"):
        quant.quantize_blockwise(torch.tensor([1.0, float("nan")]), True)
    with pytest.raises(ValueError, match=">= 0"):
        quant.quantize_blockwise(torch.tensor([1.0, -1.0]), False)
    with pytest.raises(ValueError, match="absmax"):
        quant.dequantize_blockwise(torch.zeros(300, dtype=torch.uint8), torch.ones(1), True)


def _raw_quantize(x, qm):
    """Codes of x through the native entry point, below the Python checks (qm: a built map)."""
    from fusedopt._ext import lib
    codes = torch.empty(x.numel(), dtype=torch.uint8)
    absmax = torch.empty(quant.num_blocks(x.numel()))
    lib().quantize_blockwise(x.data_ptr(), x.numel(), qm.data_ptr(), codes.data_ptr(), absmax.data_ptr(), 1)
    return codes.long(), absmax


def _built_map(values, coarse=True):
    from fusedopt._ext import lib
    qm = torch.empty(lib().quant_map_bytes(), dtype=torch.uint8)
    lib().build_quant_map(values.data_ptr(), qm.data_ptr(), coarse)
    return qm


def _has_coarse_table(qm):
    from fusedopt._ext import lib
    return lib().quant_map_has_coarse_table(qm.data_ptr())


def test_auto_quantizer_takes_the_byte_permutes_on_amd_only(tier):
    """The byte permutes beat the gather where AMD microcodes it and lose to it on Intel
    (cpu/parallel.h gives the numbers), so the default asks the vendor; both give the same codes
    (test_table_search_equals_reference_at_every_edge)."""
    from conftest import cpu_flags
    from fusedopt._ext import lib
    flags, vendor = cpu_flags()
    qm = quant.quant_map(True)
    if tier != "avx512":
        assert lib().cpu_quantizer(qm.data_ptr()) == {"baseline": "scalar", "avx2": "avx2"}[tier]
        return
    permutes = "avx512vbmi" in flags and vendor == "AuthenticAMD"
    assert lib().cpu_quantizer(qm.data_ptr()) == ("avx512 byte permutes" if permutes else "avx512 gather")


def test_bad_quantizer_name_is_refused_and_keeps_the_choice():
    from fusedopt._ext import lib
    qm = quant.quant_map(True)
    before = lib().cpu_quantizer(qm.data_ptr())
    with pytest.raises(ValueError, match="'permute'.*auto, byte_permutes, gather"):
        lib().set_cpu_quantizer("permute")
    assert lib().cpu_quantizer(qm.data_ptr()) == before


def test_coarse_table_holds_the_dynamic_maps_and_refuses_denser_ones():
    """The optimizers' maps get the 256-bucket table (their AVX-512 VBMI quantizer does not
    gather); a map that 127 buckets per sign cannot hold does not, and is then quantized by the
    gather (test_map_with_zero_as_its_top_code_on_every_quantizer: all 255 nonzero codes of this one
    are negative)."""
    assert _has_coarse_table(quant.quant_map(True)) and _has_coarse_table(quant.quant_map(False))
    assert not _has_coarse_table(_built_map(-torch.flip(UMAP, [0])))
    # Negative codes squeezed into [-0.3, 0): the two signs' dense binades no longer coincide.
    assert not _has_coarse_table(_built_map(torch.cat([SMAP[SMAP < 0] * 0.3, SMAP[SMAP >= 0]])))


def test_raw_quantizer_keeps_negative_values_at_zero_in_the_unsigned_map_on_every_quantizer(quantizer):
    """The unsigned map has no negative code: below the Python checks (which refuse such input),
    the native rounding sends x < 0 to the zero code, never wrapping to 255, in every quantizer."""
    x = torch.cat([-torch.rand(300), torch.rand(300)])
    codes, absmax = _raw_quantize(x, quant.quant_map(False))
    assert bool((codes[:300] == quant.UNSIGNED_ZERO_CODE).all())
    assert torch.equal(codes, reference_quantize(x.clamp(min=0), absmax, UMAP))  # x < 0 codes as x = 0


def test_map_with_zero_as_its_top_code_on_every_quantizer(quantizer):
    """A map of values in [-1, 0] (zero_code 255, no code above zero): positive x stays at the
    zero code, negative x follows the nearest-entry rule, in every quantizer. (Only the raw entry point
    takes such a map: the optimizers use the two dynamic maps.)"""
    values = -torch.flip(quant.dynamic_map(False), [0])
    g = torch.Generator().manual_seed(3)
    x = torch.cat([-torch.rand(700, generator=g) ** 3, torch.rand(300, generator=g), torch.zeros(24)])
    x = x[torch.randperm(x.numel(), generator=g)]
    codes, absmax = _raw_quantize(x, _built_map(values))
    expected = reference_quantize(x.clamp(max=0), absmax, values)  # x > 0 keeps the zero code, as x = 0
    assert torch.equal(codes, expected)
    assert bool((codes[x >= 0] == 255).all())


@pytest.mark.parametrize("which", ["signed", "unsigned", "zero_on_top"])
@pytest.mark.parametrize("coarse", [True, False], ids=["coarse_table", "no_coarse_table"])
def test_raw_quantizer_on_non_finite_blocks_and_signed_zeros(which, coarse, quantizer):
    """Below the Python checks, a block holding inf or NaN has absmax inf or NaN, so 1 / absmax is
    taken as 0 and every x * inv is +-0 (finite x) or NaN (inf, NaN): finite nonzero x keep their
    sign's code next to zero and zeros of either sign the zero code; a NaN y rounds to the map's
    lowest value, which is 0 in the unsigned map, where the sign rule then moves +inf up and keeps
    NaN and -inf at the zero code (math/quant8.h's zero_forced). Written out per element; the
    same in every quantizer."""
    values = {"signed": SMAP, "unsigned": UMAP, "zero_on_top": -torch.flip(UMAP, [0])}[which]
    zc = int((values == 0).nonzero())
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-45, 1e-38, -3.0, 2.5e38])
    x = torch.cat([special.repeat(26)[:256], special.roll(3).repeat(26)[:256] * -1.0])  # two blocks, inf in both
    qm = _built_map(values, coarse)
    assert _has_coarse_table(qm) == (coarse and which != "zero_on_top")  # see test_coarse_table_holds_...
    codes, _ = _raw_quantize(x, qm)
    down = zc - 1 if zc > 0 else zc
    up = zc + 1 if zc < 255 else zc
    nearest = torch.where(x.isnan() | x.isinf(), 0, zc)  # of y = map[0] or +-0
    at_zero = nearest == zc
    expected = torch.where(at_zero & (x > 0), up, torch.where(at_zero & (x < 0), down, nearest))
    assert torch.equal(codes, expected)
