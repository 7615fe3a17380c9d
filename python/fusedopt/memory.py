"""Memory accountant: what an optimizer's state costs, measured and declared, and planned at scale.

- :func:`memory_report` measures the state an optimizer has allocated, per param group, and
  cross-checks it against the layout its class declares (:data:`LAYOUTS`).
- :func:`plan_memory` plans a model that is never allocated (e.g. 7.5B params on 64 ranks under
  ZeRO stage 0..3) from the same :class:`StateLayout` formulas.

State is sorted into kinds by key name alone, so an optimizer written later (same key names)
is measured without changes here; only its declared layout needs a line in :data:`LAYOUTS`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

import fusedopt.optim as fused
from fusedopt.optim.base import policy_numel, state_dtype_name
from fusedopt.quant import BLOCK

KINDS = ("moments", "absmax", "master", "step", "other")
MOMENT_KEYS = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"})


def state_kind(key: str) -> str:
    """The kind a state entry counts as, from its key: 'exp_avg' -> moments, 'exp_avg_absmax' ->
    absmax (8-bit block scales), 'master_param' -> master, 'step' -> step, anything else -> other."""
    if key == "step":
        return "step"
    if key.endswith("_absmax"):
        return "absmax"
    if key.startswith("master"):
        return "master"
    return "moments" if key in MOMENT_KEYS else "other"


@dataclass(frozen=True)
class StateBytes:
    """Bytes of optimizer state, by kind."""

    moments: int = 0
    absmax: int = 0
    master: int = 0
    step: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, k) for k in KINDS)

    def __add__(self, other: StateBytes) -> StateBytes:
        return StateBytes(**{k: getattr(self, k) + getattr(other, k) for k in KINDS})


# --- declared layouts --------------------------------------------------------------------------
_ITEMSIZE = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class StateLayout:
    """What an optimizer allocates per parameter; the formula both the report and the plan use.

    moment_dtype: "float32", "bfloat16", "param" (the param's own dtype, as torch.optim), "grad"
    (the grad's dtype, as Muon's momentum: fp32 for fp32 grads of a bf16 param; the param's when
    no grad is there to tell) or "8bit" (uint8 codes plus one fp32 absmax per 256-element block for params with at least
    ``min_8bit_size`` elements; smaller params keep fp32 moments).
    """

    moments: int
    moment_dtype: str
    step: bool = False  # one 0-dim fp32 step tensor per param
    master_weights: bool = False  # an fp32 copy of each bf16/fp16 param
    min_8bit_size: int = 4096

    def __post_init__(self):
        if self.moment_dtype not in (*_ITEMSIZE, "param", "grad", "8bit"):
            raise ValueError(f"no formula for moment dtype {self.moment_dtype!r}")

    def _itemsize(self, param_dtype: torch.dtype, grad_dtype: torch.dtype | None) -> int:
        if self.moment_dtype == "param":
            return param_dtype.itemsize
        if self.moment_dtype == "grad":
            return (grad_dtype or param_dtype).itemsize
        if self.moment_dtype == "8bit":
            return 4  # a param below min_8bit_size keeps fp32 moments
        return _ITEMSIZE[self.moment_dtype]

    def bytes(self, numel: int, param_dtype: torch.dtype, policy_numel: int | None = None,
              grad_dtype: torch.dtype | None = None) -> StateBytes:
        """State of a param (or, sharded, of a piece of one) of `numel` elements; whether it is
        8-bit is decided by `policy_numel`, the whole param's count (default: numel)."""
        policy = numel if policy_numel is None else policy_numel
        if self.moment_dtype == "8bit" and policy >= self.min_8bit_size:
            moments, absmax = self.moments * numel, self.moments * 4 * math.ceil(numel / BLOCK)
        else:
            moments, absmax = self.moments * self._itemsize(param_dtype, grad_dtype) * numel, 0
        master = 4 * numel if self.master_weights and param_dtype != torch.float32 else 0
        return StateBytes(moments=moments, absmax=absmax, master=master, step=4 if self.step else 0)


def _fused_adam(g: dict) -> StateLayout:
    return StateLayout(2 + g["amsgrad"], state_dtype_name(g["state_dtype"]), step=True, master_weights=g["master_weights"])


def _fused_adam8bit(g: dict) -> StateLayout:
    return StateLayout(2, "8bit", step=True, master_weights=g["master_weights"], min_8bit_size=g["min_8bit_size"])


def _fused_lion(g: dict) -> StateLayout:
    return StateLayout(1, state_dtype_name(g["state_dtype"]), master_weights=g["master_weights"])


def _fused_lion8bit(g: dict) -> StateLayout:
    return StateLayout(1, "8bit", master_weights=g["master_weights"], min_8bit_size=g["min_8bit_size"])


def _torch_adam(g: dict) -> StateLayout:
    return StateLayout(2 + g["amsgrad"], "param", step=True)


# Exact class -> the layout a param group of it allocates. A subclass may allocate differently,
# so it is not looked up through the MRO: unlisted classes get declared=None.
LAYOUTS: dict[type, Callable[[dict], StateLayout]] = {
    fused.Adam: _fused_adam,
    fused.AdamW: _fused_adam,
    fused.Adam8bit: _fused_adam8bit,
    fused.AdamW8bit: _fused_adam8bit,
    fused.Lion: _fused_lion,
    fused.Lion8bit: _fused_lion8bit,
    # Muon: one momentum_buffer in the grad's dtype, no step; the router's groups say their kind
    fused.Muon: lambda g: StateLayout(1, "grad"),
    fused.MuonWithAdamW: lambda g: StateLayout(1, "grad") if g["use_muon"] else _fused_adam(g),
    torch.optim.Adam: _torch_adam,
    torch.optim.AdamW: _torch_adam,
}


# --- report ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupReport:
    """One param group (or the total). bytes_per_param divides by every param element, with or
    without state yet; declared covers the params that have state (torch allocates it lazily)."""

    name: str
    num_params: int  # elements
    num_tensors: int
    tensors_with_state: int
    measured: StateBytes
    declared: StateBytes | None

    @property
    def consistent(self) -> bool | None:
        """measured == declared for every kind; None when the class has no declared layout."""
        return None if self.declared is None else self.measured == self.declared

    @property
    def bytes_per_param(self) -> float:
        return self.measured.total / self.num_params if self.num_params else 0.0


@dataclass(frozen=True)
class Sharding:
    """How the state is split across ranks: with fusedopt.ZeroShardedOptimizer each rank holds
    about 1/factor of it (factor = world_size); otherwise world_size=1, rank=0, factor=1.
    params_total counts the whole model's params, the report's num_params this rank's share."""

    world_size: int = 1
    rank: int = 0
    factor: int = 1
    params_total: int | None = None


@dataclass(frozen=True)
class StepPeak:
    """CUDA memory around one optimizer.step(), in bytes (torch.cuda.memory_allocated and
    max_memory_allocated summed over the params' devices)."""

    allocated_before: int
    peak: int
    allocated_after: int

    @property
    def transient(self) -> int:
        """Bytes the step needed above what it left allocated (temporaries, not new state)."""
        return self.peak - self.allocated_after


@dataclass(frozen=True)
class MemoryReport:
    """What :func:`memory_report` returns; ``print(report)`` shows :meth:`table`."""

    optimizer: str
    groups: list[GroupReport]
    total: GroupReport
    sharding: Sharding = field(default_factory=Sharding)
    step_peak: StepPeak | None = None

    @property
    def consistent(self) -> bool | None:
        return self.total.consistent

    def table(self) -> str:
        header = ["group", "params", "tensors", "w/ state", *KINDS, "total", "B/param", "declared", "consistent"]
        rows = [
            [g.name, f"{g.num_params:,}", str(g.num_tensors), str(g.tensors_with_state),
             *(f"{getattr(g.measured, k):,}" for k in KINDS), f"{g.measured.total:,}", f"{g.bytes_per_param:.4f}",
             "-" if g.declared is None else f"{g.declared.total:,}",
             {None: "no formula", True: "yes", False: "NO"}[g.consistent]]
            for g in [*self.groups, self.total]
        ]
        s = self.sharding
        if self.step_peak is None:
            peak = "step peak: not measured (needs CUDA params and measure_step_peak=True)"
        else:
            p = self.step_peak
            peak = (f"step peak (CUDA): {p.peak - p.allocated_before:,} B above the allocation before the step, "
                    f"{p.transient:,} B transient")
        return "\n".join([
            f"{self.optimizer}: optimizer state, measured from allocated storages (bytes)",
            render_table(header, rows),
            f"sharding: world_size={s.world_size} rank={s.rank} factor={s.factor}"
            + ("" if s.params_total is None else f"; this rank owns the state of {self.total.num_params:,} of "
               f"{s.params_total:,} params ({self.total.measured.total:,} B here)"),
            peak,
        ])

    def __str__(self) -> str:
        return self.table()


def render_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Columns aligned: the first `left` (labels) to the left, the others (numbers) to the right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in [header, *rows]
    )


