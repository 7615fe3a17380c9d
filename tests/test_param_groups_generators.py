"""Param groups given as generators (model.parameters() inside a group dict) hold their params,
as in torch.optim; a list() inside add_param_group once spent them, leaving the group empty."""
import pytest
import torch

import fusedopt


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.Adam, fusedopt.AdamW8bit, fusedopt.Lion])
def test_generator_groups_are_trained_like_torch(cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = cls([{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[1].parameters()}], lr=1e-3)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    group = {"params": (p for p in [torch.nn.Parameter(torch.randn(3))])}
    opt.add_param_group(group)
    assert opt.param_groups[2] is group and len(group["params"]) == 1  # torch keeps the caller's dict too
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_duplicate_named_params_are_refused():
    w = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="same parameter twice"):
        fusedopt.AdamW([("a", w), ("b", w)])
