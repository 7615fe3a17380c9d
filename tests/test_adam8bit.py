"""Adam8bit / AdamW8bit: the native step against a plain-torch 8-bit reference, trajectories against
fp32 AdamW, state layout and size, checkpoints (resume, cross-loading), non-finite grads, bad input."""
import copy
import io
import math

import pytest
import torch

import fusedopt
from fusedopt import quant
from problems import check_grad_scaler_skip, small_model, train_mlp, train_small
from reference import ReferenceAdam, ReferenceAdam8bit, rel_l2

SMAP, UMAP = quant.dynamic_map(True), quant.dynamic_map(False)


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _moments(state):
    """(m, v) of one param's state as fp32, whatever its format."""
    if "exp_avg_absmax" not in state:
        return state["exp_avg"], state["exp_avg_sq"]
    return (quant.dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], True),
            quant.dequantize_blockwise(state["exp_avg_sq"], state["exp_avg_sq_absmax"], False))


# --- the kernel against an independent implementation of the same algorithm ------------------
@pytest.mark.parametrize(
    "decoupled,beta1", [(True, 0.9), (False, 0.9), (True, 0.3)], ids=["AdamW8bit", "Adam8bit", "AdamW8bit-beta1-0.3"]
)
def test_each_step_matches_the_torch_reference(decoupled, beta1):
    """Start every step from the same state on both sides, take one step, compare. The two differ
    only in fp32 rounding of the Adam arithmetic (~1 ulp), which moves a code only when a moment
    lies within an ulp of a rounding boundary, and then by one code: rare, and bounded.
    The CPU loop compiles AdamW with beta1 > 0.5 apart from the rest (Adam8bitRule::common);
    Adam8bit (an L2 term) and beta1 = 0.3 (torch's lerp from the other end) take the general one."""
    sizes = [1, 255, 257, 4096, 70001]
    cls = fusedopt.AdamW8bit if decoupled else fusedopt.Adam8bit
    ps = [torch.randn(n).requires_grad_() for n in sizes]
    opt = cls(ps, lr=1e-2, betas=(beta1, 0.95), weight_decay=0.1, min_8bit_size=0)
    ref = ReferenceAdam8bit([p.detach().clone() for p in ps], SMAP, UMAP, lr=1e-2, betas=(beta1, 0.95),
                            weight_decay=0.1, decoupled=decoupled)
    flips = total = 0
    for step in range(30):
        # same starting point: the reference adopts the kernel's params and state
        for i, p in enumerate(ps):
            s = opt.state[p] if p in opt.state else None
            ref.params[i].copy_(p.detach())
            if s:
                ref.cm[i], ref.cv[i] = s["exp_avg"].long(), s["exp_avg_sq"].long()
                ref.am[i], ref.av[i] = s["exp_avg_absmax"].clone(), s["exp_avg_sq_absmax"].clone()
        grads = [torch.randn(n) * torch.logspace(-3, 1, n) for n in sizes]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        for i, p in enumerate(ps):
            s = opt.state[p]
            assert s["step"].item() == step + 1
            torch.testing.assert_close(p.detach(), ref.params[i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s["exp_avg_absmax"], ref.am[i], rtol=1e-5, atol=0)
            torch.testing.assert_close(s["exp_avg_sq_absmax"], ref.av[i], rtol=1e-5, atol=0)
            for codes, ref_codes in ((s["exp_avg"], ref.cm[i]), (s["exp_avg_sq"], ref.cv[i])):
                diff = (codes.long() - ref_codes).abs()
                assert diff.max().item() <= 1
                flips += int((diff != 0).sum())
                total += codes.numel()
    assert flips <= 1e-3 * total


# --- trajectories against fp32 AdamW ---------------------------------------------------------
def _random_problem(cls8, cls32, dec, steps, **kw):
    shapes = [(4096,), (300, 70), (65537,)]
    init = [torch.randn(s) for s in shapes]
    a = [t.clone().requires_grad_() for t in init]
    b = [t.clone().requires_grad_() for t in init]
    oa, ob = cls8(a, **kw), cls32(b, **kw)
    f64 = ReferenceAdam([t.double().view(-1) for t in init], decoupled=dec, **kw)
    r8 = ReferenceAdam8bit([t.clone().view(-1) for t in init], SMAP, UMAP, decoupled=dec, **kw)
    for _ in range(steps):
        grads = [torch.randn(s) * (1 + torch.rand(s)) for s in shapes]
        for x, y, g in zip(a, b, grads):
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        f64.step([g.double().view(-1) for g in grads])
        r8.step([g.view(-1) for g in grads])
    flat = lambda ts: [t.detach().reshape(-1) for t in ts]  # noqa: E731
    return flat(a), flat(b), f64.params, r8.params, flat(init)


@pytest.mark.parametrize("cls_name", ["AdamW8bit", "Adam8bit"])
@pytest.mark.parametrize(
    "kw",
    [dict(lr=1e-2, weight_decay=0.0), dict(lr=1e-2, weight_decay=0.1), dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)],
    ids=["plain", "wd", "betas"],
)
def test_trajectory_stays_close_to_fp32_adamw(cls_name, kw):
    """150 steps of random gradients. Two bounds:

    - error budget (DESIGN.md): the kernel's distance to fp64 Adam is within 1.2x that of the
      plain-torch 8-bit reference, i.e. the kernel adds no error beyond the algorithm's own
      (measured: equal to 3 digits);
    - absolute: the 8-bit and fp32 runs differ by at most 5% of the distance the params travelled.
      Rounding moves m by <= 1.05% and v by <= 0.35% of their block's absmax (test_quant); a
      typical Gaussian element is 1/2 to 1/3 of its block's absmax, so an update carries ~2-3%
      relative error, and errors of different steps are independent, so they do not add up
      linearly (measured: 1.3-2.3%).
    """
    dec = cls_name == "AdamW8bit"
    cls8, cls32 = (fusedopt.AdamW8bit, fusedopt.AdamW) if dec else (fusedopt.Adam8bit, fusedopt.Adam)
    ours, fp32, fp64, ref8, init = _random_problem(cls8, cls32, dec, 150, **kw)
    assert rel_l2(ours, fp64) <= 1.2 * rel_l2(ref8, fp64)
    travelled = math.sqrt(sum(((x - y) ** 2).sum().item() for x, y in zip(fp32, init)))
    diff = math.sqrt(sum(((x - y) ** 2).sum().item() for x, y in zip(ours, fp32)))
    assert diff <= 0.05 * travelled
    assert rel_l2(fp32, fp64) < 1e-5  # the fp32 baseline itself is exact to rounding