def _public_name(cls: type) -> str:
    """'fusedopt.AdamW' / 'torch.optim.AdamW' rather than the defining module's path."""
    for prefix, module in (("fusedopt", fused), ("torch.optim", torch.optim)):
        if getattr(module, cls.__name__, None) is cls:
            return f"{prefix}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _storage_key(t: torch.Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()


def _group_report(optimizer, index: int, group: dict, seen: set) -> GroupReport:
    layout_of = LAYOUTS.get(type(optimizer))
    layout = layout_of(group) if layout_of else None
    measured = dict.fromkeys(KINDS, 0)
    declared = StateBytes()
    with_state = 0
    for p in group["params"]:
        state = optimizer.state.get(p)
        if not state:
            continue
        with_state += 1
        if layout:
            declared += layout.bytes(p.numel(), p.dtype, policy_numel(p), None if p.grad is None else p.grad.dtype)
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue  # e.g. a Python-number step: no tensor memory
            k = _storage_key(value)
            if k not in seen:  # views and shared storages are counted once
                seen.add(k)
                measured[state_kind(key)] += value.untyped_storage().nbytes()
    return GroupReport(
        name=str(index),
        num_params=sum(p.numel() for p in group["params"]),
        num_tensors=len(group["params"]),
        tensors_with_state=with_state,
        measured=StateBytes(**measured),
        declared=declared if layout else None,
    )


