"""Bad input gets a clear error naming the problem, and nothing is mutated: params, grads and
optimizer state are exactly as before the failing call."""
import copy

import pytest
import torch

import fusedopt


def _snapshot(opt, params):
    return (
        [p.detach().clone() for p in params],
        [None if p.grad is None else p.grad.clone() for p in params],
        copy.deepcopy(opt.state_dict()),
    )


def _assert_unchanged(opt, params, snap):
    ps, gs, sd = snap
    assert all(torch.equal(p, q) for p, q in zip(params, ps))
    dense = lambda t: t.to_dense() if t.is_sparse else t  # noqa: E731
    assert all((g is None and p.grad is None) or torch.equal(dense(p.grad), dense(g)) for p, g in zip(params, gs))
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert now["state"].keys() == sd["state"].keys()
    for k in sd["state"]:
        for key, v in sd["state"][k].items():
            assert torch.equal(now["state"][k][key], v)


def _two_groups(bad_param):
    good = torch.randn(10, requires_grad=True)
    good.grad = torch.randn(10)
    params = [good, bad_param]
    opt = fusedopt.AdamW([{"params": [good]}, {"params": [bad_param]}])
    return opt, params


@pytest.mark.parametrize(
    "make_bad, match",
    [
        (lambda: (torch.randn(4, 4, requires_grad=True), torch.randn(4, 4).to_sparse()), "sparse"),
        (lambda: (torch.randn(4, dtype=torch.complex64, requires_grad=True), torch.randn(4, dtype=torch.complex64)), "complex"),
        (lambda: (torch.randn(4, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64)), "float64"),
        (lambda: (torch.randn(4, 8)[:, ::2].detach().requires_grad_(), torch.randn(4, 4)), "non-dense"),
        (lambda: (torch.randn(4, dtype=torch.bfloat16, requires_grad=True), torch.randn(4, dtype=torch.float16)), "grad dtype"),
    ],
    ids=["sparse", "complex", "float64", "non_dense", "grad_dtype"],
)
def test_bad_param_or_grad_raises_and_mutates_nothing(make_bad, match):
    p, g = make_bad()
    if g.dtype != p.dtype:
        p.grad_dtype = None  # torch >= 2.10 refuses a grad of another dtype unless asked
    p.grad = g
    opt, params = _two_groups(p)
    snap = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    _assert_unchanged(opt, params, snap)
    assert len(opt.state) == 0  # not even group 0 was initialized


def test_two_devices_in_one_group():
    a = torch.randn(4, requires_grad=True)
    b = torch.randn(4, device="meta", requires_grad=True)
    a.grad, b.grad = torch.randn(4), torch.randn(4, device="meta")
    opt = fusedopt.AdamW([a, b])
    with pytest.raises(RuntimeError, match="different devices in different param groups"):
        opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(eps=-1e-8), "epsilon"),
        (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), "1-element"),
    ],
)
def test_bad_hyperparameters_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        fusedopt.AdamW([torch.randn(3, requires_grad=True)], **kw)


def test_bad_hyperparameter_set_later_is_caught_before_any_update():
    ps = [torch.randn(5, requires_grad=True) for _ in range(2)]
    opt = fusedopt.AdamW([{"params": [ps[0]]}, {"params": [ps[1]]}])
    for p in ps:
        p.grad = torch.randn(5)
    opt.step()
    opt.param_groups[1]["lr"] = -0.5
    snap = _snapshot(opt, ps)
    with pytest.raises(ValueError, match="param group 1"):
        opt.step()
    _assert_unchanged(opt, ps, snap)


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.Lion, fusedopt.AdamW8bit])
def test_lr_of_the_wrong_type_raises_type_error(cls):
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(TypeError, match="lr in defaults is a str"):
        cls([p], lr="0.1")
    opt = cls([p])
    with pytest.raises(TypeError, match="lr in param group 1 is a str"):
        opt.add_param_group({"params": [torch.randn(2, requires_grad=True)], "lr": "0.1"})
    assert len(opt.param_groups) == 1


def test_numpy_scalar_lr_is_taken_as_torch_takes_it():
    np = pytest.importorskip("numpy")
    for lr in (np.float32(1e-3), np.float64(1e-3), np.int64(0)):
        p, q = (torch.ones(5, requires_grad=True) for _ in range(2))
        p.grad, q.grad = torch.full((5,), 0.5), torch.full((5,), 0.5)
        fusedopt.AdamW([p], lr=lr).step()
        torch.optim.AdamW([q], lr=lr).step()
        assert torch.allclose(p, q, rtol=0, atol=1e-7)


def test_muon_with_adamw_refuses_cpu_capturable_before_either_child_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = fusedopt.MuonWithAdamW(model, adamw_options=dict(capturable=True))
    model(torch.randn(4, 8)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="capturable=True but its params are on the CPU"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.Lion, fusedopt.AdamW8bit])
