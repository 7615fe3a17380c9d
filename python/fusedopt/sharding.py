"""ZeRO-style sharding layout of an elementwise optimizer's state: pure code, no communication.

A param group's params are cut into 256-element blocks (the 8-bit quantization block; a param's
last block may be short), in the group's param order and each param's memory order. The blocks
are dealt out to ranks as contiguous runs of ``ceil(blocks / world_size)``: rank r owns
blocks [r q, (r + 1) q). What a rank owns of one param is a :class:`Piece`, a block-aligned range
of its elements, so an 8-bit state sliced at a piece boundary is exactly the unsharded state's
slice (codes and absmax alike), and a checkpoint can move between world sizes by slicing and
concatenating.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fusedopt.quant import BLOCK, memory_order_flat


@dataclass(frozen=True)
class Piece:
    """Elements [start, end) (memory order) of param `param` (its index in the group)."""

    param: int
    start: int
    end: int

    @property
    def numel(self) -> int:
        return self.end - self.start


def shard_layout(numels: list[int], world_size: int) -> list[list[Piece]]:
    """For each rank, the pieces it owns of params with these element counts (see module doc).
    Ranks past the last block own nothing; a zero-element param is an empty piece of rank 0."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    starts, total = [], 0  # first block of each param
    for n in numels:
        starts.append(total)
        total += math.ceil(n / BLOCK)
    per_rank = math.ceil(total / world_size) if total else 0
    layout: list[list[Piece]] = [[] for _ in range(world_size)]
    for i, (n, first) in enumerate(zip(numels, starts)):
        if n == 0:  # no elements, but state (a step counter) as in the unsharded optimizer: rank 0's
            layout[0].append(Piece(i, 0, 0))
            continue
        blocks = math.ceil(n / BLOCK)
        b = 0
        while b < blocks:
            rank = (first + b) // per_rank
            run = min(blocks, (rank + 1) * per_rank - first)  # this rank's blocks end here
            layout[rank].append(Piece(i, b * BLOCK, min(n, run * BLOCK)))
            b = run
    return layout


def piece_of(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The piece of a dense tensor shaped like its param: a 1-D view (memory order) sharing its
    storage, so writes to it land in the tensor."""
    flat = memory_order_flat(t)
    if t.numel() and flat.data_ptr() != t.data_ptr():  # memory_order_flat copied a non-dense view
        raise ValueError(f"sharding needs dense params (pieces are views into them); got strides {t.stride()}")
    return flat[piece.start:piece.end]


def slice_state(state: dict, piece: Piece, param: torch.Tensor, elementwise: tuple[str, ...]) -> dict:
    """The part of one param's unsharded state that `piece` owns: elementwise entries (the
    optimizer's, plus 8-bit codes) sliced in memory order, per-block absmax entries sliced by
    block, anything else (step) as is."""
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
        elif key.endswith("_absmax"):
            out[key] = value[piece.start // BLOCK: math.ceil(piece.end / BLOCK)]
        elif key in elementwise or (value.shape == param.shape and key != "step"):
            out[key] = memory_order_flat(value)[piece.start:piece.end]
        else:
            out[key] = value
    return out


def join_state(parts: list[tuple[Piece, dict]], shape: torch.Size, stride: tuple[int, ...]) -> dict:
    """One param's unsharded state from its pieces' states (any order), for a param of this shape
    and stride: elementwise entries are concatenated (memory order) into tensors laid out like the
    param, absmax entries concatenated, the rest taken from the first piece (the step counter is
    the same on every rank)."""
    numel = math.prod(shape)
    parts = sorted(parts, key=lambda ps: ps[0].start)
    ends = [p.start for p, _ in parts[1:]] + [numel]
    if not parts or parts[0][0].start != 0 or any(p.end != e for (p, _), e in zip(parts, ends)):
        raise ValueError(f"the pieces of a param of {numel} elements do not cover it: "
                         f"{[(p.start, p.end) for p, _ in parts]}")
    first_piece, first = parts[0]
    out = {}
    for key, value in first.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
        elif key.endswith("_absmax"):
            out[key] = torch.cat([s[key] for _, s in parts])
        elif key != "step" and value.dim() == 1 and value.numel() == first_piece.numel:
            flat = torch.cat([s[key] for _, s in parts])
            full = torch.empty_strided(tuple(shape), tuple(stride), dtype=flat.dtype, device=flat.device)
            memory_order_flat(full).copy_(flat)
            out[key] = full
        else:
            out[key] = value
    return out
