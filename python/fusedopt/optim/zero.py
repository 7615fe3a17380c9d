"""ZeroShardedOptimizer: ZeRO stage 1 (sharded optimizer state) for fusedopt's elementwise
optimizers, over torch.distributed (gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

from collections import deque
from copy import deepcopy
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from fusedopt.optim.adam import Adam
from fusedopt.optim.base import FusedOptimizer, check_no_overlap
from fusedopt.optim.lion import Lion
from fusedopt.quant import ADAM_8BIT_MOMENTS, LION_8BIT_MOMENTS, dequantize_state, memory_order_flat
from fusedopt.sharding import Piece, join_state, piece_of, shard_layout, slice_state

# Elementwise update rules (an element's update reads only that element): any flat range of a
# param can be stepped on its own. Muon needs whole matrices and is not among them.
ELEMENTWISE = (Adam, Lion)  # and their subclasses: AdamW, Adam8bit, AdamW8bit, Lion8bit


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(a.stride(d) == b.stride(d) for d in range(a.dim()) if a.size(d) > 1)


class ZeroShardedOptimizer(Optimizer):
    r"""Shards an elementwise fusedopt optimizer's state across the ranks of a process group.

    ::

        opt = fusedopt.ZeroShardedOptimizer(model.parameters(), fusedopt.AdamW, lr=3e-4, weight_decay=0.1)

    Each param group's params are cut into 256-element blocks, dealt out to the ranks in
    contiguous runs (:mod:`fusedopt.sharding`): a rank allocates state (moments, 8-bit codes and
    absmax, master weights) only for the pieces it owns, about ``1 / world_size`` of the total.
    ``step()`` updates those pieces in place with one ``optimizer_class`` step (the same kernels,
    so every element gets bitwise the update the unsharded optimizer would give it), then
    all-gathers the updated params so every rank holds the whole model again. The 8-bit
    optimizers' ``min_8bit_size`` is decided per original param, never per piece.

    Gradients must already be identical on every rank (DDP's all-reduce, or any equivalent):
    this is stage 1, not stage 2 (no reduce-scatter of grads). ``torch.distributed`` must be
    initialized; params within a group must share one dtype and device and be dense.

    Param groups, LR schedulers (they change ``param_groups`` here; the values reach the inner
    optimizer at each step), GradScaler and step hooks behave as for ``optimizer_class``.

    Checkpoints, as torch's ``ZeroRedundancyOptimizer``: ``consolidate_state_dict(to=0)`` (on
    every rank) gathers the full state, then ``state_dict()`` on that rank returns it in
    ``optimizer_class``'s own unsharded format, which ``optimizer_class`` (and torch.optim.AdamW,
    for AdamW) loads as well. ``load_state_dict`` takes such a full dict at any world size. Without
    communication, ``local_state_dict()`` saves this rank's pieces and
    :func:`merge_local_state_dicts` joins every rank's into the full dict, so a checkpoint
    written at one world size resumes at another.
    """

    _step_supports_amp_scaling = True  # the inner optimizer unscales in its kernels (as FusedOptimizer)

    def __init__(self, params, optimizer_class: type = None, *, process_group=None, **defaults: Any) -> None:
        if optimizer_class is None or not (isinstance(optimizer_class, type) and issubclass(optimizer_class, ELEMENTWISE)):
            raise TypeError(
                "fusedopt.ZeroShardedOptimizer: optimizer_class must be one of fusedopt's elementwise optimizers "
                f"(Adam, AdamW, Adam8bit, AdamW8bit, Lion, Lion8bit), got {optimizer_class!r}; Muon needs whole "
                "matrices and cannot be sharded this way"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "fusedopt.ZeroShardedOptimizer: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group(...) on every rank first (on one process, use "
                f"fusedopt.{optimizer_class.__name__} directly)"
            )
        self.optimizer_class = optimizer_class
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        # The full defaults (and their validation) come from the optimizer class itself.
        probe = optimizer_class([torch.zeros(1, requires_grad=True)], **defaults)
        self._inner: FusedOptimizer | None = None
        self._pieces: list[list[tuple[Piece, torch.Tensor]]] = []
        self._layouts: list[list[list[Piece]]] = []
        self._memory: list[list[tuple]] = []  # per group, each param's (data_ptr, dtype) when it was cut
        self._consolidated: dict | None = None
        super().__init__(params, probe.defaults)  # shards each group as it is added (add_param_group)

    @property
    def _who(self) -> str:
        return f"fusedopt.ZeroShardedOptimizer({self.optimizer_class.__name__})"

    # --- layout ------------------------------------------------------------------------------
    def _check_group_params(self, group: dict, index: int) -> None:
        params = group["params"]
        known = {id(p) for g in self.param_groups[:index] for p in g["params"]}
        if len({id(p) for p in params}) != len(params) or any(id(p) in known for p in params):
            raise ValueError(f"{self._who}: param group {index} lists a parameter twice (or one of another "
                             "group); pass each parameter once")
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) > 1:
            raise ValueError(
                f"{self._who}: param group {index} mixes dtypes/devices {sorted(map(str, kinds))}; put params of "
                "different dtypes or devices in separate param groups (each group is all-gathered as one buffer)"
            )
        check_no_overlap(params, self._who, index)  # on whole params: every rank decides alike
        for k, p in enumerate(params):
            if p.numel() and memory_order_flat(p.detach()).data_ptr() != p.data_ptr():
                raise ValueError(f"{self._who}: param {k} of group {index} is a non-dense view (strides "
                                 f"{p.stride()}); pass a contiguous tensor")

    def _shard_group(self, group: dict) -> None:
        """Layout of one outer group, and its pieces as a group of the inner optimizer."""
        index = len(self._layouts)
        self._check_group_params(group, index)
        params = group["params"]
        layout = shard_layout([p.numel() for p in params], self.world_size)
        mine = []
        for piece in layout[self.rank]:
            t = piece_of(params[piece.param].detach(), piece)
            t._fusedopt_policy_numel = params[piece.param].numel()  # 8-bit or not: the param decides
            if hasattr(t, "grad_dtype"):
                t.grad_dtype = None  # a piece takes its param's grad, whose dtype may differ (fp32 for bf16)
            mine.append((piece, t))
        inner_group = {**{k: v for k, v in group.items() if k != "params"}, "params": [t for _, t in mine]}
        if self._inner is None:
            self._inner = self.optimizer_class([inner_group])
        else:
            self._inner.add_param_group(inner_group)
        self._layouts.append(layout)
        self._pieces.append(mine)
        self._memory.append([(p.data_ptr(), p.dtype) for p in params])

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._shard_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise

    @property
    def inner(self) -> FusedOptimizer:
        """The optimizer_class instance stepping this rank's pieces (what memory_report measures)."""
        return self._inner

    # --- step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inner = self._inner
        self._check_params_not_moved()
        # Every rank checks the outer groups, every whole param and grad (not only its pieces),
        # before anything steps: bad input raises on all ranks alike and names the param as the
        # unsharded optimizer does, instead of one rank raising while the others wait in all_gather.
        checked = [dict(inner._check_step_group(outer, i)) for i, outer in enumerate(self.param_groups)]
        plans = []  # the pieces' (param, grad) pairs: already checked as parts of the whole
        try:
            for outer, inner_group, mine, grads in zip(self.param_groups, inner.param_groups, self._pieces, checked):
                for k, v in outer.items():  # schedulers and users change the outer groups
                    if k != "params":
                        inner_group[k] = v
                pairs = []
                for piece, t in mine:
                    g = grads.get(outer["params"][piece.param])  # laid out like its param; .grad untouched
                    t.grad = None if g is None else piece_of(g, piece)
                    if g is not None:
                        pairs.append((t, t.grad))
                plans.append(pairs)
            inner._fused_step(getattr(self, "grad_scale", None), getattr(self, "found_inf", None), plans)
        finally:
            for mine in self._pieces:
                for _, t in mine:
                    t.grad = None
        if self.world_size > 1:
            for group, layout, mine in zip(self.param_groups, self._layouts, self._pieces):
                self._all_gather(group["params"], layout, mine)
        return loss

    def _check_params_not_moved(self) -> None:
        """The pieces are views of each param's memory as it was when its group was cut: after
        model.to(...) or p.data = ... they would go on updating the old memory while the param
        stays unchanged. Judged from the whole params, so every rank raises alike."""
        for i, (group, memory) in enumerate(zip(self.param_groups, self._memory)):
            for k, (p, (ptr, dtype)) in enumerate(zip(group["params"], memory)):
                if p.data_ptr() != ptr or p.dtype is not dtype:
                    raise RuntimeError(
                        f"{self._who}: param {k} of group {i} no longer lives in the memory it was sharded from "
                        "(moved, cast or re-laid out by model.to(...) or p.data = ... after the optimizer was "
                        "made); make the ZeroShardedOptimizer after the model's last move"
                    )

    def _all_gather(self, params: list[torch.Tensor], layout: list[list[Piece]], mine) -> None:
        """Every rank's updated pieces into every rank's params: one collective per group."""
        if not params:
            return
        lengths = [sum(pc.numel for pc in pieces) for pieces in layout]
        width = max(lengths)
        if width == 0:
            return
        p0 = params[0]
        send = torch.zeros(width, dtype=p0.dtype, device=p0.device)
        if mine:
            torch.cat([t for _, t in mine], out=send[: lengths[self.rank]])
        recv = [torch.empty_like(send) for _ in range(self.world_size)]
        dist.all_gather(recv, send, group=self.process_group)
        dst, src = [], []
        for r, pieces in enumerate(layout):
            if r == self.rank:
                continue
            offset = 0
            for pc in pieces:
                dst.append(piece_of(params[pc.param].detach(), pc))
                src.append(recv[r][offset: offset + pc.numel])
                offset += pc.numel
        if dst:
            torch._foreach_copy_(dst, src)

    # --- checkpoints -------------------------------------------------------------------------
    def _global_index(self) -> list[list[int]]:
        """Per group, the index each param has in an unsharded optimizer's state_dict."""
        out, k = [], 0
        for group in self.param_groups:
            out.append(list(range(k, k + len(group["params"]))))
            k += len(group["params"])
        return out

    def _param_groups_dict(self) -> list[dict]:
        return [{**{k: v for k, v in g.items() if k != "params"}, "params": idx}
                for g, idx in zip(self.param_groups, self._global_index())]

    def local_state_dict(self) -> dict:
        """This rank's pieces and their state, with the layout they were cut by (no communication;
        :func:`merge_local_state_dicts` joins every rank's into a full state dict)."""
        index = self._global_index()
        pieces: dict[int, list] = {}
        for g, mine in enumerate(self._pieces):
            for piece, t in mine:
                state = self._inner.state.get(t)
                if state:
                    pieces.setdefault(index[g][piece.param], []).append(
                        # on the CPU: rank `to` of consolidate_state_dict unpickles every rank's
                        [piece.start, piece.end, {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor)
                                                  else v for k, v in state.items()}]
                    )
        params = [p for g in self.param_groups for p in g["params"]]
        return {
            "zero": {"world_size": self.world_size, "rank": self.rank, "optimizer": self.optimizer_class.__name__,
                     "shapes": [list(p.shape) for p in params], "strides": [list(p.stride()) for p in params]},
            "param_groups": deepcopy(self._param_groups_dict()),
            "pieces": pieces,
        }

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collective (every rank calls it): gathers the full state (on the CPU) on rank `to` of the
        process group, where state_dict() then returns it."""
        local = self.local_state_dict()
        if self.world_size == 1:
            gathered = [local]
        else:
            gathered = [None] * self.world_size if self.rank == to else None
            dist.gather_object(local, gathered, group_dst=to, group=self.process_group)
        self._consolidated = merge_local_state_dicts(gathered) if self.rank == to else None

    def state_dict(self) -> dict:
        """The full state (optimizer_class's unsharded format) gathered by consolidate_state_dict."""
        if self._consolidated is None:
            raise RuntimeError(
                f"{self._who}.state_dict: call consolidate_state_dict(to=rank) on every rank first, then "
                "state_dict() on that rank (or local_state_dict() on each rank, without communication)"
            )
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        # A hook may edit the dict, its groups and its state map (not the tensors): as torch's,
        # those are new for every call.
        c = self._consolidated
        state_dict = {**c, "state": dict(c["state"]), "param_groups": [dict(g) for g in c["param_groups"]]}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            out = post_hook(self, state_dict)
            if out is not None:
                state_dict = out
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full state dict (from state_dict(), merge_local_state_dicts(), or an unsharded
        optimizer_class / torch.optim optimizer over the same params) at any world size: every rank
        keeps its pieces' slices. Validation happens in the inner optimizer before any change."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        if "zero" in state_dict:
            raise ValueError(f"{self._who}.load_state_dict: this is one rank's local_state_dict(); join every "
                             "rank's with fusedopt.merge_local_state_dicts([...]) and load the result")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            raise ValueError(f"{self._who}.load_state_dict: the checkpoint's param groups "
                             f"{[len(s['params']) for s in saved_groups]} do not match this optimizer's "
                             f"{[len(g['params']) for g in self.param_groups]}")
        elementwise = self._inner._elementwise_state_keys
        moments = LION_8BIT_MOMENTS if issubclass(self.optimizer_class, Lion) else ADAM_8BIT_MOMENTS
        # Every rank converts every whole param's saved state as the unsharded optimizer would (one
        # param at a time, each dropped at once): a bad checkpoint raises on all ranks alike, naming
        # the param, before any change (a piece alone cannot tell, and a rank that loaded would
        # leave the others waiting in the next step's collective).
        checked_groups, new_groups = self._inner._loaded_groups(state_dict, self.param_groups, self._who)
        deque(self._inner._loaded_states(state_dict, checked_groups, new_groups, self._who), maxlen=0)
        inner_state, inner_groups, k = {}, [], 0
        for g, (saved_group, group, mine) in enumerate(zip(saved_groups, self.param_groups, self._pieces)):
            ids = []
            for piece, _ in mine:
                p = group["params"][piece.param]
                saved = state_dict["state"].get(saved_group["params"][piece.param])
                if saved:
                    codes = [saved.get(key) for key in moments if isinstance(saved.get(key), torch.Tensor)]
                    if any(c.dtype == torch.uint8 and c.shape == p.shape and not _same_strides(c, p) for c in codes):
                        # 8-bit blocks were cut in another memory order: go through full precision
                        saved = dequantize_state(saved, p.numel(), f"{self._who}.load_state_dict", moments)
                    saved = {key: (torch.empty_like(p, dtype=v.dtype).copy_(v) if isinstance(v, torch.Tensor)
                                   and v.shape == p.shape and key != "step" and not _same_strides(v, p) else v)
                             for key, v in saved.items()}
                    inner_state[k] = slice_state(saved, piece, p, elementwise)
                ids.append(k)
                k += 1
            inner_groups.append({**{key: v for key, v in saved_group.items() if key != "params"}, "params": ids})
        self._inner.load_state_dict({"state": inner_state, "param_groups": inner_groups})
        # The inner optimizer normalized the loaded options (AdamW's decoupled flag, a fixed
        # state_dtype, ...): those, not the checkpoint's raw values, are what step() passes down.
        for group, inner_group in zip(self.param_groups, self._inner.param_groups):
            for key, v in inner_group.items():
                if key != "params":
                    group[key] = v
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def merge_local_state_dicts(local: list[dict]) -> dict:
    """Every rank's ZeroShardedOptimizer.local_state_dict() (any order) -> the full state dict,
    in the unsharded optimizer's format (loadable by ZeroShardedOptimizer at any world size and by
    the unsharded optimizer itself)."""
    if not local:
        raise ValueError("merge_local_state_dicts: no state dicts given")
    meta = local[0]["zero"]
    ranks = sorted(sd["zero"]["rank"] for sd in local)
    if ranks != list(range(meta["world_size"])) or any(sd["zero"]["world_size"] != meta["world_size"] for sd in local):
        raise ValueError(f"merge_local_state_dicts: need one local state dict from each of the {meta['world_size']} "
                         f"ranks, got ranks {ranks}")
    parts: dict[int, list] = {}
    for sd in local:
        for index, pieces in sd["pieces"].items():
            parts.setdefault(int(index), []).extend((Piece(int(index), s, e), st) for s, e, st in pieces)
    state = {i: join_state(ps, torch.Size(meta["shapes"][i]), tuple(meta["strides"][i])) for i, ps in parts.items()}
    return {"state": state, "param_groups": deepcopy(local[0]["param_groups"])}
