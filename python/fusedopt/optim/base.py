"""FusedOptimizer: what every fusedopt optimizer shares on top of torch.optim.Optimizer.

- step(): validates every group before touching anything, then initializes state and runs one
  native launch per (device, dtypes) bucket. Hooks, zero_grad and schedulers come from torch.
- load_state_dict(): torch's checks plus per-tensor shape checks, all before any mutation; loaded
  tensors are copied into this optimizer's own layout and state dtype, so the dict passed in is
  never aliased by later in-place steps.
"""
from __future__ import annotations

import numbers
from collections import defaultdict
from copy import deepcopy
from typing import Any

import torch
from torch.optim import Optimizer

from fusedopt._ops import check_device_supported, is_dense, nvtx_range

SUPPORTED_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def state_dtype_name(d) -> str:
    name = str(d).replace("torch.", "") if isinstance(d, torch.dtype) else str(d)
    if name not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {d!r}")
    return name


def state_dtype_of(d) -> torch.dtype:
    """The torch dtype of a state_dtype option, given as a name or a torch.dtype (a group edited
    after construction may hold either)."""
    return STATE_DTYPES[state_dtype_name(d)]


def as_float(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def policy_numel(p: torch.Tensor) -> int:
    """The element count that decides per-param policies (8-bit or fp32 state): the param's own,
    or, for a piece of a sharded param (fusedopt.ZeroShardedOptimizer), the whole param's."""
    return getattr(p, "_fusedopt_policy_numel", p.numel())


def check_no_overlap(params, who: str, index: int) -> None:
    """Distinct params of one group whose memory overlaps (two Parameters over one storage) would
    race: one launch updates a group's tensors at once (CPU threads, CUDA blocks), where
    torch.optim steps them in turn. Groups launch one after another, as torch's do, so only a
    group's own params are compared (sorting their byte spans). Plain tensors only: a subclass
    (FakeTensor, DTensor) has no meaningful data_ptr, and ZeroShardedOptimizer's pieces
    (_fusedopt_policy_numel) were checked as whole params by the wrapper, on every rank alike."""
    spans = []
    for k, p in enumerate(params):
        if type(p) in (torch.Tensor, torch.nn.Parameter) and p.numel() > 0 and p.device.type != "meta" \
                and not hasattr(p, "_fusedopt_policy_numel"):
            extent = 1 + sum((n - 1) * abs(st) for n, st in zip(p.shape, p.stride()))
            spans.append((str(p.device), p.data_ptr(), p.data_ptr() + extent * p.element_size(), k))
    spans.sort()
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            raise ValueError(
                f"{who}: params {min(a[3], b[3])} and {max(a[3], b[3])} of group {index} share memory; one launch updates a group's "
                "params at once, so overlapping ones would race (torch.optim steps them in turn). Tie them as "
                "one Parameter, give each its own memory, or put them in separate param groups"
            )


def reject_param_set(params) -> None:
    """torch.optim's refusal of a group's params given as a set (their order, and so a checkpoint's
    param ids, would change between runs); add_param_group here turns params into a list before
    torch's own check could see the set."""
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                        "tensors in sets will change between runs. Please use a list instead.")


def reject_torch_only_flags(who: str, foreach, fused, differentiable) -> None:
    if foreach:
        raise ValueError(f"{who} always runs one fused multi-tensor kernel; foreach=True does not apply (leave it None)")
    if fused is False:
        raise ValueError(f"{who} is always fused; fused=False is not available (use torch.optim for an unfused step)")
    if differentiable:
        raise ValueError(f"{who} does not support differentiable=True (the update runs in a native kernel)")


