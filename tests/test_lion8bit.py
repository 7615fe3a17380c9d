"""fusedopt.Lion8bit: Lion with a blockwise 8-bit momentum, against an independent torch reference
of the same algorithm and against fp32 fusedopt.Lion."""
import copy

import pytest
import torch

import fusedopt
from fusedopt import quant
from problems import check_grad_scaler_skip, small_model, train_mlp, train_small
from reference import ReferenceLion8bit, through_bytes

SMAP = quant.dynamic_map(True)


def _momentum(state):
    return quant.dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], True)


# --- the kernel against an independent implementation of the same algorithm ------------------
def test_each_step_matches_the_torch_reference():
    """Both sides start every step from the same params, codes and absmax. The dequantized m, c =
    b1 m + (1 - b1) g and the new m are the same fp32 operations on both (the CPU code does not
    contract to FMA, nor do torch's elementwise mul/add), so params, absmax and codes agree
    exactly (measured: 0 of 2.2M codes differ)."""
    sizes = [1, 255, 257, 4096, 70001]
    ps = [torch.randn(n).requires_grad_() for n in sizes]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt = fusedopt.Lion8bit(ps, min_8bit_size=0, **kw)
    ref = ReferenceLion8bit([p.detach().clone() for p in ps], SMAP, **kw)
    for _ in range(30):
        for i, p in enumerate(ps):
            ref.params[i].copy_(p.detach())
            if p in opt.state:
                ref.cm[i], ref.am[i] = opt.state[p]["exp_avg"].long(), opt.state[p]["exp_avg_absmax"].clone()
        grads = [torch.randn(n) * torch.logspace(-3, 1, n) for n in sizes]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        for i, p in enumerate(ps):
            s = opt.state[p]
            torch.testing.assert_close(p.detach(), ref.params[i], rtol=0, atol=0)
            torch.testing.assert_close(s["exp_avg_absmax"], ref.am[i], rtol=0, atol=0)
            assert torch.equal(s["exp_avg"].long(), ref.cm[i])


# --- against fp32 Lion ------------------------------------------------------------------------




@pytest.mark.parametrize("seed", [0, 1])
def test_small_model_reaches_the_fp32_loss(seed):
    """A 3-layer MLP regression, 300 steps from one init and the same batches. The 8-bit momentum
    differs from fp32's by at most half a code (0.35% of its block's absmax near the top, a tenth of
    that per decade below), which flips sign(c) only for elements whose c is that close to 0; the
    flips then compound through training like any perturbation. Measured final losses differ by
    0.2-1.2% over seeds 0-3 (losses 0.54-0.64); bound 3%."""
    kw = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    loss32, _, _ = train_mlp(fusedopt.Lion, seed, **kw)
    loss8, model, opt = train_mlp(fusedopt.Lion8bit, seed, **kw)
    assert ["exp_avg_absmax" in opt.state[p] for p in model.parameters()] == [True, False, True, False, False, False]
    assert abs(loss8 - loss32) <= 0.03 * loss32
    assert loss8 < 0.8  # learned: the target's variance is ~3.6


def test_small_params_follow_fused_lion_exactly():
    ps32 = [torch.randn(n).requires_grad_() for n in (3, 4095)]
    ps8 = [p.detach().clone().requires_grad_() for p in ps32]
    o32, o8 = fusedopt.Lion(ps32, lr=1e-3, weight_decay=0.1), fusedopt.Lion8bit(ps8, lr=1e-3, weight_decay=0.1)
    for _ in range(5):
        for a, b in zip(ps32, ps8):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        o32.step()
        o8.step()
    assert all(torch.equal(a, b) for a, b in zip(ps32, ps8))
    assert all(o8.state[p]["exp_avg"].dtype == torch.float32 for p in ps8)


