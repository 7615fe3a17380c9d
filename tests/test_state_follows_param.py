"""A param's state must match it in device, shape and memory order when a launch reads them side by
side: model.to(device) or .to(memory_format=...) after the optimizer stepped moves the param (the
same object) and leaves its state behind. torch.optim either follows (elementwise ops by index)
or raises; so must fusedopt, never pair p[i] with the wrong element or another device's memory."""
import pytest
import torch

import fusedopt

# (optimizer, a param shape it takes with 8-bit state where it has one: >= 4096 elements)
CASES = [(fusedopt.AdamW, (8, 4, 3, 3)), (fusedopt.AdamW8bit, (64, 16, 3, 3)), (fusedopt.Lion, (8, 4, 3, 3)),
         (fusedopt.Lion8bit, (64, 16, 3, 3)), (fusedopt.Muon, (8, 4, 3, 3))]
IDS = [c.__name__ for c, _ in CASES]
MOMENT = {fusedopt.Muon: "momentum_buffer"}


def _stepped(cls, shape, groups=2, per_group=2):
    """groups x per_group params, stepped once, so every one has state."""
    torch.manual_seed(0)
    params = [torch.randn(shape, requires_grad=True) for _ in range(groups * per_group)]
    opt = cls([{"params": params[i:i + per_group]} for i in range(0, len(params), per_group)], lr=1e-2)
    for p in params:
        p.grad = torch.randn(shape)
    opt.step()
    return opt, params


def _cpu_snapshot(opt, params):
    states = {id(p): {k: v.clone() for k, v in opt.state[p].items()
                      if isinstance(v, torch.Tensor) and v.device.type == "cpu"} for p in params}
    return [p.detach().clone() for p in params], states


def _assert_unchanged(opt, params, snap):
    ps, states = snap
    assert all(torch.equal(p, q) for p, q in zip(params, ps))
    for p in params:
        for k, v in states[id(p)].items():
            assert torch.equal(opt.state[p][k], v), k


def _to_meta(state: dict, keys=None) -> None:
    for key, v in list(state.items()):
        if isinstance(v, torch.Tensor) and (keys is None or key in keys):
            state[key] = v.to("meta")  # stands in for state on another device (no GPU in CI)


@pytest.mark.parametrize("cls, shape", CASES, ids=IDS)
def test_state_left_on_another_device_raises_before_any_group_steps(cls, shape):
    opt, params = _stepped(cls, shape)
    for p in params[2:]:
        _to_meta(opt.state[p])  # the second group "moved": its params are here, their state is not
    snap = _cpu_snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"param 0 of group 1 is on cpu but its state '\w+' is on meta"):
        opt.step()
    _assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("cls, shape", CASES, ids=IDS)
def test_one_moment_on_another_device_raises_naming_it(cls, shape):
    opt, params = _stepped(cls, shape)
    moment = MOMENT.get(cls, "exp_avg")
    _to_meta(opt.state[params[1]], keys={moment})  # a group's second param: past the per-group check
    snap = _cpu_snapshot(opt, params[:2])
    with pytest.raises(RuntimeError, match=rf"param 1 of group 0 is on cpu but its state '{moment}' is on meta"):
        opt.step()
    _assert_unchanged(opt, params[:2], snap)  # its group launched nothing


@pytest.mark.parametrize("cls, shape", CASES, ids=IDS)
def test_a_resized_param_raises_naming_the_shapes(cls, shape):
    opt, params = _stepped(cls, shape, groups=1)
    bigger = (shape[0] * 2,) + shape[1:]
    params[1].data = torch.randn(bigger)  # e.g. an embedding grown in place
    params[1].grad = torch.randn(bigger)
    snap = _cpu_snapshot(opt, params[:1])
    with pytest.raises(RuntimeError, match=rf"param 1 of group 0 has shape \({bigger[0]}, .* but its state"):
        opt.step()
    _assert_unchanged(opt, params[:1], snap)


@pytest.mark.parametrize("cls, shape", CASES, ids=IDS)
def test_a_param_made_channels_last_after_stepping_takes_its_state_along(cls, shape):
    # The state is re-laid out as load_state_dict lays out a checkpoint for the moved param, so the
    # run equals one that reloads its own state_dict after the move (bitwise: 8-bit codes are
    # requantized in the new memory order either way).
    runs = []
    for reload in (False, True):
        opt, params = _stepped(cls, shape, groups=1)
        for p in params:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
        if reload:
            opt.load_state_dict(opt.state_dict())
        torch.manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(shape).contiguous(memory_format=torch.channels_last)
            opt.step()
        moment = MOMENT.get(cls, "exp_avg")
        assert all(opt.state[p][moment].stride() == p.stride() for p in params)
        runs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_adamw_after_channels_last_follows_torch():
    out = {}
    for cls in (torch.optim.AdamW, fusedopt.AdamW):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(4, 8, 3)
        opt = cls(conv.parameters(), lr=1e-2)
        x = torch.randn(2, 4, 8, 8)
        conv(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        conv.to(memory_format=torch.channels_last)
        for _ in range(3):
            conv(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        out[cls] = conv.weight.detach().clone()
    # fp32 rounding of 4 steps of size ~lr (before the fix: 4.1e-2, the moments of other elements)
    assert (out[fusedopt.AdamW] - out[torch.optim.AdamW]).abs().max() < 1e-6