def test_capturable_with_cpu_params_raises_at_step_as_torch(cls):
    """torch.optim asserts that capturable params live on an accelerator; so do we, before any
    state exists or any param moves."""
    ps = [torch.randn(5000, requires_grad=True) for _ in range(2)]
    for p in ps:
        p.grad = torch.randn(5000)
    opt = cls([{"params": [ps[0]]}, {"params": [ps[1]], "capturable": True}])
    snap = _snapshot(opt, ps)
    with pytest.raises(RuntimeError, match="param group 1 has capturable=True but its params are on the CPU"):
        opt.step()
    _assert_unchanged(opt, ps, snap)
    assert len(opt.state) == 0


def test_wrong_shaped_state_on_load():
    ps = [torch.randn(6, requires_grad=True), torch.randn(3, 2, requires_grad=True)]
    opt = fusedopt.AdamW(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"][1]["exp_avg_sq"] = torch.zeros(2, 3)
    snap = _snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"exp_avg_sq.*shape \(2, 3\).*\(3, 2\)"):
        opt.load_state_dict(bad)
    _assert_unchanged(opt, ps, snap)

    fewer = copy.deepcopy(sd)
    fewer["param_groups"][0]["params"] = [0]
    with pytest.raises(ValueError, match="group 0 has 2 params here but 1"):
        opt.load_state_dict(fewer)
    _assert_unchanged(opt, ps, snap)


def test_cuda_params_without_cuda_backend_name_the_fix(monkeypatch):
    import fusedopt._ops as ops

    monkeypatch.setattr(ops, "cuda_compiled", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA backend"):
        ops.check_device_supported(torch.device("cuda", 0), "fusedopt.AdamW")


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.Lion, fusedopt.AdamW8bit])
def test_a_set_of_params_raises_as_torch(cls):
    p, q = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = cls({p})  # torch takes a set of params itself (one param: its order cannot vary), not a group's
    with pytest.raises(TypeError, match="ordered collections"):
        opt.add_param_group({"params": {q}})  # the order (and a checkpoint's param ids) would vary between runs
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.Lion, fusedopt.AdamW8bit, fusedopt.Muon])
def test_params_over_shared_memory_in_one_group_are_refused(cls):
    # Two Parameters over one storage: one launch updates a group's params at once and its threads
    # race (a 200K-element AdamW run differed between two identical runs); torch.optim steps them
    # in turn.
    base = torch.randn(256, 1024)
    a, b = torch.nn.Parameter(base), torch.nn.Parameter(base[100:200])  # b: rows inside a's memory
    with pytest.raises(ValueError, match="params 0 and 1 of group 0 share memory"):
        cls([a, b])
    opt = cls([torch.randn(4, 4, requires_grad=True)])
    with pytest.raises(ValueError, match="params 0 and 1 of group 1 share memory"):
        opt.add_param_group({"params": [b, a]})
    assert len(opt.param_groups) == 1
    cls([torch.nn.Parameter(base[:128]), torch.nn.Parameter(base[128:])])  # disjoint views of one base are fine


def test_overlapping_params_in_separate_groups_step_in_turn_as_torch():
    # Groups launch one after another, as torch.optim's loop steps them: allowed, and the result is
    # torch's (each group's update sees the other's).
    out = []
    for cls in (torch.optim.AdamW, fusedopt.AdamW):
        torch.manual_seed(0)
        base = torch.randn(64, 64)
        a = torch.nn.Parameter(base.clone())
        b = torch.nn.Parameter(a.data[16:48])  # rows of a: both groups update them, one after the other
        opt = cls([{"params": [a]}, {"params": [b]}], lr=1e-2)
        for _ in range(3):
            a.grad, b.grad = torch.randn(64, 64), torch.randn(32, 64)
            opt.step()
        out.append(a.detach().clone())
    assert (out[0] - out[1]).abs().max() < 1e-6


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.AdamW8bit])
@pytest.mark.parametrize("step", [torch.tensor(3), torch.tensor(3.0, dtype=torch.float64), 3])
def test_a_step_counter_of_another_type_raises_not_misread(cls, step):
    # The kernels read and increment the counter as a float32 scalar: an int64 3 was read as the
    # float with those bits (the bias correction of step ~4e-45) and came back as 1065353216.
    p = torch.randn(64, 128, requires_grad=True)
    p.grad = torch.randn(64, 128)
    opt = cls([p], lr=1e-2)
    opt.step()
    opt.state[p]["step"] = step
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=r"state\['step'\] is a (torch\.\w+ tensor on cpu|int)"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_a_refused_group_leaves_its_params_free_to_be_added_again():
    a, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    opt = fusedopt.AdamW([a])
    with pytest.raises(ValueError, match="learning rate"):
        opt.add_param_group({"params": [b], "lr": -1.0})
    opt.add_param_group({"params": [b]})  # not "share memory" with the refused group's copy of b
    assert len(opt.param_groups) == 2


def test_a_step_counter_on_another_device_raises():
    p, q = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    opt = fusedopt.AdamW([p, q], lr=1e-2)
    p.grad, q.grad = torch.randn(8), torch.randn(8)
    opt.step()
    opt.state[q]["step"] = opt.state[q]["step"].to("meta")  # stands in for a CUDA counter of a CPU param
    with pytest.raises(RuntimeError, match=r"state\['step'\] is a torch.float32 tensor on meta"):
        opt.step()  # (was a segfault: the counter's pointer dereferenced by the CPU loop)