def test_state_layout_and_bytes_per_param():
    p = torch.randn(1024, 1024, requires_grad=True)
    opt = fusedopt.Lion8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    s = opt.state[p]
    assert set(s) == {"exp_avg", "exp_avg_absmax"}
    assert s["exp_avg"].dtype == torch.uint8 and s["exp_avg"].shape == p.shape
    assert s["exp_avg_absmax"].shape == (p.numel() // 256,)
    report = fusedopt.memory_report(opt)
    assert report.total.bytes_per_param == pytest.approx(1 + 4 / 256)  # 1.016 B/param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_with_master_weights(dtype):
    """The master copy follows the fp32 Lion8bit run exactly; the param is its rounding."""
    a = torch.randn(8192, requires_grad=True)
    b = a.detach().to(dtype).float().requires_grad_()
    a.data.copy_(b.detach())
    b = b.detach().to(dtype).requires_grad_()
    oa = fusedopt.Lion8bit([a], lr=1e-3, weight_decay=0.1)
    ob = fusedopt.Lion8bit([b], lr=1e-3, weight_decay=0.1, master_weights=True)
    for _ in range(5):
        g = torch.randn(8192).to(dtype)
        a.grad, b.grad = g.float(), g
        oa.step()
        ob.step()
    master = ob.state[b]["master_param"]
    assert torch.equal(master, a.detach())
    assert torch.equal(b.detach(), master.to(dtype))
    assert torch.equal(ob.state[b]["exp_avg"], oa.state[a]["exp_avg"])


# --- non-finite gradients -------------------------------------------------------------------
def test_non_finite_grad_element_is_skipped_without_poisoning_its_block():
    p = torch.randn(4096, requires_grad=True)
    opt = fusedopt.Lion8bit([p], lr=1e-2, weight_decay=0.1)
    p.grad = torch.randn(4096)
    opt.step()
    before, m_before = p.detach().clone(), _momentum(opt.state[p])
    g = torch.randn(4096)
    g[10], g[300] = float("nan"), float("inf")
    p.grad = g
    opt.step()
    s = opt.state[p]
    assert torch.isfinite(s["exp_avg_absmax"]).all() and torch.isfinite(p).all()
    bad = torch.tensor([10, 300])
    assert torch.equal(p.detach()[bad], before[bad])  # skipped: no update, no decay
    m = _momentum(s)
    assert torch.allclose(m[bad], m_before[bad], rtol=0.02, atol=0.011 * s["exp_avg_absmax"].max().item())
    good = torch.ones(4096, dtype=torch.bool)
    good[bad] = False
    assert (p.detach()[good] != before[good]).all()


def test_grad_scaler_skips_inf_steps_and_unscales_in_the_kernel():
    check_grad_scaler_skip(lambda ps: fusedopt.Lion8bit(ps, lr=1e-3))


# --- checkpoints ----------------------------------------------------------------------------




def test_state_dict_is_plain_tensors_and_resume_is_bitwise():
    m_full, m_half = small_model(), small_model()
    o_full = fusedopt.Lion8bit(m_full.parameters(), lr=1e-3, weight_decay=0.1)
    train_small(m_full, o_full, 10, seed=0)
    train_small(m_full, o_full, 10, seed=1)
    o_half = fusedopt.Lion8bit(m_half.parameters(), lr=1e-3, weight_decay=0.1)
    train_small(m_half, o_half, 10, seed=0)
    sd = through_bytes(o_half.state_dict())
    assert sd["state"][0]["exp_avg"].dtype == torch.uint8 and "exp_avg_absmax" in sd["state"][0]
    m_new = small_model()
    m_new.load_state_dict(m_half.state_dict())
    o_new = fusedopt.Lion8bit(m_new.parameters(), lr=1.0)
    o_new.load_state_dict(sd)
    train_small(m_new, o_new, 10, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(m_full.parameters(), m_new.parameters()))
    for a, b in zip(o_full.state_dict()["state"].values(), o_new.state_dict()["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_switching_between_lion_and_lion8bit_mid_training():
    """A fp32 Lion checkpoint loads into Lion8bit (the momentum quantized) and back (dequantized):
    the momentum survives the trip to within half a code gap of its block's absmax (the signed
    map's widest, next to -1, is 0.0105: fusedopt/quant.py), and comes back unchanged."""
    m = small_model()
    o32 = fusedopt.Lion(m.parameters(), lr=1e-3)
    train_small(m, o32, 5, seed=0)
    o8 = fusedopt.Lion8bit(m.parameters(), lr=1e-3)
    o8.load_state_dict(through_bytes(o32.state_dict()))
    w = m[0].weight  # 6144 elements: 8-bit
    m32 = o32.state[w]["exp_avg"]
    s8 = o8.state[w]
    assert s8["exp_avg"].dtype == torch.uint8
    tol = 0.0106 * s8["exp_avg_absmax"].repeat_interleave(256)[: w.numel()].view_as(w)
    assert ((_momentum(s8) - m32).abs() <= tol).all()
    back = fusedopt.Lion(m.parameters(), lr=1e-3)
    back.load_state_dict(through_bytes(o8.state_dict()))
    assert torch.equal(back.state[w]["exp_avg"], _momentum(s8))
    assert "exp_avg_absmax" not in back.state[w]
    train_small(m, o8, 3, seed=1)  # both keep training
    train_small(m, back, 3, seed=1)


# --- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [(dict(min_8bit_size=-1), "min_8bit_size"), (dict(min_8bit_size=1.5), "min_8bit_size"),
     (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.99)), "beta"), (dict(weight_decay=-0.1), "weight_decay")],
)
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        fusedopt.Lion8bit([torch.randn(4, requires_grad=True)], **kw)


def test_state_dtype_is_not_an_option():
    with pytest.raises(TypeError):
        fusedopt.Lion8bit([torch.randn(4, requires_grad=True)], state_dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "corrupt, match",
    [(lambda s: s.update(exp_avg_absmax=torch.zeros(3)), "exp_avg_absmax"),
     (lambda s: s.update(exp_avg=s["exp_avg"].float()), "uint8"),
     (lambda s: s.update(exp_avg_absmax=torch.full_like(s["exp_avg_absmax"], float("nan"))), "non-finite"),
     (lambda s: s.update(exp_avg=torch.zeros(5, dtype=torch.uint8)), "shape"),
     (lambda s: s.pop("exp_avg_absmax"), "exp_avg_absmax")],
)
def test_corrupt_8bit_state_is_refused_before_any_change(corrupt, match):
    p = torch.randn(64, 96, requires_grad=True)
    opt = fusedopt.Lion8bit([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd["state"][0])
    before = {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())


def test_bad_param_raises_and_mutates_nothing():
    p, q = torch.randn(4096, requires_grad=True), torch.randn(4096, dtype=torch.float64, requires_grad=True)
    opt = fusedopt.Lion8bit([p, q], lr=1e-3)
    p.grad, q.grad = torch.randn(4096), torch.randn(4096, dtype=torch.float64)
    before = p.detach().clone()
    with pytest.raises((TypeError, ValueError, RuntimeError), match="float64"):
        opt.step()
    assert torch.equal(p.detach(), before) and p not in opt.state