@pytest.mark.parametrize("seed", [0, 1])
def test_small_model_reaches_the_fp32_loss(seed):
    """A 3-layer MLP regression, 300 steps from one init and the same batches, beta2 = 0.95 (as
    the demo). There the 8-bit update is unbiased (its ratio to AdamW's, both from the same
    params and grads, stays within 1.00 +- 0.01 throughout), so the losses differ by rounding
    noise amplified by training: measured 0.01-1.1% over seeds 0-3; bound 3%.
    (At beta2 = 0.999 the 8-bit loss comes out 2-13% *lower* on this model: see Adam8bit's
    docstring, "second moment with beta2 near 1".)"""
    kw = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    loss32, _, _ = train_mlp(fusedopt.AdamW, seed, **kw)
    loss8, model, opt = train_mlp(fusedopt.AdamW8bit, seed, **kw)
    assert ["exp_avg_absmax" in opt.state[p] for p in model.parameters()] == [True, False, True, False, False, False]
    assert abs(loss8 - loss32) <= 0.03 * loss32
    assert loss8 < 0.6  # learned: the target's variance is ~3.6


def test_tiny_second_moments_do_not_inflate_updates():
    """Elements whose gradient is under ~4e-4 of their block's largest have v below half the
    smallest nonzero code. Rounded to 0, their next step would be up to 1/sqrt(1 - beta2) = 30x too
    long (measured: the run travelled 4.3x as far as AdamW); kept at the smallest code, the 8-bit
    run travels as far as AdamW (measured 1.006x)."""
    n = 1 << 16
    p0 = torch.randn(n)
    a, b = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    oa, ob = fusedopt.AdamW8bit([a], lr=1e-3, weight_decay=0.0), fusedopt.AdamW([b], lr=1e-3, weight_decay=0.0)
    element_scale = torch.rand(n) * 2  # some elements' grads are 1e-4 of their neighbours'
    for _ in range(300):
        g = torch.randn(n) * element_scale
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert (a - p0).norm().item() <= 1.05 * (b - p0).norm().item()
    assert (a - b).norm().item() <= 0.1 * (b - p0).norm().item()


