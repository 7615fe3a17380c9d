"""fusedopt.Muon: parity with torch.optim.Muon, the aliasing trap, buffer dtypes, conv shapes,
checkpoints both ways, bad input (Newton-Schulz itself: test_newton_schulz.py)."""
import copy
import math

import pytest
import torch

import fusedopt
from fusedopt import newton_schulz as ns
from fusedopt.optim.muon import lr_factor
from reference import through_bytes


pytestmark = pytest.mark.usefixtures("one_thread")


# --- Muon vs torch.optim.Muon -----------------------------------------------------------------

SHAPES = [(32, 64), (64, 32), (48, 48), (32, 64)]


def quadratic_problem(dtype):
    """Least squares per matrix; 128 columns make every gradient full rank. (With low-rank
    gradients bf16 rounding noise in the null space is amplified ~500x by 5 NS iterations, so any
    two bf16 implementations disagree at O(1) there, torch against itself with another order.)"""
    g = torch.Generator().manual_seed(1)
    params = [(0.1 * torch.randn(s, generator=g)).to(dtype).requires_grad_() for s in SHAPES]
    data = [(torch.randn(s[1], 128, generator=g), torch.randn(s[0], 128, generator=g)) for s in SHAPES]

    def closure():
        return sum(((p.float() @ a - b) ** 2).mean() for p, (a, b) in zip(params, data))

    return params, closure


def train(cls, dtype, steps, **kw):
    params, closure = quadratic_problem(dtype)
    p0 = [p.detach().clone() for p in params]
    opt = cls(params, lr=0.02, **kw)
    for _ in range(steps):
        opt.zero_grad()
        closure().backward()
        opt.step()
    flat = lambda ps: torch.cat([p.detach().double().flatten() for p in ps])  # noqa: E731
    return flat(params), flat(p0), opt


@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_trajectory_matches_torch_fp32(adjust_lr_fn, nesterov):
    ref, p0, _ = train(torch.optim.Muon, torch.float32, 50, adjust_lr_fn=adjust_lr_fn, nesterov=nesterov)
    ours, _, _ = train(fusedopt.Muon, torch.float32, 50, adjust_lr_fn=adjust_lr_fn, nesterov=nesterov)
    rel = ((ours - ref).norm() / (ref - p0).norm()).item()
    # Both run NS in bf16 (unit roundoff 2^-8 = 0.4%), torch normalizing in bf16, we in fp32: the
    # orthogonalized updates differ by ~4 roundoffs (1.7% after one step, amplified by the NS
    # polynomial's slope) in directions that vary step to step, and the problem is contractive, so
    # the gap relative to the distance travelled falls with steps: measured 0.32-0.41% at 50 steps
    # (torch vs an fp64-NS reference: ~0.3%). 1% leaves 2.5x margin and still catches the bugs
    # of test_trajectory_bound_catches_bugs (3.7% and up).
    assert rel < 1e-2, rel


@pytest.mark.parametrize("bug", [dict(adjust_lr_fn="original"), dict(nesterov=False), dict(weight_decay=0.0),
                                 dict(momentum=0.9)])
def test_trajectory_bound_catches_bugs(bug):
    # Measured: swapped lr mode 30%, no Nesterov 4.7%, no weight decay 3.7%, momentum 0.9: 13%.
    ref, p0, _ = train(torch.optim.Muon, torch.float32, 50, adjust_lr_fn="match_rms_adamw")
    ours, _, _ = train(fusedopt.Muon, torch.float32, 50, **{"adjust_lr_fn": "match_rms_adamw", **bug})
    assert ((ours - ref).norm() / (ref - p0).norm()).item() > 2e-2


def fixed_grads(steps, dtype):
    g = torch.Generator().manual_seed(2)
    return [[torch.randn(s, generator=g).to(dtype) for s in SHAPES] for _ in range(steps)]