def _step_peak(optimizer, closure) -> StepPeak | None:
    devices = {p.device for g in optimizer.param_groups for p in g["params"] if p.device.type == "cuda"}
    if not devices:
        return None
    for d in devices:
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
    before = sum(torch.cuda.memory_allocated(d) for d in devices)
    optimizer.step(closure)
    for d in devices:
        torch.cuda.synchronize(d)
    return StepPeak(before, sum(torch.cuda.max_memory_allocated(d) for d in devices),
                    sum(torch.cuda.memory_allocated(d) for d in devices))


def memory_report(optimizer: torch.optim.Optimizer, *, measure_step_peak: bool = False, closure=None) -> MemoryReport:
    """Measure the optimizer's resident state per param group and in total.

    Measured bytes are summed over the storages the state tensors actually use
    (``untyped_storage().nbytes()``), each distinct storage once: views and shared buffers are
    not double counted, and a state tensor sharing a param's storage adds nothing (the param is
    counted as weights, not state). Each group is cross-checked against the layout its exact
    class declares in :data:`LAYOUTS`: ``declared`` is None and ``consistent`` is None for
    classes not listed there (any torch.optim optimizer can still be measured).

    For a :class:`fusedopt.ZeroShardedOptimizer` the report covers this rank: the state of the
    pieces it owns (``num_params`` counts their elements), with ``sharding`` saying the world size,
    rank and the whole model's param count; elsewhere ``sharding`` is world_size=1, factor=1.

    measure_step_peak: when a param is on CUDA, run ``optimizer.step(closure)`` once (this
    updates the params) between ``reset_peak_memory_stats`` and ``max_memory_allocated`` and
    report that in ``step_peak``, apart from the resident state (which is measured after that
    step). With a closure the peak includes its forward and backward. The peak stats of those
    devices are reset. On CPU nothing is run and ``step_peak`` is None. This CUDA path has not
    been run on hardware yet (it was written on a machine without a GPU).
    """
    if isinstance(optimizer, fused.ZeroShardedOptimizer):
        # This rank's state is its inner optimizer's, over the pieces it owns.
        inner = memory_report(optimizer.inner, measure_step_peak=False)
        step_peak = _step_peak(optimizer, closure) if measure_step_peak else None
        total_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        sharding = Sharding(optimizer.world_size, optimizer.rank, optimizer.world_size, total_params)
        return replace(inner, optimizer=f"fusedopt.ZeroShardedOptimizer({inner.optimizer})", sharding=sharding,
                       step_peak=step_peak)
    step_peak = _step_peak(optimizer, closure) if measure_step_peak else None
    # Params are weights, not state: a state entry aliasing one costs no extra memory.
    seen = {_storage_key(p) for g in optimizer.param_groups for p in g["params"]}
    groups = [_group_report(optimizer, i, g, seen) for i, g in enumerate(optimizer.param_groups)]
    declared = [g.declared for g in groups]
    total = GroupReport(
        name="total",
        num_params=sum(g.num_params for g in groups),
        num_tensors=sum(g.num_tensors for g in groups),
        tensors_with_state=sum(g.tensors_with_state for g in groups),
        measured=sum((g.measured for g in groups), StateBytes()),
        declared=None if None in declared else sum(declared, StateBytes()),
    )
    return MemoryReport(_public_name(type(optimizer)), groups, total, step_peak=step_peak)


