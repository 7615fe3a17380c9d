"""fusedopt.MuonWithAdamW: which params go to Muon and which to AdamW, one step, one state_dict."""
import copy

import pytest
import torch
from torch import nn

import fusedopt
from fusedopt.optim.muon import default_is_muon
from reference import through_bytes


pytestmark = pytest.mark.usefixtures("one_thread")

# --- MuonWithAdamW -----------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 16)  # an embedding whose name says nothing: found by module type
        self.fc = nn.Linear(16, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.ln = nn.LayerNorm(32)
        self.lm_head = nn.Linear(32, 50, bias=False)

    def forward(self, idx):
        x = self.fc(self.tok(idx))  # [b, t, 32]
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.lm_head(self.ln(x))


def net_loss(model, seed=0):
    idx = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(seed))
    return nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())


def step_both_and_compare(pairs, seed):
    """One more step of each (model, optimizer) pair; the models must stay bitwise equal."""
    for m, o in pairs:
        o.zero_grad()
        net_loss(m, seed).backward()
        o.step()
    (ma, _), (mb, _) = pairs
    for (n, p), q in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(p, q), n


def routed(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["use_muon"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}


def test_router_sends_each_param_to_the_right_optimizer():
    model = Net()
    opt = fusedopt.MuonWithAdamW(model)
    assert routed(opt, model) == {
        True: ["conv.weight", "fc.weight"],
        False: ["conv.bias", "fc.bias", "lm_head.weight", "ln.bias", "ln.weight", "tok.weight"],
    }
    assert isinstance(opt.muon, fusedopt.Muon) and isinstance(opt.adamw, fusedopt.AdamW)


def test_default_rule_by_name():
    m = torch.zeros(4, 4)
    for name in ["wte.weight", "transformer.wpe.weight", "lm_head.weight", "output.weight", "head.weight",
                 "model.embed_tokens.weight", "tok_embeddings.weight", "patch_embed.proj.weight"]:
        assert not default_is_muon(name, m), name
    for name in ["h.0.attn.c_attn.weight", "layers.0.attention.output.dense.weight", "mlp.fc1.weight"]:
        assert default_is_muon(name, m), name
    assert not default_is_muon("mlp.fc1.bias", torch.zeros(4))


def test_router_needs_names_or_explicit_kinds():
    model = Net()
    with pytest.raises(ValueError, match="cannot be told"):
        fusedopt.MuonWithAdamW(model.parameters())
    # explicit kinds per group work with plain tensors (as the demo passes them)
    opt = fusedopt.MuonWithAdamW([{"params": [model.fc.weight], "use_muon": True, "weight_decay": 0.1},
                                  {"params": [model.fc.bias, model.tok.weight], "use_muon": False}])
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[0]["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="MuonWithAdamW"):  # a 1-D param forced into Muon
        fusedopt.MuonWithAdamW([{"params": [model.fc.bias], "use_muon": True}])
    with pytest.raises(ValueError, match="more than one"):
        fusedopt.MuonWithAdamW([{"params": [model.fc.weight], "use_muon": True},
                                {"params": [model.fc.weight], "use_muon": False}])


def test_router_predicate_overrides_the_rule():
    model = Net()
    opt = fusedopt.MuonWithAdamW(model, is_muon=lambda name, p: name == "lm_head.weight")
    assert routed(opt, model)[True] == ["lm_head.weight"]
    opt = fusedopt.MuonWithAdamW(model.named_parameters(), is_muon=lambda name, p: False)
    assert opt.muon is None and [g["use_muon"] for g in opt.param_groups] == [False]


def test_router_one_step_updates_both_kinds():
    model = Net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = fusedopt.MuonWithAdamW(model, weight_decay=0.01)
    net_loss(model).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n
    assert set(opt.state[model.fc.weight]) == {"momentum_buffer"}
    assert "exp_avg" in opt.state[model.fc.bias] and "exp_avg" in opt.state[model.tok.weight]
    report = fusedopt.memory_report(opt)
    assert report.consistent is True, f"\n{report}"


def test_router_state_dict_round_trip():
    model = Net()
    opt = fusedopt.MuonWithAdamW(model, weight_decay=0.01)
    for s in range(2):
        opt.zero_grad()
        net_loss(model, s).backward()
        opt.step()
    model2 = copy.deepcopy(model)
    opt2 = fusedopt.MuonWithAdamW(model2, muon_lr=1.0, adamw_lr=1.0)
    opt2.load_state_dict(through_bytes(opt.state_dict()))
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    step_both_and_compare(((model, opt), (model2, opt2)), seed=5)
    # a checkpoint whose group kinds differ is refused before anything changes
    sd = opt.state_dict()
    sd["param_groups"][0]["use_muon"] = not sd["param_groups"][0]["use_muon"]
    snapshot = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match="group 0"):
        opt2.load_state_dict(sd)
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], snapshot["state"][0]["momentum_buffer"])