@pytest.mark.parametrize("nesterov", [True, False])
def test_bf16_params_keep_an_uncorrupted_momentum_buffer(nesterov):
    steps, beta = 10, 0.95
    params = [torch.zeros(s, dtype=torch.bfloat16) for s in SHAPES]
    opt = fusedopt.Muon(params, lr=0.01, momentum=beta, nesterov=nesterov)
    bufs = [torch.zeros(s, dtype=torch.bfloat16) for s in SHAPES]
    for grads in fixed_grads(steps, torch.bfloat16):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, g, b in zip(params, grads, bufs):
            b.lerp_(g, 1 - beta)  # the buffer is a pure function of the grads
            assert torch.equal(p.grad, g), "step() wrote the grad"
    for p, b in zip(params, bufs):
        state = opt.state[p]["momentum_buffer"]
        assert state.dtype == torch.bfloat16 and torch.equal(state, b)


def test_bf16_params_follow_torch_with_nesterov():
    # torch's nesterov=True path is alias-free (lerp makes a new tensor), so it is a fair reference.
    grads = fixed_grads(20, torch.bfloat16)
    runs = []
    for cls in (torch.optim.Muon, fusedopt.Muon):
        params = [torch.zeros(s, dtype=torch.bfloat16) for s in SHAPES]
        opt = cls(params, lr=0.01)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        runs.append(torch.cat([p.double().flatten() for p in params]))
    # Independent random grads: the per-step bf16-NS gap (~1.7%) does not shrink but averages
    # over steps: measured 0.85% (0.69% with fp32 params). Params start at 0 so each update
    # (~1e-3) stays well above the bf16 spacing of the params; from p = 0.5 (spacing 2^-8) updates
    # fall below half a spacing and rounding flips alone make two correct runs differ by ~7%.
    assert ((runs[1] - runs[0]).norm() / runs[0].norm()).item() < 2e-2


# --- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (64, 2, 2, 2), (12, 5, 7)])
def test_conv_weights_use_the_flattened_shape(shape):
    rows, cols = shape[0], math.prod(shape[1:])
    g = torch.randn(shape)
    for fn in (None, "match_rms_adamw"):
        p = torch.zeros(shape, requires_grad=True)
        p.grad = g.clone()
        fusedopt.Muon([p], lr=0.1, momentum=0.0, weight_decay=0.0, adjust_lr_fn=fn).step()
        o = ns.zeropower(g.view(rows, cols))
        expected = -0.1 * lr_factor(fn, rows, cols) * o.float()
        assert torch.equal(p.detach(), expected.view(shape))
    # (64, 2, 2, 2): out/(in*kh*kw) = 8, so 'original' scales by sqrt(8), not KJ's kh/kw = 1.
    assert lr_factor(None, 64, 8) == math.sqrt(8)


def test_conv_matches_torch_on_the_flattened_matrix():
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(16, 8, 3, 3, generator=g) for _ in range(5)]
    conv = torch.full((16, 8, 3, 3), 0.1)
    flat = conv.view(16, 72).clone()
    ours, ref = fusedopt.Muon([conv], lr=0.02), torch.optim.Muon([flat], lr=0.02)
    for gr in grads:
        conv.grad, flat.grad = gr.clone(), gr.view(16, 72).clone()
        ours.step(), ref.step()
    assert ((conv.view(16, 72) - flat).norm() / (flat - 0.1).norm()).item() < 3e-2


def test_same_shape_params_batched_like_separate_optimizers():
    grads = fixed_grads(3, torch.float32)
    together = [torch.zeros(s) for s in SHAPES]
    alone = [torch.zeros(s) for s in SHAPES]
    opt = fusedopt.Muon(together, lr=0.02)
    singles = [fusedopt.Muon([p], lr=0.02) for p in alone]
    for gs in grads:
        for p, q, gr in zip(together, alone, gs):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        for o in singles:
            o.step()
    for p, q in zip(together, alone):
        torch.testing.assert_close(p, q)


