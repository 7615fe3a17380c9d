"""torch.optim contracts a drop-in must keep: hooks, .grad untouched, zero-grad no-op, schedulers,
GradScaler, lr as a tensor, add_param_group."""
import pytest
import torch

import fusedopt
from reference import fp32_ulp_budget, max_abs


def _params(n=3, size=257):
    return [torch.randn(size).requires_grad_() for _ in range(n)]


def _set_grads(ps, scale=1.0):
    for p in ps:
        p.grad = torch.randn_like(p) * scale


def test_step_hooks_fire_once_per_step():
    ps = _params()
    opt = fusedopt.AdamW(ps)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    for _ in range(3):
        _set_grads(ps)
        opt.step()
    assert calls == ["pre", "post"] * 3


def test_grad_is_never_written():
    ps = _params()
    opt = fusedopt.AdamW(ps, maximize=True, weight_decay=0.1)
    _set_grads(ps)
    before = [p.grad.clone() for p in ps]
    opt.step()
    assert all(torch.equal(p.grad, b) for p, b in zip(ps, before))


@pytest.mark.parametrize("cls", [fusedopt.Adam, fusedopt.AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_zero_grad_without_weight_decay_leaves_params_unchanged(cls, amsgrad):
    ps = _params()
    before = [p.detach().clone() for p in ps]
    opt = cls(ps, lr=0.1, weight_decay=0.0, amsgrad=amsgrad)
    for p in ps:
        p.grad = torch.zeros_like(p)
    for _ in range(3):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before))


def test_closure_is_called_once_with_grad_enabled():
    ps = _params(1)
    opt = fusedopt.AdamW(ps)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (ps[0] ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert seen == [True] and loss is not None


SCHEDULERS = [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=30),
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=10),
    lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=4, cycle_momentum=False),
    lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1),
]


@pytest.mark.parametrize("make_sched", SCHEDULERS, ids=lambda f: "sched")
def test_lr_schedulers_follow_torch(make_sched):
    init = [torch.randn(300) for _ in range(2)]
    a = [t.clone().requires_grad_() for t in init]
    b = [t.clone().requires_grad_() for t in init]
    oa, ob = fusedopt.AdamW(a, lr=1e-2), torch.optim.AdamW(b, lr=1e-2, foreach=False)
    sa, sb = make_sched(oa), make_sched(ob)
    for step in range(30):
        for x, y in zip(a, b):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        if isinstance(sa, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sa.step(1.0)
            sb.step(1.0)
        else:
            sa.step()
            sb.step()
        assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"]
    assert max_abs(a, b) <= fp32_ulp_budget(30, 4.0)


def test_lr_as_tensor_matches_float():
    init = [torch.randn(300)]
    a = [init[0].clone().requires_grad_()]
    b = [init[0].clone().requires_grad_()]
    oa = fusedopt.AdamW(a, lr=torch.tensor(1e-2, dtype=torch.float64))  # same value as the float
    ob = fusedopt.AdamW(b, lr=1e-2)
    for _ in range(10):
        g = torch.randn(300)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a[0], b[0])


def test_add_param_group_and_defaults():
    ps = _params(2)
    opt = fusedopt.AdamW([ps[0]], lr=1e-3, weight_decay=0.05)
    opt.add_param_group({"params": [ps[1]], "lr": 1e-2})
    assert opt.param_groups[1]["weight_decay"] == 0.05
    assert opt.param_groups[1]["lr"] == 1e-2
    _set_grads(ps)
    opt.step()
    assert all(opt.state[p]["step"].item() == 1 for p in ps)
    with pytest.raises(ValueError, match="learning rate"):
        opt.add_param_group({"params": [torch.randn(3, requires_grad=True)], "lr": -1.0})
    assert len(opt.param_groups) == 2


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_grad_scaler_matches_torch_and_skips_inf_steps():
    torch.manual_seed(0)
    ma, mb = _Net(), _Net()
    mb.load_state_dict(ma.state_dict())
    oa = fusedopt.AdamW(ma.parameters(), lr=1e-2)
    ob = torch.optim.AdamW(mb.parameters(), lr=1e-2, foreach=False)
    sa = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    sb = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for step in range(12):
        for m, o, s in ((ma, oa, sa), (mb, ob, sb)):
            o.zero_grad()
            s.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if step == 5:
                m.a.weight.grad[0, 0] = float("inf")
            if o is oa:
                params_before = [p.detach().clone() for p in m.parameters()]
                state_before = {k: v.clone() for k, v in oa.state[m.b.weight].items()} if oa.state else {}
                grads_before = [p.grad.clone() for p in m.parameters()]
            s.step(o)
            s.update()
            if o is oa:
                # .grad still holds the scaled values: the kernel unscaled in registers only
                assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), grads_before))
                if step == 5:
                    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), params_before))
                    for k, v in oa.state[m.b.weight].items():
                        assert torch.equal(v, state_before[k]), k
    assert sa.get_scale() == sb.get_scale() == 2.0**9
    assert oa.state[ma.b.weight]["step"].item() == ob.state[mb.b.weight]["step"].item() == 11
    assert max_abs(list(ma.parameters()), list(mb.parameters())) <= 1e-5


