"""Muon (momentum + Newton-Schulz orthogonalization) and MuonWithAdamW, the param router.

The elementwise parts run in native passes shared by CPU and CUDA (math/muon.h: the momentum
step fused with the norm and bf16 cast of the Newton-Schulz input, and the update with decoupled
weight decay); the orthogonalization is batched bmm/baddbmm (fusedopt.newton_schulz).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from torch.optim import Optimizer

from fusedopt import newton_schulz as ns
from fusedopt._ops import muon_apply_, muon_prepare_
from fusedopt.optim.adam import AdamW
from fusedopt.optim.base import FusedOptimizer, as_float, reject_param_set

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def lr_factor(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """Shape scaling of the lr, from the (flattened) matrix shape rows x cols, as torch.optim.Muon.
    'original' (KJ): sqrt(max(1, rows/cols)); 'match_rms_adamw' (Moonlight): 0.2 sqrt(max(rows, cols))."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


class Muon(FusedOptimizer):
    r"""Muon with torch.optim.Muon's signature, state key and update (EMA momentum)::

        M = lerp(M, g, 1 - momentum)                      # state['momentum_buffer'], the grad's dtype
        U = lerp(g, M, momentum) if nesterov else M
        O = NS(U.view(rows, -1))                          # conv weights: out x (in*kh*kw)
        p = p * (1 - lr * weight_decay) - lr * lr_factor(adjust_lr_fn, rows, cols) * O

    Checkpoints load both ways with torch.optim.Muon. Differences from torch, all deliberate:

    - Params with ndim > 2 are accepted and flattened to (shape[0], -1); the lr factor uses the
      flattened shape (Keller Jordan's code reads kh/kw there, up to 5x too small an update).
      1-D params raise: route them to AdamW with :class:`MuonWithAdamW`.
    - Same-shape matrices of a group are orthogonalized in one batched bmm chain.
    - The norm is taken in fp32 before the bf16 cast (torch: in bf16), and NS never writes its
      input (torch 2.13 divides the bf16 momentum buffer in place when nesterov=False).
      ``eps`` floors the norm as in torch, so updates of matrices with ||U|| < eps shrink;
      ``eps=0`` makes the step scale-invariant down to the fp32 range.
    - ``ns_schedule`` (keyword only): per-iteration (a, b, c) triples, or ``'polar_express'``
      (Polar Express with its 1.02 norm safety factor). Iteration t uses entry
      min(t, len - 1); ``ns_coefficients`` is then unused.
    - ``1 <= ns_steps < 100`` and ``0 <= momentum < 1`` are enforced.
    - ``ns_kernel`` (keyword only): ``'torch'`` (default) runs NS as torch bmm/baddbmm;
      ``'symmetric'`` (CUDA params) computes X X^T and b A + c A A with fusedopt's kernel that
      does only the upper-triangle tiles (csrc/cuda/symmetric_gram.cu). Not yet the default: it
      has not been timed on a GPU.

    Per group and matrix shape, one native pass pair does the momentum step, the fp32 norm and the
    bf16 cast of every matrix's Newton-Schulz input, one batched NS runs, and one native pass
    applies the update (a CUDA tensor ``lr`` is read in that kernel: no host sync). Params that are
    not contiguous (a channels_last conv weight) take the same steps in torch ops. Under GradScaler
    the grads are unscaled by the scaler itself (``.grad`` is written), not in a kernel.
    """

    _elementwise_state_keys = ("momentum_buffer",)
    # GradScaler unscales .grad before step(): momentum must accumulate unscaled grads, and the
    # in-kernel unscale of the other fusedopt optimizers has no Muon kernel to live in yet.
    _step_supports_amp_scaling = False

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = ns.KJ_QUINTIC,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_schedule=None,
        ns_kernel: str = "torch",
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients),
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_schedule=ns_schedule,
            ns_kernel=ns_kernel,
        )
        self._check_hyper(defaults, "defaults")
        super().__init__(params, defaults)

    # --- hyperparameters -------------------------------------------------------------------
    def _check_hyper(self, g: dict, where: str, at_step: bool = False) -> None:
        self._check_lr(g["lr"], where, at_step)
        self._check_weight_decay(g["weight_decay"], where)
        if not 0.0 <= g["momentum"] < 1.0:
            raise ValueError(f"{self._who}: invalid momentum {g['momentum']} in {where}: need 0 <= momentum < 1")
        if not g["eps"] >= 0.0:
            raise ValueError(f"{self._who}: invalid eps {g['eps']} in {where}: must be >= 0")
        if g["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(f"{self._who}: adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {g['adjust_lr_fn']!r} in {where}")
        try:
            self._schedule(g)
            ns.check_kernel(g.get("ns_kernel", "torch"))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self._who}: {e} (in {where})") from None

    @staticmethod
    def _schedule(g: dict) -> tuple[list, float]:
        """(per-iteration triples, norm safety factor) of a group."""
        sched = g.get("ns_schedule")
        if sched is None:
            return ns.schedule_of(g["ns_coefficients"], g["ns_steps"]), 1.0
        if isinstance(sched, str):
            if sched != "polar_express":
                raise ValueError(f"ns_schedule must be 'polar_express' or a list of (a, b, c), got {sched!r}")
            return ns.schedule_of(ns.POLAR_EXPRESS, g["ns_steps"]), ns.POLAR_EXPRESS_SAFETY
        return ns.schedule_of(sched, g["ns_steps"]), 1.0

    def _validate_group(self, group: dict, index: int, at_step: bool = False) -> None:
        where = f"param group {index}"
        self._check_hyper(group, where, at_step)
        if not at_step:  # ndim cannot change between steps; keep step() cheap
            for k, p in enumerate(group["params"]):
                if p.ndim < 2:
                    raise ValueError(
                        f"{self._who}: param {k} of {where} has shape {tuple(p.shape)}; Muon orthogonalizes "
                        "matrices (ndim >= 2). Biases, norms and scalars (and embeddings/heads) belong to "
                        "AdamW: use fusedopt.MuonWithAdamW(model, ...) to route them."
                    )
                if group.get("ns_kernel", "torch") == "symmetric" and p.device.type != "cuda":
                    raise ValueError(f"{self._who}: param {k} of {where} is on {p.device}; ns_kernel='symmetric' "
                                     "is fusedopt's CUDA kernel: use ns_kernel='torch' for CPU params")

    def _graph_capture_check(self) -> None:
        # Not torch's: its check reads group["capturable"], which Muon's groups (as
        # torch.optim.Muon's) do not have; torch skips it only while _warned_capturable_if_run_uncaptured
        # is set, which deepcopy and pickle drop (a KeyError at step wherever CUDA is available).
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{self._who}: step() cannot be captured in a CUDA graph (Muon has no capturable "
                               "mode); step it outside the graph")

    # --- state -----------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict, grad_dtype: torch.dtype | None = None) -> dict:
        # In the grad's dtype, as torch.optim.Muon (zeros_like(p.grad)): fp32 grads of a bf16
        # param keep an fp32 momentum.
        dtype = grad_dtype or p.dtype
        return {"momentum_buffer": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)}

    def _load_param_state(self, p: torch.Tensor, saved: dict, group: dict, where: str) -> dict:
        self._check_loaded_shapes(p, saved, where)
        buf = saved.get("momentum_buffer")
        if buf is None:
            raise ValueError(f"{where}: state lacks 'momentum_buffer'")
        if not buf.is_floating_point():
            raise ValueError(f"{where}: state['momentum_buffer'] is {buf.dtype}, expected a floating-point tensor")
        state = {k: v for k, v in saved.items() if k != "momentum_buffer"}
        # torch casts to the param's dtype; an fp32 buffer (fp32 grads of a bf16 param) stays fp32
        # here, so a resumed run continues bitwise and no precision is dropped.
        dtype = torch.float32 if buf.dtype == torch.float32 else p.dtype
        state["momentum_buffer"] = self._copy_like(p, buf, dtype)
        return state

    def _normalize_loaded_group(self, group: dict) -> None:
        super()._normalize_loaded_group(group)
        group["ns_coefficients"] = tuple(group["ns_coefficients"])

    # --- step ------------------------------------------------------------------------------
    def _step_group(self, group: dict, pairs, grad_scale, found_inf) -> None:
        sched, safety = self._schedule(group)
        fused: dict[tuple, list] = defaultdict(list)
        rest = []
        for p, g in pairs:
            state = self.state[p]
            if len(state) == 0:
                state.update(self._init_state(p, group, g.dtype))
            buf = state["momentum_buffer"]
            if buf.stride() != p.stride() or buf.numel() != p.numel() or buf.device != p.device:  # as in _buckets
                buf = self._mended_moment(p, "momentum_buffer", group, state)
            if p.numel() == 0:
                continue  # nothing to orthogonalize or update (torch.optim.Muon's step is a no-op too)
            if p.is_contiguous() and buf.is_contiguous() and g.is_contiguous():
                # One launch reads every buffer as one dtype: buffers made before a model.to(bf16)
                # stay fp32 beside newer bf16 ones.
                key = (p.device, p.dtype, g.dtype, buf.dtype, p.shape[0], p.numel() // p.shape[0])
                fused[key].append((p, g, buf))
            else:  # e.g. a channels_last conv weight: its memory order is not the flattened matrix's
                rest.append((p, g))
        for (*_, rows, cols), items in fused.items():
            self._step_fused(group, items, rows, cols, sched, safety)
        if rest:
            self._step_torch(group, rest, sched, safety)

    def _step_fused(self, group: dict, items: list, rows: int, cols: int, sched, safety: float) -> None:
        """Same-shape contiguous matrices: the momentum, norm and bf16 cast in one native pass pair
        (csrc/include/fusedopt/math/muon.h), one batched Newton-Schulz, one native update pass."""
        params, grads, bufs = zip(*items)
        x = torch.empty((len(items), rows, cols), dtype=torch.bfloat16, device=params[0].device)
        muon_prepare_(grads, bufs, list(x.unbind(0)), momentum=group["momentum"], nesterov=group["nesterov"],
                      eps=group["eps"], safety=safety)
        o = ns.iterate(x, sched, group.get("ns_kernel", "torch"))
        o = o if o.is_contiguous() else o.contiguous()  # tall matrices come back transposed
        muon_apply_(params, list(o.unbind(0)), lr=group["lr"], weight_decay=group["weight_decay"],
                    lr_factor=lr_factor(group["adjust_lr_fn"], rows, cols))

    def _step_torch(self, group: dict, pairs, sched, safety: float) -> None:
        """The same update in torch ops, for params the native passes do not take."""
        lr, wd, mom = as_float(group["lr"]), group["weight_decay"], group["momentum"]
        updates = []
        for p, g in pairs:
            buf = self.state[p]["momentum_buffer"]
            g = g.to(buf.dtype)  # fp32 grad of a bf16 param; a no-op (same tensor) otherwise: g is only read
            buf.lerp_(g, 1 - mom)
            u = g.lerp(buf, mom) if group["nesterov"] else buf  # u may be the buffer itself: NS only reads it
            updates.append(u.reshape(u.shape[0], -1))
        outs = ns.orthogonalize(updates, coefficients=sched, steps=len(sched), eps=group["eps"], safety=safety,
                                kernel=group.get("ns_kernel", "torch"))
        for (p, _), o in zip(pairs, outs):
            p.mul_(1 - lr * wd)  # decoupled decay with the un-adjusted lr, as every reference
            p.add_(o.reshape(p.shape), alpha=-lr * lr_factor(group["adjust_lr_fn"], *o.shape))


# --- routing -------------------------------------------------------------------------------
_HEAD_MODULES = frozenset({"wte", "wpe", "lm_head", "head", "output"})
_NOT_MUON_MODULES = (nn.Embedding, nn.EmbeddingBag)


def default_is_muon(name: str, p: torch.Tensor) -> bool:
    """The default routing rule: hidden matrices (ndim >= 2) go to Muon, except embeddings and
    output heads, found by name: any dotted part containing 'embed', or an owning module named
    wte, wpe, lm_head, head or output ('output.weight' is a head; 'attention.output.dense.weight'
    is not). Shape alone cannot tell an embedding or a head from a hidden matrix."""
    if p.ndim < 2:
        return False
    parts = name.lower().split(".")
    owner = parts[-2] if len(parts) >= 2 else parts[0]
    return owner not in _HEAD_MODULES and not any("embed" in part for part in parts)


def route_params(params, is_muon: Callable[[str, torch.Tensor], bool] | None = None) -> list[dict]:
    """Param groups with ``use_muon`` set. ``params``: an nn.Module (nn.Embedding weights then go to
    AdamW whatever their name), (name, param) pairs, or group dicts. A group that sets
    ``use_muon`` keeps it; otherwise its params must be named and are split by ``is_muon(name, p)``
    (default :func:`default_is_muon`) into a Muon and an AdamW group with the group's options."""
    rule = is_muon or default_is_muon
    if isinstance(params, nn.Module):
        if is_muon is None:
            embeds = {id(p) for m in params.modules() if isinstance(m, _NOT_MUON_MODULES) for p in m.parameters()}
            rule = lambda n, p: id(p) not in embeds and default_is_muon(n, p)  # noqa: E731
        groups = [{"params": list(params.named_parameters())}]
    else:
        items = [params] if isinstance(params, torch.Tensor) else list(params)
        groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    out = []
    for i, g in enumerate(groups):
        items = g["params"]
        single = isinstance(items, torch.Tensor) or (isinstance(items, tuple) and len(items) == 2 and isinstance(items[0], str))
        items = [items] if single else list(items)
        named = [it if isinstance(it, tuple) else (None, it) for it in items]
        if "use_muon" in g:
            out.append({**g, "params": [p for _, p in named], "use_muon": bool(g["use_muon"])})
            continue
        if any(n is None for n, _ in named):
            raise ValueError(
                f"MuonWithAdamW: group {i} has unnamed tensors and no 'use_muon': an embedding or an output "
                "head cannot be told from a hidden matrix by shape. Pass the model, model.named_parameters(), "
                "or groups with 'use_muon': True/False."
            )
        for flag in (True, False):
            ps = [p for n, p in named if bool(rule(n, p)) == flag]
            if ps:
                out.append({**g, "params": ps, "use_muon": flag})
    return out


def _renumbered(e: Exception, inner: int, outer: int) -> Exception:
    """A child's error about its group `inner`, as the same exception about our group `outer`
    (the index a user of MuonWithAdamW.param_groups knows)."""
    if inner == outer:
        return e
    return type(e)(re.sub(rf"\b(param group|of group) {inner}\b", rf"\g<1> {outer}", str(e)))


class MuonWithAdamW(Optimizer):
    """One optimizer for a whole model: Muon for hidden matrices, fusedopt.AdamW for the rest.

        opt = fusedopt.MuonWithAdamW(model, muon_lr=0.02, adamw_lr=3e-4, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)   # scales both kinds

    Routing: see :func:`route_params` (override with ``is_muon=`` or per-group ``use_muon``).
    ``param_groups`` lists every group, each with its ``use_muon`` flag; they are the very dicts
    the inner ``.muon`` (:class:`Muon`) and ``.adamw`` (:class:`fusedopt.AdamW`) step with, so an LR
    scheduler or a manual ``group['lr'] = ...`` reaches them. ``state`` is one dict for both.
    ``state_dict()`` is a flat torch-format dict over all groups; ``load_state_dict`` checks both
    kinds (shapes, group kinds) before changing either. ``muon_options``/``adamw_options`` pass
    any other constructor argument (e.g. ``ns_schedule``, ``master_weights``).
    ``OneCycleLR``/``CyclicLR`` need ``cycle_momentum=False``: they cycle one option for every
    group, ``momentum`` or ``betas``, and the groups here hold one or the other.
    """

    def __init__(
        self,
        params,
        *,
        muon_lr: float = 0.02,
        adamw_lr: float = 3e-4,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        adjust_lr_fn: str | None = None,
        ns_steps: int = 5,
        betas=(0.9, 0.95),
        eps: float = 1e-8,
        is_muon: Callable[[str, torch.Tensor], bool] | None = None,
        muon_options: dict | None = None,
        adamw_options: dict | None = None,
    ) -> None:
        self._kinds = {
            True: (Muon, dict(lr=muon_lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                              adjust_lr_fn=adjust_lr_fn, ns_steps=ns_steps, **(muon_options or {}))),
            False: (AdamW, dict(lr=adamw_lr, betas=betas, eps=eps, weight_decay=weight_decay, **(adamw_options or {}))),
        }
        self.muon: Muon | None = None  # made with the first group of each kind
        self.adamw: AdamW | None = None
        self._order: list[tuple[bool, int]] = []  # (use_muon, index in that child) per group
        super().__init__(route_params(params, is_muon), {})

    def __getstate__(self) -> dict:
        # torch's keeps defaults, state and param_groups only; the children and the group order
        # go too (deepcopy's memo and pickle keep their groups and state shared with ours).
        return {**super().__getstate__(), "muon": self.muon, "adamw": self.adamw, "_order": self._order,
                "_kinds": self._kinds}

    def _renumbered_child_error(self, e: Exception) -> Exception:
        """A child's load or step error about its group j, naming our group (found from the child's name)."""
        use_muon = str(e).startswith("fusedopt.Muon")
        m = re.search(r"\b(?:param group|of group) (\d+)\b", str(e))
        if m is None or (use_muon, int(m.group(1))) not in self._order:
            return e
        return _renumbered(e, int(m.group(1)), self._order.index((use_muon, int(m.group(1)))))

    def _child(self, use_muon: bool):
        return self.muon if use_muon else self.adamw

    def add_param_group(self, param_group: dict) -> None:
        if "use_muon" not in param_group:
            raise ValueError("MuonWithAdamW.add_param_group: set 'use_muon': True/False in the group")
        use_muon = bool(param_group["use_muon"])
        group = {**param_group, "use_muon": use_muon}
        ps = group["params"]
        reject_param_set(ps)  # torch's check, which list() below would hide from the child
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        # Written back (as torch does): a generator (layer.parameters()) is spent by list().
        group["params"] = param_group["params"] = ps
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in ps):
            raise ValueError("MuonWithAdamW: some parameters appear in more than one parameter group")
        child = self._child(use_muon)
        try:
            if child is None:
                cls, kw = self._kinds[use_muon]
                child = cls([group], **kw)
                setattr(self, "muon" if use_muon else "adamw", child)
            else:
                child.add_param_group(group)  # the child's own checks (1-D to Muon, bad lr, ...)
        except (ValueError, TypeError, RuntimeError) as e:
            inner = 0 if child is None else len(child.param_groups)
            raise _renumbered(e, inner, len(self.param_groups)) from None
        child.state = self.state  # params are disjoint: one dict serves both kinds
        self._order.append((use_muon, len(child.param_groups) - 1))
        self.param_groups.append(child.param_groups[-1])

    def _children(self) -> list[FusedOptimizer]:
        return [c for c in (self.muon, self.adamw) if c is not None]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = {id(c): [None] * len(c.param_groups) for c in self._children()}
        for k, (use_muon, j) in enumerate(self._order):  # both kinds, before either one steps
            child = self._child(use_muon)
            try:
                plans[id(child)][j] = child._check_step_group(child.param_groups[j], j)
            except (ValueError, TypeError, RuntimeError) as e:
                raise _renumbered(e, j, k) from None
        for c in self._children():  # what FusedOptimizer.step checks before a CUDA-graph capture
            c._graph_capture_check()
        for c in self._children():  # not c.step(): global step hooks fire once, for this optimizer
            try:
                c._fused_step(getattr(self, "grad_scale", None), getattr(self, "found_inf", None), plans[id(c)])
            except (ValueError, TypeError, RuntimeError) as e:  # e.g. a param resized after stepping
                raise self._renumbered_child_error(e) from None
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"MuonWithAdamW.load_state_dict: the checkpoint has {len(saved_groups)} param "
                             f"groups, this optimizer has {len(self.param_groups)}")
        subs = {True: {"state": {}, "param_groups": []}, False: {"state": {}, "param_groups": []}}
        for i, ((use_muon, _), saved) in enumerate(zip(self._order, saved_groups)):
            if bool(saved.get("use_muon")) != use_muon:
                raise ValueError(f"MuonWithAdamW.load_state_dict: group {i} is a {'Muon' if use_muon else 'AdamW'} "
                                 "group here but not in the checkpoint")
            sub = subs[use_muon]  # renumber params as the child's own state_dict would
            start = sum(len(g["params"]) for g in sub["param_groups"])
            ids = list(range(start, start + len(saved["params"])))
            for old, new in zip(saved["params"], ids):
                if old in state_dict["state"]:
                    sub["state"][new] = state_dict["state"][old]
            sub["param_groups"].append({**saved, "params": ids})
        before = [(c, c.state, c.param_groups) for c in self._children()]
        try:
            for c in self._children():
                c.load_state_dict(subs[c is self.muon])
        except Exception as e:
            for c, st, gs in before:  # the first child may have loaded before the second raised
                c.state, c.param_groups = st, gs
            if isinstance(e, (ValueError, TypeError, RuntimeError)):
                e = self._renumbered_child_error(e)
            raise e from None
        self.state = defaultdict(dict)
        for c in self._children():
            self.state.update(c.state)
            c.state = self.state
        self.param_groups = [self._child(k).param_groups[j] for k, j in self._order]
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