# --- checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["torch->fusedopt", "fusedopt->torch"])
def test_state_dict_round_trip_with_torch(direction):
    src_cls, dst_cls = (torch.optim.Muon, fusedopt.Muon)
    if direction == "fusedopt->torch":
        src_cls, dst_cls = dst_cls, src_cls
    grads = fixed_grads(6, torch.float32)
    src_p = [torch.zeros(s) for s in SHAPES]
    src = src_cls(src_p, lr=0.03, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    for gs in grads[:3]:
        for p, gr in zip(src_p, gs):
            p.grad = gr.clone()
        src.step()
    sd = through_bytes(src.state_dict())
    dst_p = [p.clone() for p in src_p]
    dst = dst_cls(dst_p)  # other hyperparameters: the checkpoint's must win
    dst.load_state_dict(sd)
    g = dst.param_groups[0]
    assert (g["lr"], g["momentum"], g["adjust_lr_fn"]) == (0.03, 0.9, "match_rms_adamw")
    for gs in grads[3:]:
        for p, q, gr in zip(src_p, dst_p, gs):
            p.grad, q.grad = gr.clone(), gr.clone()
        src.step(), dst.step()
    for p, q in zip(src_p, dst_p):
        # momentum is a pure function of the grads: identical; params differ by the bf16-NS gap
        assert torch.equal(src.state[p]["momentum_buffer"], dst.state[q]["momentum_buffer"])
        assert ((p - q).norm() / p.norm()).item() < 2e-2


def test_loaded_state_is_not_aliased_and_shapes_are_checked():
    p = torch.zeros(8, 4)
    p.grad = torch.randn(8, 4)
    opt = fusedopt.Muon([p])
    opt.step()
    sd = opt.state_dict()
    opt2 = fusedopt.Muon([q := torch.zeros(8, 4)])
    opt2.load_state_dict(sd)
    sd["state"][0]["momentum_buffer"].zero_()
    assert opt2.state[q]["momentum_buffer"].abs().sum() > 0
    with pytest.raises(ValueError, match="shape"):
        fusedopt.Muon([torch.zeros(4, 8)]).load_state_dict(opt2.state_dict())


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1e-3), "learning rate"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(momentum=1.0), "momentum"),
        (dict(eps=-1.0), "eps"),
        (dict(ns_steps=0), "ns_steps"),
        (dict(ns_steps=100), "ns_steps"),
        (dict(adjust_lr_fn="spectral"), "adjust_lr_fn"),
        (dict(ns_schedule="you"), "ns_schedule"),
        (dict(ns_schedule=[(1.0, 2.0)]), "triples"),
        (dict(ns_coefficients=(1.0, 2.0)), "one \\(a, b, c\\) triple"),
        (dict(ns_coefficients=(1.0, 2.0, 3.0, 4.0)), "one \\(a, b, c\\) triple"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fusedopt.Muon([torch.zeros(4, 4)], **kwargs)


def test_1d_param_points_to_the_router():
    with pytest.raises(ValueError, match="MuonWithAdamW"):
        fusedopt.Muon([torch.zeros(4, 4), torch.zeros(4)])


def test_bad_group_at_step_changes_nothing():
    a, b = torch.zeros(4, 4), torch.zeros(4, 4)
    a.grad, b.grad = torch.randn(4, 4), torch.randn(4, 4)
    opt = fusedopt.Muon([{"params": [a]}, {"params": [b]}])
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    assert (a == 0).all() and len(opt.state) == 0


def _first_step(g, lr, schedule, safety=1.0):
    """Muon's first step from p = 0 by hand: the nesterov momentum of one gradient is a multiple of
    it (scale-invariant NS), the 16x32 shape's 'original' lr factor is 1, decay acts on p = 0."""
    return -lr * ns.zeropower(g, schedule, 5, eps=1e-7, safety=safety).float()


def _close_to_and_apart_from(p, expected, other):
    # bf16 Newton-Schulz through another sequence of GEMM roundings: ~1% of the update's norm;
    # a schedule that is ignored lands at the other schedule's result, further away than that
    assert (p - expected).norm() <= 0.02 * expected.norm()
    assert (other - expected).norm() > 0.1 * expected.norm()


def test_custom_schedule_is_used_and_its_last_triple_repeats():
    g = torch.randn(16, 32)
    a, b, c = torch.zeros(16, 32), torch.zeros(16, 32), torch.zeros(16, 32)
    a.grad = b.grad = c.grad = g
    fusedopt.Muon([a], lr=torch.tensor(0.1)).step()  # a tensor lr is accepted too
    opt = fusedopt.Muon([b], lr=0.1, ns_schedule=[ns.KJ_QUINTIC] * 2, ns_steps=5)  # last triple repeats
    opt.step()
    assert torch.equal(a, b)
    assert through_bytes(opt.state_dict())["param_groups"][0]["ns_schedule"] == [ns.KJ_QUINTIC] * 2
    cubic = [ns.KJ_QUINTIC, (1.5, -0.5, 0.0)]  # then the classic cubic iteration, repeated
    fusedopt.Muon([c], lr=0.1, ns_schedule=cubic, ns_steps=5).step()
    _close_to_and_apart_from(c, _first_step(g, 0.1, [ns.KJ_QUINTIC] + [(1.5, -0.5, 0.0)] * 4), a)


def test_polar_express_option_steps():
    g = torch.randn(16, 32)
    p, q = torch.zeros(16, 32), torch.zeros(16, 32)
    p.grad = q.grad = g
    fusedopt.Muon([p], lr=0.1, ns_schedule="polar_express").step()
    fusedopt.Muon([q], lr=0.1).step()
    _close_to_and_apart_from(p, _first_step(g, 0.1, ns.POLAR_EXPRESS, ns.POLAR_EXPRESS_SAFETY), q)


@pytest.mark.parametrize("nesterov", [True, False])
def test_native_passes_match_the_torch_ops_path(nesterov):
    """A contiguous conv weight takes the native passes (math/muon.h), the same weight as
    channels_last the torch-ops path: the same update but for the norm's rounding (double sum vs
    torch's fp32 norm of x / max|x|), which moves the bf16 Newton-Schulz input by an ulp here and
    there; 5 steps stay within 1% of the distance travelled (measured: 0.11% with nesterov, 2.5e-8
    without)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(32, 16, 3, 3, generator=g)
    a = w0.clone().requires_grad_()
    b = w0.clone().to(memory_format=torch.channels_last).requires_grad_()
    oa = fusedopt.Muon([a], lr=0.02, weight_decay=0.1, nesterov=nesterov)
    ob = fusedopt.Muon([b], lr=0.02, weight_decay=0.1, nesterov=nesterov)
    for _ in range(5):
        grad = torch.randn(w0.shape, generator=g)
        a.grad = grad.clone()
        b.grad = grad.clone().to(memory_format=torch.channels_last)
        oa.step()
        ob.step()
    travelled = (a.detach() - w0).norm()
    assert (a.detach() - b.detach()).norm() <= 0.01 * travelled
    assert torch.allclose(oa.state[a]["momentum_buffer"], ob.state[b]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_empty_matrices_are_a_no_op_as_in_torch():
    ps = [torch.zeros(0, 5, requires_grad=True), torch.zeros(5, 0, requires_grad=True), torch.randn(8, 4, requires_grad=True)]
    opt = fusedopt.Muon(ps, lr=0.02)
    for p in ps:
        p.grad = torch.randn_like(p)
    before = ps[2].detach().clone()
    opt.step()
    assert all(opt.state[p]["momentum_buffer"].shape == p.shape for p in ps)
    assert not torch.equal(ps[2].detach(), before)


def test_bf16_params_round_like_torch_muon():
    """The native update rounds the decayed bf16 param before adding the update, as torch's
    p.mul_(decay) then p.add_(o) does: the contiguous (native) and channels_last (torch ops) paths
    then differ only by the Newton-Schulz input rounding (measured: 0.43% of elements after 3 steps;
    71% when the native pass rounded once)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(16, 8, 3, 3, generator=g).to(torch.bfloat16)
    a = w0.clone().requires_grad_()
    b = w0.clone().to(memory_format=torch.channels_last).requires_grad_()
    oa = fusedopt.Muon([a], lr=0.02, weight_decay=0.1, nesterov=False)
    ob = fusedopt.Muon([b], lr=0.02, weight_decay=0.1, nesterov=False)
    for _ in range(3):
        grad = torch.randn(w0.shape, generator=g).to(torch.bfloat16)
        a.grad, b.grad = grad.clone(), grad.clone().to(memory_format=torch.channels_last)
        oa.step()
        ob.step()
    assert torch.equal(oa.state[a]["momentum_buffer"], ob.state[b]["momentum_buffer"])
    assert (a.detach().float() != b.detach().float()).float().mean().item() < 0.01


def test_same_shape_buffers_of_two_dtypes_step_apart():
    """A buffer made before model.to(bf16) stays fp32 beside a newer bf16 one of the same shape:
    one native launch per buffer dtype (one launch for both read the fp32 buffer's memory as bf16,
    or wrote past the bf16 one), each stepped as torch.optim.Muon steps it."""
    torch.manual_seed(0)
    a, b = torch.zeros(16, 32, requires_grad=True), torch.zeros(16, 32, requires_grad=True)
    opt = fusedopt.Muon([a, b], lr=0.02)
    a.grad = torch.randn(16, 32)
    opt.step()  # a's buffer: fp32; b has had no grad yet
    a.data, b.data = a.data.bfloat16(), b.data.bfloat16()
    # torch's lerp_ needs the buffer's dtype: a's twin is an fp32 param with the grad in fp32
    ta, tb = a.detach().float(), b.detach().clone()
    ref = torch.optim.Muon([ta, tb], lr=0.02)
    ref.state[ta]["momentum_buffer"] = opt.state[a]["momentum_buffer"].clone()
    ga, gb = torch.randn(16, 32, dtype=torch.bfloat16), torch.randn(16, 32, dtype=torch.bfloat16)
    a.grad, b.grad, ta.grad, tb.grad = ga, gb, ga.float(), gb
    before = [a.detach().double(), b.detach().double()]
    opt.step()
    ref.step()
    assert opt.state[a]["momentum_buffer"].dtype == torch.float32
    assert opt.state[b]["momentum_buffer"].dtype == torch.bfloat16
    for p, t in ((a, ta), (b, tb)):
        assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[t]["momentum_buffer"])
    for p, t, p0 in ((a, ta, before[0]), (b, tb, before[1])):
        # one step's bf16 Newton-Schulz gap to torch (~1.7%, test_bf16_params_follow_torch_with_nesterov)
        du, dt = p.double() - p0, t.double() - p0
        assert ((du - dt).norm() / dt.norm()).item() < 4e-2


