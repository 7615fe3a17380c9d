"""Checkpoints: torch.optim <-> fusedopt both ways, resume equals an uninterrupted run,
weights_only loading, master weights and bf16 states across a round trip."""
import io

import pytest
import torch

import fusedopt
from reference import fp32_ulp_budget, max_abs


def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 3))


def _groups(m):
    decay = [p for p in m.parameters() if p.dim() == 2]
    other = [p for p in m.parameters() if p.dim() != 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]


def _train(m, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 12, generator=g)
        y = torch.randn(32, 3, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_cross_loading_continues_the_same_trajectory(direction, amsgrad):
    src_cls, dst_cls = (
        (torch.optim.AdamW, fusedopt.AdamW) if direction == "torch_to_fusedopt" else (fusedopt.AdamW, torch.optim.AdamW)
    )
    m1 = _model()
    o1 = src_cls(_groups(m1), lr=3e-3, amsgrad=amsgrad)
    _train(m1, o1, 10, seed=0)
    sd = _roundtrip(o1.state_dict())

    m2 = _model()
    m2.load_state_dict(m1.state_dict())
    o2 = dst_cls(_groups(m2), lr=1.0, amsgrad=amsgrad)  # hyperparameters come from the checkpoint
    o2.load_state_dict(sd)
    assert o2.param_groups[0]["lr"] == 3e-3
    assert o2.param_groups[0]["weight_decay"] == 0.1 and o2.param_groups[1]["weight_decay"] == 0.0
    _train(m1, o1, 10, seed=1)
    _train(m2, o2, 10, seed=1)
    assert max_abs(list(m1.parameters()), list(m2.parameters())) <= fp32_ulp_budget(20, 4.0)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert o1.state[p1]["step"].item() == o2.state[p2]["step"].item() == 20


@pytest.mark.parametrize("flags", [dict(foreach=True), dict(fused=False), dict(foreach=False, fused=None)])
def test_checkpoint_of_any_torch_implementation_loads(flags):
    """foreach/fused name which of torch's implementations ran; a checkpoint of the for-loop or
    foreach one loads, continues the same trajectory, and the flags come out as fusedopt's."""
    m1 = _model()
    o1 = torch.optim.AdamW(_groups(m1), lr=3e-3, **flags)
    _train(m1, o1, 5, seed=0)
    sd = _roundtrip(o1.state_dict())
    m2 = _model()
    m2.load_state_dict(m1.state_dict())
    o2 = fusedopt.AdamW(_groups(m2))
    o2.load_state_dict(sd)
    assert all(g["foreach"] in (None, False) and g["fused"] is None for g in o2.param_groups)
    _train(m1, o1, 10, seed=1)
    _train(m2, o2, 10, seed=1)
    assert max_abs(list(m1.parameters()), list(m2.parameters())) <= fp32_ulp_budget(15, 4.0)


def test_differentiable_checkpoint_is_refused_with_nothing_loaded():
    m = _model()
    t = torch.optim.AdamW(_groups(m))
    sd = t.state_dict()
    sd["param_groups"][0]["differentiable"] = True
    opt = fusedopt.AdamW(_groups(m), lr=1e-2)
    with pytest.raises(ValueError, match="differentiable"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["differentiable"] is False


def test_resume_is_bitwise_identical_to_an_uninterrupted_run():
    m_full, m_half = _model(), _model()
    o_full = fusedopt.AdamW(_groups(m_full), lr=3e-3, amsgrad=True)
    _train(m_full, o_full, 10, seed=0)
    _train(m_full, o_full, 10, seed=1)

    o_half = fusedopt.AdamW(_groups(m_half), lr=3e-3, amsgrad=True)
    _train(m_half, o_half, 10, seed=0)
    sd, msd = _roundtrip(o_half.state_dict()), _roundtrip(m_half.state_dict())
    m_new = _model()
    m_new.load_state_dict(msd)
    o_new = fusedopt.AdamW(_groups(m_new), lr=3e-3, amsgrad=True)
    o_new.load_state_dict(sd)
    _train(m_new, o_new, 10, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(m_full.parameters(), m_new.parameters()))


def test_loaded_state_is_copied_not_aliased():
    m = _model()
    o = fusedopt.AdamW(m.parameters())
    _train(m, o, 2, seed=0)
    sd = o.state_dict()
    o2 = fusedopt.AdamW(m.parameters())
    o2.load_state_dict(sd)
    snapshot = {k: v.clone() for k, v in sd["state"][0].items()}
    _train(m, o2, 2, seed=1)
    # o2 stepped in place on its own copies; the dict it was given (o's live state) did not move
    assert all(torch.equal(sd["state"][0][k], v) for k, v in snapshot.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_and_bf16_states_survive_a_round_trip(dtype):
    m = _model().to(dtype)
    o = fusedopt.AdamW(_groups(m), lr=1e-3, master_weights=True, state_dtype=torch.bfloat16)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    o.step()
    sd = _roundtrip(o.state_dict())
    st = sd["state"][0]
    assert st["master_param"].dtype == torch.float32 and st["exp_avg"].dtype == torch.bfloat16
    o2 = fusedopt.AdamW(_groups(m), lr=1e-3)
    o2.load_state_dict(sd)  # the checkpoint's group options (master_weights, state_dtype) win, as in torch
    p0 = next(m.parameters())
    assert torch.equal(o2.state[p0]["master_param"], o.state[p0]["master_param"])
    assert o2.state[p0]["exp_avg"].dtype == torch.bfloat16

    # into torch.optim.AdamW: the extra key is carried along, the moments cast to the param dtype
    t = torch.optim.AdamW(_groups(m), lr=1e-3)
    t.load_state_dict(sd)
    assert t.state[p0]["exp_avg"].dtype == dtype


def test_torch_checkpoint_into_master_weights_optimizer_creates_masters():
    m = _model().to(torch.bfloat16)
    t = torch.optim.AdamW(_groups(m), lr=1e-3)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    t.step()
    o = fusedopt.AdamW(_groups(m), lr=1e-3, master_weights=True)
    o.load_state_dict(_roundtrip(t.state_dict()))
    p0 = next(m.parameters())
    assert o.param_groups[0]["master_weights"] is True  # a torch checkpoint has no such key: ours stays
    assert torch.equal(o.state[p0]["master_param"], p0.float())
    assert o.state[p0]["exp_avg"].dtype == torch.float32