# --- state ----------------------------------------------------------------------------------
def test_state_layout_and_bytes_per_param():
    big = torch.randn(1 << 20, requires_grad=True)
    at_threshold = torch.randn(64, 64, requires_grad=True)  # 4096: 8-bit
    below = torch.randn(4095, requires_grad=True)  # fp32
    opt = fusedopt.AdamW8bit([big, at_threshold, below])
    for p in (big, at_threshold, below):
        p.grad = torch.randn_like(p)
    opt.step()
    s = opt.state[big]
    assert set(s) == {"step", "exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"}
    assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.uint8 and s["exp_avg"].shape == big.shape
    assert s["exp_avg_absmax"].shape == s["exp_avg_sq_absmax"].shape == ((1 << 20) // 256,)
    state_bytes = sum(t.numel() * t.element_size() for t in s.values())
    assert state_bytes / big.numel() <= 2.04  # 2 codes + 2 * 4 / 256 absmax + one 4-byte step
    assert "exp_avg_absmax" in opt.state[at_threshold]
    assert set(opt.state[below]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[below]["exp_avg"].dtype == torch.float32


def test_small_params_follow_fused_adamw_exactly():
    ps = [torch.randn(100, requires_grad=True), torch.randn(5000, requires_grad=True)]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    o8, o32 = fusedopt.AdamW8bit(ps, lr=1e-2), fusedopt.AdamW(qs, lr=1e-2)
    for _ in range(5):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        o8.step()
        o32.step()
    assert torch.equal(ps[0], qs[0])
    assert not torch.equal(ps[1], qs[1])


def test_channels_last_param_blocks_follow_memory_order():
    w = torch.randn(8, 32, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    flat = w.detach().permute(0, 2, 3, 1).reshape(-1).clone().requires_grad_()  # same memory order
    ow, of = fusedopt.AdamW8bit([w]), fusedopt.AdamW8bit([flat])
    for _ in range(3):
        g = torch.randn_like(w)
        w.grad, flat.grad = g, g.permute(0, 2, 3, 1).reshape(-1).clone()
        ow.step()
        of.step()
    assert ow.state[w]["exp_avg"].stride() == w.stride()
    assert torch.equal(w.detach().permute(0, 2, 3, 1).reshape(-1), flat.detach())
    assert torch.equal(ow.state[w]["exp_avg_absmax"], of.state[flat]["exp_avg_absmax"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_with_master_weights(dtype):
    """The fp32 master follows exactly the fp32-param run fed the same (16-bit) values; the
    16-bit param is the master rounded."""
    init = torch.randn(8192).to(dtype)
    a = init.float().requires_grad_()
    b = init.clone().requires_grad_()
    oa = fusedopt.AdamW8bit([a], lr=1e-2)
    ob = fusedopt.AdamW8bit([b], lr=1e-2, master_weights=True)
    for _ in range(20):
        g = torch.randn(8192).to(dtype)
        a.grad, b.grad = g.float(), g
        oa.step()
        ob.step()
    master = ob.state[b]["master_param"]
    assert master.dtype == torch.float32
    assert torch.equal(master, a.detach())
    assert torch.equal(b.detach(), master.to(dtype))


# --- non-finite gradients -------------------------------------------------------------------
def test_non_finite_grad_element_is_skipped_without_poisoning_its_block():
    p = torch.randn(4096, requires_grad=True)
    opt = fusedopt.AdamW8bit([p], lr=1e-2, weight_decay=0.1)
    p.grad = torch.randn(4096)
    opt.step()
    before = p.detach().clone()
    m_before, v_before = _moments(opt.state[p])
    g = torch.randn(4096)
    g[10], g[300], g[301] = float("nan"), float("inf"), 1e30  # 1e30**2 overflows v
    p.grad = g
    opt.step()
    s = opt.state[p]
    assert torch.isfinite(s["exp_avg_absmax"]).all() and torch.isfinite(s["exp_avg_sq_absmax"]).all()
    assert torch.isfinite(p).all()
    bad = torch.tensor([10, 300, 301])
    assert torch.equal(p.detach()[bad], before[bad])  # skipped: no update, no decay
    m, v = _moments(s)
    # the skipped elements keep their moments, re-rounded against their block's new absmax
    assert torch.allclose(m[bad], m_before[bad], rtol=0.02, atol=0.011 * s["exp_avg_absmax"].max().item())
    assert torch.allclose(v[bad], v_before[bad], rtol=0.02, atol=0.004 * s["exp_avg_sq_absmax"].max().item())
    good = torch.ones(4096, dtype=torch.bool)
    good[bad] = False
    assert (p.detach()[good] != before[good]).all()  # the rest of blocks 0 and 1 moved normally


def test_grad_scaler_skips_inf_steps_and_unscales_in_the_kernel():
    model, opt = check_grad_scaler_skip(lambda ps: fusedopt.AdamW8bit(ps, lr=1e-2))
    assert opt.state[model[0].weight]["step"].item() == 5  # the skipped step did not count


# --- checkpoints ----------------------------------------------------------------------------


def _groups(m):
    return [{"params": [p for p in m.parameters() if p.dim() == 2], "weight_decay": 0.1},
            {"params": [p for p in m.parameters() if p.dim() != 2], "weight_decay": 0.0}]




def test_state_dict_is_plain_tensors_and_resume_is_bitwise():
    m_full, m_half = small_model(), small_model()
    o_full = fusedopt.AdamW8bit(_groups(m_full), lr=3e-3)
    train_small(m_full, o_full, 10, seed=0)
    train_small(m_full, o_full, 10, seed=1)

    o_half = fusedopt.AdamW8bit(_groups(m_half), lr=3e-3)
    train_small(m_half, o_half, 10, seed=0)
    sd = _roundtrip(o_half.state_dict())  # weights_only=True: codes and absmax are plain tensors
    assert sd["state"][0]["exp_avg"].dtype == torch.uint8 and "exp_avg_sq_absmax" in sd["state"][0]
    assert sd["param_groups"][0]["min_8bit_size"] == 4096
    m_new = small_model()
    m_new.load_state_dict(m_half.state_dict())
    o_new = fusedopt.AdamW8bit(_groups(m_new), lr=1.0)
    o_new.load_state_dict(sd)
    assert o_new.param_groups[0]["lr"] == 3e-3
    train_small(m_new, o_new, 10, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(m_full.parameters(), m_new.parameters()))
    for a, b in zip(o_full.state_dict()["state"].values(), o_new.state_dict()["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("src", ["torch", "fusedopt"])
def test_full_precision_checkpoint_loads_quantized(src):
    m1 = small_model()
    o1 = (torch.optim.AdamW if src == "torch" else fusedopt.AdamW)(_groups(m1), lr=3e-3)
    train_small(m1, o1, 10, seed=0)
    sd = _roundtrip(o1.state_dict())
    m2 = copy.deepcopy(m1)
    o2 = fusedopt.AdamW8bit(_groups(m2), lr=1.0)
    o2.load_state_dict(sd)
    big = m2[0].weight  # 6144 elements: quantized; the others stay fp32
    s = o2.state[big]
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, absmax = quant.quantize_blockwise(o1.state[m1[0].weight][key], signed)
        assert torch.equal(s[key], codes) and torch.equal(s[key + "_absmax"], absmax)
    assert torch.equal(o2.state[m2[1].weight]["exp_avg"], o1.state[m1[1].weight]["exp_avg"])
    assert o2.state[big]["step"].item() == 10
    _assert_continues_closely(m1, o1, m2, o2)


def _assert_continues_closely(m1, o1, m2, o2):
    """10 more steps on both sides: they differ by a few % of the distance travelled (the 8-bit
    rounding error of test_trajectory_stays_close_to_fp32_adamw)."""
    start = [p.detach().clone() for p in m1.parameters()]
    train_small(m1, o1, 10, seed=1)
    train_small(m2, o2, 10, seed=1)
    norm = lambda xs, ys: math.sqrt(sum(((x - y) ** 2).sum().item() for x, y in zip(xs, ys)))  # noqa: E731
    assert norm(m1.parameters(), m2.parameters()) <= 0.05 * norm(m1.parameters(), start)


def test_8bit_checkpoint_loads_dequantized_into_fusedopt_adamw():
    m1 = small_model()
    o1 = fusedopt.AdamW8bit(_groups(m1), lr=3e-3)
    train_small(m1, o1, 10, seed=0)
    m2 = copy.deepcopy(m1)
    o2 = fusedopt.AdamW(_groups(m2), lr=1.0)
    o2.load_state_dict(_roundtrip(o1.state_dict()))
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        s2 = o2.state[p2]
        assert set(s2) == {"step", "exp_avg", "exp_avg_sq"} and s2["exp_avg"].dtype == torch.float32
        for got, want in zip((s2["exp_avg"], s2["exp_avg_sq"]), _moments(o1.state[p1])):
            assert torch.equal(got, want)
    _assert_continues_closely(m1, o1, m2, o2)


# --- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make_bad, match",
    [
        (lambda: (torch.randn(4, 4, requires_grad=True), torch.randn(4, 4).to_sparse()), "sparse"),
        (lambda: (torch.randn(4, dtype=torch.complex64, requires_grad=True), torch.randn(4, dtype=torch.complex64)), "complex"),
        (lambda: (torch.randn(4, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64)), "float64"),
        (lambda: (torch.randn(64, 128)[:, ::2].detach().requires_grad_(), torch.randn(64, 64)), "non-dense"),
    ],
    ids=["sparse", "complex", "float64", "non_dense"],
)
def test_bad_param_or_grad_raises_and_mutates_nothing(make_bad, match):
    good = torch.randn(5000, requires_grad=True)
    good.grad = torch.randn(5000)
    bad, g = make_bad()
    bad.grad = g
    opt = fusedopt.AdamW8bit([{"params": [good]}, {"params": [bad]}], min_8bit_size=16)
    before = good.detach().clone()
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert torch.equal(good, before) and len(opt.state) == 0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(eps=-1e-8), "epsilon"),
        (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(amsgrad=True), "amsgrad"),
        (dict(min_8bit_size=-1), "min_8bit_size"),
        (dict(min_8bit_size=4096.0), "min_8bit_size"),
        (dict(foreach=True), "foreach"),
    ],
)
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        fusedopt.AdamW8bit([torch.randn(3, requires_grad=True)], **kw)


def _one_step_state_dict():
    p = torch.randn(5000, requires_grad=True)
    opt = fusedopt.AdamW8bit([p])
    p.grad = torch.randn(5000)
    opt.step()
    return p, opt, opt.state_dict()


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda s: s.update(exp_avg_absmax=torch.ones(3)), r"exp_avg_absmax.*\(20,\)"),
        (lambda s: s.update(exp_avg=s["exp_avg"].float()), "uint8"),
        (lambda s: s.update(exp_avg_sq=torch.zeros(50, 100, dtype=torch.uint8)), "shape"),
        (lambda s: s.pop("exp_avg_sq_absmax"), "exp_avg_sq_absmax"),
        (lambda s: s.update(exp_avg_absmax=torch.full((20,), float("nan"))), "non-finite"),
        # codes with no absmax at all: not moments of value 0..255
        (lambda s: [s.pop(k) for k in ("exp_avg_absmax", "exp_avg_sq_absmax")], "exp_avg_absmax"),
    ],
    ids=["absmax_size", "codes_dtype", "codes_shape", "missing_absmax", "nan_absmax", "no_absmax"],
)
def test_corrupt_8bit_state_is_refused_before_any_change(corrupt, match):
    p, opt, sd = _one_step_state_dict()
    bad = copy.deepcopy(sd)
    corrupt(bad["state"][0])
    for target in (opt, fusedopt.AdamW([p])):
        before = copy.deepcopy(target.state_dict())
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(bad)
        after = target.state_dict()
        assert after["state"].keys() == before["state"].keys()
        for k in before["state"]:
            assert all(torch.equal(after["state"][k][key], v) for key, v in before["state"][k].items())


def test_non_finite_full_precision_state_is_refused_on_load():
    p = torch.randn(5000, requires_grad=True)
    o32 = fusedopt.AdamW([p])
    p.grad = torch.randn(5000)
    o32.step()
    sd = o32.state_dict()
    sd["state"][0]["exp_avg"][7] = float("inf")
    with pytest.raises(ValueError, match=r"exp_avg.*inf or NaN"):
        fusedopt.AdamW8bit([p]).load_state_dict(sd)