def test_fp32_grads_of_bf16_params_keep_an_fp32_buffer():
    """As torch.optim.Muon (zeros_like(p.grad)); the buffer stays fp32 through a checkpoint."""
    torch.manual_seed(0)
    p = torch.randn(16, 32, dtype=torch.bfloat16, requires_grad=True)
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None  # torch >= 2.10 refuses an fp32 .grad on a bf16 param unless told
    opt = fusedopt.Muon([p], lr=0.02)
    exact = torch.zeros(16, 32, dtype=torch.float64)
    for _ in range(20):
        g = torch.randn(16, 32) * 1e-3
        p.grad = g
        opt.step()
        exact.lerp_(g.double(), 0.05)
    buf = opt.state[p]["momentum_buffer"]
    assert buf.dtype == torch.float32
    # fp32 lerps: ~1e-7 relative; a bf16 buffer rounds each step to 2^-9
    assert ((buf.double() - exact).norm() / exact.norm()).item() < 1e-5
    again = fusedopt.Muon([p], lr=0.02)
    again.load_state_dict(through_bytes(opt.state_dict()))
    assert again.state[p]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(again.state[p]["momentum_buffer"], buf)


class _NotCapturing:
    def is_capturing(self):
        return False


def test_a_copied_muon_steps_where_cuda_is_available(monkeypatch):
    # torch's capture check reads group["capturable"], which Muon's groups (as torch.optim.Muon's)
    # lack, unless _warned_capturable_if_run_uncaptured is set: deepcopy and pickle drop that, so a
    # copy raised KeyError at step() on every machine with a GPU. Faked here: CI has none.
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_stream", lambda *a: _NotCapturing())
    p = torch.randn(8, 16, requires_grad=True)
    p.grad = torch.randn(8, 16)
    opt = copy.deepcopy(fusedopt.Muon([p], lr=0.02))
    opt.step()
    assert torch.equal(opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"], 0.05 * p.grad)


def test_muon_refuses_graph_capture_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    p = torch.randn(8, 16, requires_grad=True)
    p.grad = torch.randn(8, 16)
    opt = fusedopt.Muon([p], lr=0.02)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        opt.step()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        fusedopt.MuonWithAdamW(torch.nn.Linear(16, 8), adamw_lr=1e-3).step()