class FusedOptimizer(Optimizer):
    # Tensor state keys that hold one value per param element (checked against the param's shape on load).
    _elementwise_state_keys: tuple[str, ...] = ()
    # GradScaler hands us grad_scale/found_inf; the kernel unscales in registers and skips on inf.
    # A class attribute: torch's __getstate__ keeps only state, param_groups and defaults, so an
    # instance flag was lost by deepcopy and pickle (GradScaler then rewrote .grad).
    _step_supports_amp_scaling = True

    @property
    def _who(self) -> str:
        return f"fusedopt.{type(self).__name__}"

    # --- hyperparameters -------------------------------------------------------------------
    def _validate_group(self, group: dict, index: int, at_step: bool = False) -> None:
        """Raise ValueError naming the group and the fix; subclasses extend. at_step: called by
        step(), where nothing may sync with the device."""

    def _check_lr(self, lr, where: str, at_step: bool) -> None:
        if not isinstance(lr, (numbers.Real, torch.Tensor)):  # numpy scalars are Real, as torch takes them
            # torch fails on the comparison; a str lr would otherwise reach the kernel as 0.1 here
            # and as a TypeError in any scheduler that multiplies it
            raise TypeError(f"{self._who}: lr in {where} is a {type(lr).__name__}; pass a float or a 1-element tensor")
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"{self._who}: lr tensor in {where} must have 1 element")
        # A device lr is read in the kernel: reading it here would sync every step and break graph
        # capture, so its value is checked when the group is created, not at each step.
        device_lr = isinstance(lr, torch.Tensor) and lr.device.type != "cpu"
        if not (at_step and device_lr) and not as_float(lr) >= 0.0:
            raise ValueError(f"{self._who}: invalid learning rate {as_float(lr)} in {where}: lr must be >= 0")

    def _check_betas(self, betas, where: str, at_step: bool = False) -> None:
        if len(betas) != 2:
            raise ValueError(f"{self._who}: betas in {where} must be a pair (beta1, beta2), got {betas!r}")
        for k, b in enumerate(betas):
            if at_step and isinstance(b, torch.Tensor) and b.device.type != "cpu":
                # The kernels take betas as host floats, so a device beta is read (synced) each
                # step: within a CUDA graph capture that read would abort the capture.
                if b.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    raise RuntimeError(
                        f"{self._who}: beta {k} in {where} is a {b.device} tensor, which step() reads on the host "
                        "each step and a CUDA graph cannot; pass betas as floats or CPU tensors to capture the step"
                    )
                continue  # as a device lr: its range was checked when the group was made
            if not 0.0 <= as_float(b) < 1.0:
                raise ValueError(f"{self._who}: invalid beta parameter at index {k} ({as_float(b)}) in {where}: need 0 <= beta < 1")

    def _check_weight_decay(self, wd, where: str) -> None:
        if not wd >= 0.0:
            raise ValueError(f"{self._who}: invalid weight_decay {wd} in {where}: must be >= 0")

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        reject_param_set(params)  # torch's check, which list() below would hide from it
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        # Written back into the caller's dict, as torch does: a generator (model.parameters() in a
        # group dict) is spent by list().
        param_group["params"] = params
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # (name, param) pairs too
        if len({id(p) for p in tensors}) != len(tensors):
            # torch only warns; a fused kernel would update the shared memory twice in one launch
            raise ValueError(f"{self._who}: a param group lists the same parameter twice; pass each parameter once")
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            check_no_overlap(group["params"], self._who, len(self.param_groups) - 1)
            if "state_dtype" in group:  # as the constructor stores it: torch.bfloat16 -> "bfloat16"
                group["state_dtype"] = state_dtype_name(group["state_dtype"])
            self._validate_group(group, len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    # --- step ------------------------------------------------------------------------------
    def _grads_of(self, group: dict, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(param, grad) for params with a grad, after checking everything the kernel assumes.

        The common case costs a few attribute reads per param; the detailed diagnosis runs only
        when a check fails.
        """
        pairs = []
        device = None
        strided, f32 = torch.strided, torch.float32  # layouts and dtypes are singletons: `is` compares
        for k, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            p_dtype, g_dtype, p_device = p.dtype, g.dtype, p.device
            if (
                g.layout is not strided
                or p_dtype not in SUPPORTED_PARAM_DTYPES
                or (g_dtype is not p_dtype and g_dtype is not f32)
                or g.shape != p.shape
                or g.device != p_device
                or not (p.is_contiguous() or is_dense(p))
            ):
                self._raise_bad_param(p, g, k, index)
            if device is None:
                device = p_device
                check_device_supported(device, self._who)
                self._check_state_device(p, k, index)  # per group here, so model.to() raises before any group steps
            elif p_device != device:
                raise RuntimeError(
                    f"{self._who}: param {k} of group {index} is on {p_device} but the group also has params "
                    f"on {device}; put params of different devices in different param groups"
                )
            if g.stride() != p.stride():
                # A grad laid out differently from its param (rare: autograd keeps them alike) is
                # copied, never rewritten: .grad itself is left untouched.
                g = torch.empty_like(p, dtype=g.dtype).copy_(g)
            pairs.append((p, g))
        return pairs

    def _check_state_device(self, p: torch.Tensor, k: int, index: int, state: dict | None = None) -> None:
        """model.to(device) moves a param in place (the same object) and leaves its state behind,
        where a kernel would dereference the other device's pointers; torch.optim raises a device
        mismatch. step() runs this on each group's first param before any group steps (a moved
        model fails there); _buckets compares every param's first moment as its group launches."""
        state = self.state.get(p) if state is None else state
        for key, v in (state or {}).items():
            if isinstance(v, torch.Tensor) and v.device != p.device:
                raise RuntimeError(
                    f"{self._who}: param {k} of group {index} is on {p.device} but its state '{key}' is on "
                    f"{v.device} (was the model moved after the optimizer was made?); move the state with "
                    "opt.load_state_dict(opt.state_dict()) after moving the model, or make the optimizer after "
                    "model.to(device)"
                )

    def _mended_moment(self, p: torch.Tensor, key: str, group: dict, state: dict) -> torch.Tensor:
        """state[key], a moment every launch reads, which the caller found to differ from p in
        strides, numel or device (a per-param check on the hot path; the same numel in another
        shape has other strides, so it lands here too). A moment laid out differently from p
        (model.to(memory_format=channels_last) after the state was made) would pair p[i] with the
        wrong element, so the state is re-laid out as load_state_dict would lay it out; a moment
        of another shape (a resized param) raises, as torch's elementwise ops do, and one on
        another device raises (_check_state_device)."""
        m = state[key]
        index = next(i for i, grp in enumerate(self.param_groups) if grp is group)
        k = next(k for k, q in enumerate(group["params"]) if q is p)
        self._check_state_device(p, k, index, state)
        if m.shape != p.shape:
            raise RuntimeError(
                f"{self._who}: param {k} of group {index} has shape {tuple(p.shape)} but its state '{key}' has "
                f"shape {tuple(m.shape)} (was the param resized after the optimizer stepped?); drop its state "
                "(del opt.state[param]: its moments restart) or load a checkpoint made for this shape"
            )
        if m.stride() != p.stride():  # also where only size-1 dims differ: then the fast path holds again
            converted = self._load_param_state(p, dict(state), group, f"{self._who}: param {k} of group {index}")
            state.clear()
            state.update(converted)
        return state[key]

    def _raise_bad_param(self, p: torch.Tensor, g: torch.Tensor, k: int, index: int) -> None:
        where = f"{self._who}: param {k} of group {index} (shape {tuple(p.shape)}, {p.dtype})"
        if g.layout != torch.strided:
            raise RuntimeError(f"{where} has a {g.layout} gradient; fusedopt needs dense grads (use torch.optim.SparseAdam)")
        if p.is_complex():
            raise RuntimeError(f"{where} is complex; optimize torch.view_as_real(param) instead")
        if p.dtype not in SUPPORTED_PARAM_DTYPES:
            raise RuntimeError(f"{where}: dtype {p.dtype} is not supported; use float32, bfloat16 or float16")
        if g.dtype != p.dtype and g.dtype != torch.float32:
            raise RuntimeError(f"{where}: grad dtype {g.dtype} must equal the param dtype or be float32")
        if g.shape != p.shape:
            raise RuntimeError(f"{where}: grad shape {tuple(g.shape)} differs from the param's")
        if g.device != p.device:
            raise RuntimeError(f"{where}: grad is on {g.device}, param on {p.device}")
        raise RuntimeError(f"{where} is a non-dense view (strides {p.stride()}); pass a contiguous tensor")

    def _graph_capture_check(self) -> None:
        """torch.optim's check before a CUDA-graph-captured step (capturable=False refused, ...),
        under either of the names torch releases give it."""
        check = getattr(self, "_accelerator_graph_capture_health_check", None) or getattr(
            self, "_cuda_graph_capture_health_check", None
        )
        if check is not None:
            check()

    @torch.no_grad()
    def step(self, closure=None):
        self._graph_capture_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._fused_step(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        return loss

    def _fused_step(self, grad_scale, found_inf, plans: list | None = None) -> None:
        """step() without the closure and torch's hooks (the ZeRO wrapper and MuonWithAdamW step
        their inner optimizers through this, so a user's global step hooks fire once per step).
        plans: per group, the (param, grad) pairs of _check_step_group, from a caller that has
        already checked everything it checks (else it runs here)."""
        # Validate every group before the first state tensor is created or the first kernel runs.
        if plans is None:
            plans = [self._check_step_group(group, i) for i, group in enumerate(self.param_groups)]
        device = next((pairs[0][0].device for pairs in plans if pairs), torch.device("cpu"))
        with nvtx_range(f"fusedopt.{type(self).__name__}.step", device):
            for group, pairs in zip(self.param_groups, plans):
                if pairs:
                    self._step_group(group, pairs, grad_scale, found_inf)

    def _check_step_group(self, group: dict, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Everything step() checks in one group before anything is mutated; returns _grads_of's pairs."""
        self._validate_group(group, index, at_step=True)
        if group.get("capturable") and any(p.device.type == "cpu" for p in group["params"]):
            # torch.optim asserts the same: capturable promises device-resident step and lr. Judged
            # from the params, not the grads, so every rank of a sharded step raises alike.
            raise RuntimeError(
                f"{self._who}: param group {index} has capturable=True but its params are on the CPU; "
                "capturable applies to CUDA params only (leave it False on the CPU)"
            )
        return self._grads_of(group, index)

    def _step_group(self, group: dict, pairs, grad_scale, found_inf) -> None:
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        raise NotImplementedError

    def _buckets(self, group: dict, pairs) -> dict[tuple, list]:
        """Initialize missing state, then split (param, grad, state) triples into one bucket per
        native launch: same device, param/grad/state dtypes and master-weights flag."""
        buckets: dict[tuple, list] = {}
        device = pairs[0][0].device if pairs else None  # one per group (_grads_of)
        f32 = torch.float32
        for p, g in pairs:
            state = self.state[p]
            if len(state) == 0:
                state.update(self._init_state(p, group))
            p_dtype = p.dtype
            master = p_dtype is not f32 and "master_param" in state
            m = state["exp_avg"]
            # inline, not a call: this is per param per step (see _mended_moment)
            if m.stride() != p.stride() or m.numel() != p.numel() or m.device != device:
                m = self._mended_moment(p, "exp_avg", group, state)
            key = (device, p_dtype, g.dtype, m.dtype, master)
            buckets.setdefault(key, []).append((p, g, state))
        return buckets

    # --- state -----------------------------------------------------------------------------
    @staticmethod
    def _new_step(p: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        # CPU params: the counter is a CPU float32 scalar, as in torch. CUDA params: it lives on the
        # device (as torch's fused/capturable paths), so the kernel reads it without a host sync.
        device = p.device if p.device.type == "cuda" else "cpu"
        return torch.tensor(float(value), dtype=torch.float32, device=device)

    def _load_param_state(self, p: torch.Tensor, saved: dict, group: dict, where: str) -> dict:
        """Convert one param's loaded state to this optimizer's layout; raise before any mutation."""
        raise NotImplementedError

    @staticmethod
    def _wants_master(group: dict, p: torch.Tensor) -> bool:
        return group.get("master_weights", False) and p.dtype != torch.float32

    @staticmethod
    def _copy_like(p: torch.Tensor, src, dtype: torch.dtype) -> torch.Tensor:
        """A fresh tensor with p's layout and device, holding src in dtype."""
        return torch.empty_like(p, dtype=dtype).copy_(src)

    def _check_loaded_shapes(self, p: torch.Tensor, saved: dict, where: str) -> None:
        for key in self._elementwise_state_keys:
            v = saved.get(key)
            if v is None:
                continue
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{where}: state['{key}'] is a {type(v).__name__}, expected a tensor")
            if v.shape != p.shape:
                raise ValueError(
                    f"{where}: state['{key}'] has shape {tuple(v.shape)} but the param has shape {tuple(p.shape)}; "
                    "the checkpoint does not belong to these parameters (or their order changed)"
                )
        if "step" in saved and torch.as_tensor(saved["step"]).numel() != 1:
            raise ValueError(f"{where}: state['step'] must be a scalar")

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        saved_groups, new_groups = self._loaded_groups(state_dict, self.param_groups)
        state: defaultdict = defaultdict(dict)
        for key, loaded in self._loaded_states(state_dict, saved_groups, new_groups):
            state[key] = loaded
        self.__setstate__({"state": state, "param_groups": new_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded_groups(self, state_dict: dict, groups: list[dict], who: str | None = None) -> tuple[list, list]:
        """(the checkpoint's groups, the groups to install over `groups`' params), checked."""
        who = who or self._who
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"{who}.load_state_dict: the checkpoint has {len(saved_groups)} param groups, "
                f"this optimizer has {len(groups)}"
            )
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"{who}.load_state_dict: group {i} has {len(g['params'])} params here but "
                    f"{len(sg['params'])} in the checkpoint"
                )
        new_groups = []
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            ng = dict(sg)
            ng["params"] = g["params"]
            if "param_names" in g and "param_names" not in ng:
                ng["param_names"] = g["param_names"]
            for k, v in g.items():  # keys a torch.optim checkpoint lacks keep this optimizer's value
                ng.setdefault(k, v)
            self._normalize_loaded_group(ng)
            self._validate_group(ng, i)
            new_groups.append(ng)
        return saved_groups, new_groups

    def _loaded_states(self, state_dict: dict, saved_groups: list, new_groups: list, who: str | None = None):
        """(param or unknown id, its state converted by _load_param_state), one at a time: each
        raises naming the param before anything is installed."""
        who = who or self._who
        id_map: dict[Any, tuple[torch.Tensor, dict, int, int]] = {}
        for i, (sg, ng) in enumerate(zip(saved_groups, new_groups)):
            for j, (pid, p) in enumerate(zip(sg["params"], ng["params"])):
                id_map[pid] = (p, ng, i, j)
        for pid, saved in state_dict["state"].items():
            if pid not in id_map:
                yield pid, saved
                continue
            p, ng, i, j = id_map[pid]
            where = f"{who}.load_state_dict: param {j} of group {i} (shape {tuple(p.shape)})"
            yield p, (self._load_param_state(p, saved, ng, where) if saved else {})

    def _normalize_loaded_group(self, group: dict) -> None:
        """Coerce option formats of a loaded group in place; subclasses extend."""
        if "state_dtype" in group:
            group["state_dtype"] = state_dtype_name(group["state_dtype"])
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        # A torch.optim checkpoint records which of torch's implementations ran (foreach=True,
        # fused=False); fusedopt has one, so the choice does not carry over and loading must not fail.
        if group.get("foreach"):
            group["foreach"] = None
        if group.get("fused") is False:
            group["fused"] = None
