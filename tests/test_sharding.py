"""fusedopt.sharding: the ZeRO layout as pure code, checked at fake world sizes (no processes)."""
import math

import pytest
import torch

from fusedopt.sharding import Piece, join_state, piece_of, shard_layout, slice_state

NUMELS = [300, 0, 5, 70001, 256, 4097, 1]


@pytest.mark.parametrize("world", [1, 2, 3, 7, 64, 500])
def test_layout_covers_every_element_once_in_whole_blocks(world):
    layout = shard_layout(NUMELS, world)
    assert len(layout) == world
    covered = {i: [] for i in range(len(NUMELS))}
    for rank, pieces in enumerate(layout):
        for pc in pieces:
            assert pc.start % 256 == 0  # block-aligned within its param
            assert pc.end % 256 == 0 or pc.end == NUMELS[pc.param]
            assert pc.numel > 0 or (NUMELS[pc.param] == 0 and rank == 0)  # empty only for an empty param
            covered[pc.param].append((pc.start, pc.end))
    for i, n in enumerate(NUMELS):
        spans = sorted(covered[i])
        assert [s for s, _ in spans] == [0] + [e for _, e in spans[:-1]]
        assert spans[-1][1] == n
    # balanced by blocks: no rank owns more than ceil(blocks / world) of them
    blocks = sum(math.ceil(n / 256) for n in NUMELS)
    for pieces in layout:
        assert sum(math.ceil(pc.numel / 256) for pc in pieces) <= math.ceil(blocks / world)


def test_ranks_own_contiguous_runs_in_group_order():
    layout = shard_layout([1000, 1000], 2)  # 4 + 4 blocks -> 4 each
    assert layout == [[Piece(0, 0, 1000)], [Piece(1, 0, 1000)]]
    layout = shard_layout([1000, 1000], 3)  # 8 blocks -> 3, 3, 2
    assert layout == [[Piece(0, 0, 768)], [Piece(0, 768, 1000), Piece(1, 0, 512)], [Piece(1, 512, 1000)]]


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size"):
        shard_layout([10], 0)


def test_slice_then_join_gives_back_the_state_in_the_params_layout():
    p = torch.randn(4, 3, 40, 50).to(memory_format=torch.channels_last)  # 24000 elements, not contiguous
    state = {
        "step": torch.tensor(7.0),
        "exp_avg": torch.randn(p.shape).to(memory_format=torch.channels_last),
        "exp_avg_sq": torch.randint(0, 255, p.shape, dtype=torch.uint8).to(memory_format=torch.channels_last),
        "exp_avg_sq_absmax": torch.rand(math.ceil(p.numel() / 256)),
    }
    parts = []
    for pieces in shard_layout([p.numel()], 5):
        for pc in pieces:
            s = slice_state(state, pc, p, ("exp_avg",))
            assert s["exp_avg"].shape == (pc.numel,) and s["exp_avg_sq_absmax"].numel() == math.ceil(pc.numel / 256)
            assert torch.equal(s["exp_avg"], piece_of(state["exp_avg"], pc))
            parts.append((pc, s))
    joined = join_state(parts[::-1], p.shape, p.stride())
    assert joined["step"] is state["step"]
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_sq_absmax"):
        assert torch.equal(joined[key], state[key]) and joined[key].stride() == state[key].stride()
    with pytest.raises(ValueError, match="do not cover"):
        join_state(parts[1:], p.shape, p.stride())


def test_piece_of_is_a_view_and_refuses_non_dense_tensors():
    p = torch.zeros(1000)
    piece_of(p, Piece(0, 256, 512)).fill_(1.0)
    assert p[256:512].eq(1).all() and p.sum() == 256
    with pytest.raises(ValueError, match="dense"):
        piece_of(torch.zeros(10, 10)[:, :5], Piece(0, 0, 50))