def test_signature_flags():
    ps = _params(1)
    fusedopt.AdamW(ps, fused=True, foreach=False, capturable=False)
    with pytest.raises(ValueError, match="foreach=True"):
        fusedopt.AdamW(ps, foreach=True)
    with pytest.raises(ValueError, match="fused=False"):
        fusedopt.AdamW(ps, fused=False)
    with pytest.raises(ValueError, match="differentiable"):
        fusedopt.Adam(ps, differentiable=True)
    with pytest.raises(ValueError, match="state_dtype"):
        fusedopt.AdamW(ps, state_dtype=torch.float16)


def test_nonfinite_params_propagate_like_torch():
    """wd == 0 must not add 0 * p (NaN for an inf param); a NaN in max_exp_avg_sq must stay."""
    for cls, tcls in ((fusedopt.Adam, torch.optim.Adam), (fusedopt.AdamW, torch.optim.AdamW)):
        init = torch.tensor([float("inf"), float("nan"), 1.0])
        a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
        oa, ob = cls([a], weight_decay=0.0, amsgrad=True), tcls([b], weight_decay=0.0, amsgrad=True, foreach=False)
        a.grad, b.grad = torch.ones(3), torch.ones(3)
        oa.step()
        ob.step()
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        assert torch.equal(oa.state[a]["exp_avg"], ob.state[b]["exp_avg"])
        oa.state[a]["max_exp_avg_sq"][2] = float("nan")
        ob.state[b]["max_exp_avg_sq"][2] = float("nan")
        oa.step()
        ob.step()
        assert a[2].isnan() and b[2].isnan()


def test_duplicate_params_are_rejected():
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="same parameter twice"):
        fusedopt.AdamW([p, p])


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.Lion])
def test_state_dtype_as_a_torch_dtype_per_group(cls):
    """state_dtype=torch.bfloat16 in a group (at construction, via add_param_group, or set on a
    group mid-run) means what the string "bfloat16" means: bitwise the same steps and states."""
    torch.manual_seed(0)
    init = [torch.randn(300) for _ in range(3)]
    grads = [[torch.randn(300) for _ in range(3)] for _ in range(3)]

    def run(spec):
        ps = [x.clone().requires_grad_() for x in init]
        opt = cls([{"params": [ps[0]]}, {"params": [ps[1]], "state_dtype": spec}])
        opt.add_param_group({"params": [ps[2]], "state_dtype": spec})
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
            opt.param_groups[0]["state_dtype"] = spec  # a mid-run edit applies to new state only
        return ps, opt

    ps_ref, o_ref = run("bfloat16")
    ps, o = run(torch.bfloat16)
    assert [o.state[p]["exp_avg"].dtype for p in ps] == [torch.float32, torch.bfloat16, torch.bfloat16]
    assert all(torch.equal(a, b) for a, b in zip(ps, ps_ref))
    assert all(torch.equal(o.state[a]["exp_avg"], o_ref.state[b]["exp_avg"]) for a, b in zip(ps, ps_ref))


def test_8bit_optimizers_take_float32_state_dtype_per_group():
    for cls in (fusedopt.AdamW8bit, fusedopt.Lion8bit):
        p = torch.randn(5000, requires_grad=True)
        opt = cls([{"params": [p], "state_dtype": torch.float32}])
        p.grad = torch.randn(5000)
        opt.step()
        assert opt.state[p]["exp_avg"].dtype == torch.uint8
        with pytest.raises(ValueError, match="state_dtype"):
            opt.add_param_group({"params": [torch.randn(3, requires_grad=True)], "state_dtype": torch.bfloat16})


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.Lion, fusedopt.AdamW8bit, fusedopt.Lion8bit])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_in_kernel_unscale(cls, how):
    """A copied optimizer still takes GradScaler's scale into its kernel: .grad stays as
    backward() left it (an instance flag did not survive torch's __getstate__)."""
    import copy
    import pickle

    p = torch.randn(5000, requires_grad=True)
    opt = cls([p])
    opt = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    p = opt.param_groups[0]["params"][0]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale((p * torch.randn(5000)).sum()).backward()
    grad = p.grad.clone()
    scaler.step(opt)
    assert torch.equal(p.grad, grad)


def test_tensor_betas_are_kept_and_read_each_step():
    """torch keeps tensor betas as given (a schedule may edit them in place); so does fusedopt."""
    torch.manual_seed(0)
    w0 = torch.randn(300)
    out = []
    for lib in (torch.optim, fusedopt):
        b1, b2 = torch.tensor(0.9), torch.tensor(0.99)
        w = w0.clone().requires_grad_()
        opt = lib.AdamW([w], lr=1e-2, betas=(b1, b2))
        assert opt.param_groups[0]["betas"][0] is b1
        for t in range(5):
            w.grad = torch.full_like(w, float(t + 1))
            opt.step()
            b1.fill_(0.5)  # from step 2 on
        out.append(w.detach().clone())
    assert max_abs([out[0]], [out[1]]) <= 1e-6
    with pytest.raises(ValueError, match="beta"):
        fusedopt.AdamW([w0.clone().requires_grad_()], betas=(torch.tensor(0.9), torch.tensor(1.0)))