# --- planning ----------------------------------------------------------------------------------
# Per optimizer: the state layout of one param. The per-tensor step counter (4 B a tensor) is
# left out of plans: it depends on the tensor count, not the param count, and is negligible.
PLAN_OPTIMIZERS: dict[str, StateLayout] = {
    "adamw": StateLayout(2, "float32"),
    "adamw-bf16-states": StateLayout(2, "bfloat16"),
    "adamw8bit": StateLayout(2, "8bit"),
    "lion": StateLayout(1, "float32"),
    "lion-bf16": StateLayout(1, "bfloat16"),
    "lion8bit": StateLayout(1, "8bit"),
    "muon": StateLayout(1, "float32"),  # momentum of the matrices; the rest runs AdamW (plan it as adamw)
}
# precision -> (param and grad dtype, fp32 master weights?)
PRECISIONS: dict[str, tuple[torch.dtype, bool]] = {
    "fp32": (torch.float32, False),
    "bf16-mixed": (torch.bfloat16, True),
    "fp16-mixed": (torch.float16, True),
    "bf16": (torch.bfloat16, False),  # pure bf16: no master copy
}
COMPONENTS = ("weights", "grads", "master", "states")
# ZeRO stage -> the components split across the data-parallel ranks (Rajbhandari et al. 2020).
SHARDED = {0: (), 1: ("master", "states"), 2: ("grads", "master", "states"), 3: COMPONENTS}
GB = 1e9  # decimal GB, as the ZeRO paper counts (7.5e9 params x 16 B = 120 GB)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-rank memory of weights, grads, master weights and optimizer states for a model that
    is not allocated. Activations, temporary buffers, step counters and allocator fragmentation
    are not included. 8-bit rows assume every tensor is large enough (>= 4096 elements) to be
    quantized."""

    params: int
    optimizer: str
    precision: str
    world_size: int
    stage: int
    bytes_per_param: dict[str, float]  # unsharded, by component

    @property
    def k(self) -> float:
        """The ZeRO paper's K: bytes per param of master weights plus optimizer states."""
        return self.bytes_per_param["master"] + self.bytes_per_param["states"]

    def per_rank_gb(self, stage: int | None = None) -> dict[str, float]:
        stage = self.stage if stage is None else stage
        return {c: self.params * b / (self.world_size if c in SHARDED[stage] else 1) / GB
                for c, b in self.bytes_per_param.items()}

    def total_gb(self, stage: int | None = None) -> float:
        return sum(self.per_rank_gb(stage).values())

    def table(self) -> str:
        bpp = ", ".join(f"{c} {b:g}" for c, b in self.bytes_per_param.items())
        rows = [[f"{s}{' *' if s == self.stage else ''}", "+".join(SHARDED[s]) or "-",
                 *(f"{v:.2f}" for v in self.per_rank_gb(s).values()), f"{self.total_gb(s):.2f}"]
                for s in SHARDED]
        return "\n".join([
            f"{self.optimizer}, {self.params / 1e9:g}B params, {self.precision}, {self.world_size} ranks: "
            f"bytes/param {bpp} (K = {self.k:g})",
            "GB (1e9 bytes) per rank; * = the stage asked for",
            render_table(["stage", "sharded", *COMPONENTS, "total"], rows, left=2),
        ])

    def __str__(self) -> str:
        return self.table()


def plan_memory(params: float, optimizer: str = "adamw", precision: str = "bf16-mixed",
                world_size: int = 1, stage: int = 0) -> MemoryPlan:
    """Plan per-rank memory from the declared layouts, allocating nothing.

    ``plan_memory(7.5e9, "adamw", "bf16-mixed", world_size=64, stage=s).total_gb()`` gives the
    ZeRO paper's 120 / 31.4 / 16.6 / 1.9 GB for s = 0 / 1 / 2 / 3. The stages describe ZeRO as
    DeepSpeed and FSDP implement it; fusedopt.ZeroShardedOptimizer is stage 1.
    """
    if optimizer not in PLAN_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {list(PLAN_OPTIMIZERS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    if stage not in SHARDED:
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if not world_size >= 1 or not (math.isfinite(params) and round(params) >= 1):
        raise ValueError(f"need params >= 1 (a finite count) and world_size >= 1, got {params!r} and {world_size!r}")
    n = int(round(params))
    dtype, master = PRECISIONS[precision]
    state = replace(PLAN_OPTIMIZERS[optimizer], master_weights=master).bytes(n, dtype)
    bytes_per_param = {
        "weights": dtype.itemsize,
        "grads": dtype.itemsize,
        "master": state.master / n,
        "states": (state.moments + state.absmax) / n,
    }
    return MemoryPlan(n, optimizer, precision, int(world_size), stage, bytes_per_param)