def test_router_failed_second_child_load_restores_the_first():
    model = Net()
    opt = fusedopt.MuonWithAdamW(model)
    net_loss(model).backward()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    adam_group = next(i for i, g in enumerate(sd["param_groups"]) if not g["use_muon"])
    first = sd["param_groups"][adam_group]["params"][0]
    sd["state"][first]["exp_avg"] = torch.zeros(3)  # wrong shape in the AdamW half
    muon_p = opt.muon.param_groups[0]["params"][0]
    sd["state"][0]["momentum_buffer"] = torch.full_like(sd["state"][0]["momentum_buffer"], 7.0)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)
    assert not (opt.state[muon_p]["momentum_buffer"] == 7.0).all()
    assert opt.muon.state is opt.state and opt.adamw.state is opt.state


def test_router_works_with_lambda_lr():
    model = Net()
    opt = fusedopt.MuonWithAdamW(model, muon_lr=0.02, adamw_lr=3e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for s in range(3):
        opt.zero_grad()
        net_loss(model, s).backward()
        opt.step()
        sched.step()
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.125)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(3e-4 * 0.125)
    assert opt.muon.param_groups[0] is opt.param_groups[0]


def test_router_under_grad_scaler_matches_unscaled():
    models = [Net(), None]
    models[1] = copy.deepcopy(models[0])
    opts = [fusedopt.MuonWithAdamW(m) for m in models]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(net_loss(models[0])).backward()
    scaler.step(opts[0])
    scaler.update()
    net_loss(models[1]).backward()
    opts[1].step()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q)  # power-of-two scale: unscaling is exact up to reduction order


def test_router_add_param_group_takes_a_generator():
    model = Net()
    opt = fusedopt.MuonWithAdamW([{"params": [model.fc.weight], "use_muon": True}])
    extra = nn.Linear(16, 16)
    opt.add_param_group({"params": extra.parameters(), "use_muon": False})  # spent by the duplicate check before
    opt.add_param_group({"params": (p for p in [model.conv.weight]), "use_muon": True})
    assert [len(g["params"]) for g in opt.param_groups] == [1, 2, 1]
    before = extra.weight.detach().clone()
    extra(torch.randn(2, 16)).sum().backward()
    opt.step()
    assert not torch.equal(extra.weight, before)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_router_survives_copies(how):
    import pickle

    model = Net()
    opt = fusedopt.MuonWithAdamW(model, weight_decay=0.01)
    net_loss(model).backward()
    opt.step()
    both = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    model2, opt2 = both
    assert opt2.muon.state is opt2.state and opt2.adamw.state is opt2.state
    assert opt2.param_groups[0] is opt2.muon.param_groups[0]
    step_both_and_compare(((model, opt), (model2, opt2)), seed=3)
    opt2.load_state_dict(opt.state_dict())


def test_router_errors_name_its_own_group_index():
    model = Net()
    opt = fusedopt.MuonWithAdamW(model)  # group 0: Muon, group 1: AdamW
    kinds = [g["use_muon"] for g in opt.param_groups]
    assert kinds == [True, False]
    opt.param_groups[1]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="param group 1"):
        opt.step()
    opt.param_groups[1]["betas"] = (0.9, 0.95)
    opt.add_param_group({"params": [nn.Linear(4, 4).weight], "use_muon": True})
    with pytest.raises(ValueError, match="param group 3"):  # the Muon child's group 2
        opt.add_param_group({"params": [nn.Linear(4, 4).weight], "use_muon": True, "lr": -1.0})


def test_router_load_errors_name_its_own_group_index():
    model = Net()
    opt = fusedopt.MuonWithAdamW(model)  # group 0: Muon, group 1: AdamW
    opt.add_param_group({"params": [nn.Linear(8, 8).weight], "use_muon": True})  # group 2: Muon's 1
    for p in [p for g in opt.param_groups for p in g["params"]]:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    pid = sd["param_groups"][2]["params"][0]
    sd["state"][pid]["momentum_buffer"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"of group 2 \(shape \(8, 8\)\)"):
        opt.load_state_dict(sd)


def test_muon_memory_report_is_consistent_with_fp32_grads_of_bf16_params():
    p = torch.randn(16, 32, dtype=torch.bfloat16, requires_grad=True)
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None
    p.grad = torch.randn(16, 32)
    opt = fusedopt.Muon([p])
    opt.step()
    report = fusedopt.memory_report(opt)
    assert report.consistent is True and report.total.measured.total == 16 * 32 * 4, f"\n{report}"


def test_router_step_errors_name_its_own_groups_and_sets_are_refused():
    w, bias = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(16))
    opt = fusedopt.MuonWithAdamW([{"params": [bias], "use_muon": False}, {"params": [w], "use_muon": True}])
    for p in (w, bias):
        p.grad = torch.randn_like(p)
    opt.step()
    k = 1  # the Muon child's group 0
    assert opt.param_groups[k]["use_muon"]
    p = w
    p.data = torch.randn(p.shape[0] * 2, p.shape[1])  # resized after stepping
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match=rf"param 0 of group {k} has shape"):
        opt.step()
    with pytest.raises(TypeError, match="ordered collections"):
        opt.add_param_group({"params": {torch.nn.Parameter(torch.randn(4, 4))}, "use_muon": True})
