"""The CPU loops are compiled for several instruction sets (cpu/parallel.h picks the widest the CPU
has): every tier this machine can run must give bitwise the same params and states."""
import pytest
import torch

import fusedopt
from fusedopt._ext import lib
from conftest import CPU_TIERS

OPTIMIZERS = {
    "AdamW": lambda ps: fusedopt.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "AdamW master": lambda ps: fusedopt.AdamW(ps, lr=1e-2, weight_decay=0.1, master_weights=True),
    "AdamW bf16 states": lambda ps: fusedopt.AdamW(ps, lr=1e-2, weight_decay=0.1, state_dtype=torch.bfloat16),
    "AdamW8bit": lambda ps: fusedopt.AdamW8bit(ps, lr=1e-2, weight_decay=0.1, min_8bit_size=0),
    "AdamW8bit master": lambda ps: fusedopt.AdamW8bit(ps, lr=1e-2, weight_decay=0.1, min_8bit_size=0, master_weights=True),
    "Lion": lambda ps: fusedopt.Lion(ps, lr=1e-3, weight_decay=0.1, state_dtype=torch.bfloat16),
    "Lion8bit": lambda ps: fusedopt.Lion8bit(ps, lr=1e-3, weight_decay=0.1, min_8bit_size=0),
}


def _tiers():
    seen = []
    try:
        for name in CPU_TIERS:
            lib().set_cpu_isa_limit(name)
            if lib().cpu_isa() == name:
                seen.append(name)
    finally:
        lib().set_cpu_isa_limit("avx512")
    return seen


@pytest.fixture
def isa():
    if len(_tiers()) < 2:
        pytest.skip("this CPU runs only the baseline instruction set: nothing to compare")

    def use(name):
        lib().set_cpu_isa_limit(name)
        assert lib().cpu_isa() == name

    yield use
    lib().set_cpu_isa_limit("avx512")


def _run(make, dtype):
    """Subnormal params beside zero grads (p * decay stays subnormal) and grads of ~1e-18 (v
    subnormal): the AVX-512 tier's bf16 stores (cpu/tile_io.h) take another path for those."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(n, generator=g) for n in (1, 255, 4097, 70001)]
    ps[2][:64] *= 1e-39
    ps = [p.to(dtype).requires_grad_() for p in ps]
    opt = make(ps)
    for _ in range(5):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * torch.logspace(-4, 1, p.numel())).to(dtype)
        ps[2].grad[:32] = 0
        ps[2].grad[32:64] *= 1e-14
        opt.step()
    return ps, opt


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_every_instruction_set_gives_the_same_bits(name, dtype, isa):
    tiers = _tiers()
    assert tiers[0] == "baseline"
    results = {}
    # The gather quantizer on every CPU: the AVX-512 tier's pipelined 8-bit loop runs with it only
    # (auto picks the byte permutes on AMD); the next test ties the permutes to the gather.
    lib().set_cpu_quantizer("gather")
    try:
        for tier in tiers:
            isa(tier)
            results[tier] = _run(OPTIMIZERS[name], dtype)
    finally:
        lib().set_cpu_quantizer("auto")
    ref_ps, ref_opt = results["baseline"]
    for tier, (ps, opt) in results.items():
        for p, q in zip(ps, ref_ps):
            assert torch.equal(p, q), f"{tier} params differ from baseline"
            for key, v in opt.state[p].items():
                assert torch.equal(v, ref_opt.state[q][key]), f"{tier} state['{key}'] differs from baseline"


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_both_avx512_quantizers_give_the_same_bits(name, dtype):
    from conftest import cpu_flags
    lib().set_cpu_isa_limit("avx512")
    if lib().cpu_isa() != "avx512" or "avx512vbmi" not in cpu_flags()[0]:
        pytest.skip("needs AVX-512 VBMI for the byte-permute quantizer")
    results = {}
    try:
        for quantizer in ("gather", "byte_permutes"):
            lib().set_cpu_quantizer(quantizer)
            results[quantizer] = _run(OPTIMIZERS[name], dtype)
    finally:
        lib().set_cpu_quantizer("auto")
    (ps, opt), (ref_ps, ref_opt) = results["byte_permutes"], results["gather"]
    for p, q in zip(ps, ref_ps):
        assert torch.equal(p, q)
        for key, v in opt.state[p].items():
            assert torch.equal(v, ref_opt.state[q][key]), key


def test_bad_isa_name_is_refused():
    with pytest.raises(ValueError, match="avx3"):
        lib().set_cpu_isa_limit("avx3")
    assert fusedopt.backends()["cpu_isa"] in ("baseline", "avx2", "avx512")


def test_muon_elementwise_passes_give_the_same_bits_on_every_instruction_set(isa):
    """Muon's native momentum/normalize/cast and update passes (math/muon.h); the lerps use fmaf,
    a libm call on the baseline tier and an instruction on the others: the same bits."""
    results = {}
    for tier in _tiers():
        isa(tier)
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=g).to(torch.bfloat16).requires_grad_() for s in [(64, 96), (64, 96), (130, 40), (33, 47)]]
        opt = fusedopt.Muon(ps, lr=0.02, weight_decay=0.1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()
        results[tier] = (ps, opt)
    ref_ps, ref_opt = results["baseline"]
    for tier, (ps, opt) in results.items():
        for p, q in zip(ps, ref_ps):
            assert torch.equal(p, q), tier
            assert torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]), tier
