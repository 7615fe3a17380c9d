"""Lion (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay, one state."""
from __future__ import annotations

import torch

from fusedopt._ops import lion8bit_step_, lion_step_
from fusedopt.optim.base import FusedOptimizer, as_float, state_dtype_name, state_dtype_of
from fusedopt.optim.blockwise8bit import Blockwise8bit
from fusedopt.quant import LION_8BIT_MOMENTS, dequantize_state, maps_on


class Lion(FusedOptimizer):
    r"""Lion, fused on CPU and CUDA (csrc/include/fusedopt/math/lion.h)::

        c = beta1 * m + (1 - beta1) * g          # from the old m
        p = p * (1 - lr * weight_decay) - lr * sign(c)
        m = beta2 * m + (1 - beta2) * g

    ``sign(0) = 0``; weight decay is decoupled (outside ``sign``). With ``beta1 == beta2`` this is
    Signum (sign SGD with momentum). Use a 3-10x smaller lr and a 3-10x larger weight decay than
    for AdamW (the paper's guidance). State: ``exp_avg`` (fp32 by default, or
    ``state_dtype=torch.bfloat16``), plus ``master_param`` with ``master_weights=True`` for
    bf16/fp16 params. GradScaler's unscale and inf-skip happen in the kernel, as for AdamW.
    """

    _elementwise_state_keys = ("exp_avg", "master_param")

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-4,
        betas=(0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        state_dtype: torch.dtype | str = torch.float32,
        _extra_defaults: dict | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),  # as given: torch keeps tensor betas, which a schedule may edit in place
            weight_decay=weight_decay,
            maximize=maximize,
            capturable=capturable,
            master_weights=bool(master_weights),
            state_dtype=state_dtype_name(state_dtype),
            **(_extra_defaults or {}),  # subclasses' own group options (e.g. min_8bit_size)
        )
        self._check_group(defaults, "defaults")
        super().__init__(params, defaults)

    def _check_group(self, g: dict, where: str, at_step: bool = False) -> None:
        self._check_lr(g["lr"], where, at_step)
        self._check_betas(g["betas"], where, at_step)
        self._check_weight_decay(g["weight_decay"], where)
        state_dtype_name(g["state_dtype"])

    def _validate_group(self, group: dict, index: int, at_step: bool = False) -> None:
        self._check_group(group, f"param group {index}", at_step)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        sd = state_dtype_of(group["state_dtype"])
        state = {"exp_avg": torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)}
        if self._wants_master(group, p):
            state["master_param"] = self._copy_like(p, p, torch.float32)
        return state

    def _load_param_state(self, p: torch.Tensor, saved: dict, group: dict, where: str) -> dict:
        self._check_loaded_shapes(p, saved, where)
        if "exp_avg" not in saved:
            raise ValueError(f"{where}: state lacks 'exp_avg'")
        saved = dequantize_state(saved, p.numel(), where, LION_8BIT_MOMENTS)  # a Lion8bit checkpoint
        state = {k: v for k, v in saved.items() if k not in self._elementwise_state_keys}
        state["exp_avg"] = self._copy_like(p, saved["exp_avg"], state_dtype_of(group["state_dtype"]))
        if self._wants_master(group, p):
            state["master_param"] = self._copy_like(p, saved.get("master_param", p), torch.float32)
        return state

    def _step_group(self, group: dict, pairs, grad_scale, found_inf) -> None:
        beta1, beta2 = (as_float(b) for b in group["betas"])  # read each step: tensor betas may change
        for (*_, master), items in self._buckets(group, pairs).items():
            lion_step_(
                [p for p, _, _ in items],
                [g for _, g, _ in items],
                [s["exp_avg"] for _, _, s in items],
                [s["master_param"] for _, _, s in items] if master else [],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                grad_scale=grad_scale,
                found_inf=found_inf,
            )


class Lion8bit(Blockwise8bit, Lion):
    r"""Lion whose momentum is stored in 8 bits: about 1.02 bytes of state per parameter instead of 4.

    The update is :class:`fusedopt.Lion`'s, run on the dequantized momentum (one native pass per
    bucket; csrc/include/fusedopt/math/lion8bit.h). Per parameter with at least ``min_8bit_size``
    elements the state is ``exp_avg`` (uint8 codes with the param's shape, into the signed dynamic
    map of :mod:`fusedopt.quant`) and ``exp_avg_absmax`` (fp32, one per 256-element block in memory
    order), plus ``master_param`` with ``master_weights=True``. Smaller params (decided per
    original param) keep an fp32 ``exp_avg`` and run through the fp32 fused Lion.

    Only the sign of ``beta1 * m + (1 - beta1) * g`` reaches the param, so the momentum's rounding
    (at most 0.7% of its block's largest magnitude) changes an update only where that sum is
    within rounding of 0.

    Non-finite gradients: under a GradScaler the whole step is skipped, as for Lion. Without one,
    in an 8-bit param an element whose new momentum would be inf/NaN keeps its param and momentum
    (it cannot poison the absmax shared by its block); small params propagate NaN/inf as Lion does.

    Checkpoints hold plain tensors (``weights_only=True`` loads them). A :class:`fusedopt.Lion`
    checkpoint loads by quantizing its momentum; :class:`fusedopt.Lion` loads this optimizer's by
    dequantizing; resuming an 8-bit checkpoint continues bitwise identically.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-4,
        betas=(0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        capturable: bool = False,
        master_weights: bool = False,
        min_8bit_size: int = 4096,
    ) -> None:
        super().__init__(
            params, lr, betas, weight_decay, maximize=maximize, capturable=capturable,
            master_weights=master_weights, _extra_defaults={"min_8bit_size": min_8bit_size},
        )

    _moments = LION_8BIT_MOMENTS
    _has_step = False

    def _check_group(self, g: dict, where: str, at_step: bool = False) -> None:
        super()._check_group(g, where, at_step)
        self._check_8bit_options(g, where)

    def _step_group(self, group: dict, pairs, grad_scale, found_inf) -> None:
        eight_bit, full_precision = self._split_8bit(group, pairs)
        beta1, beta2 = (as_float(b) for b in group["betas"])  # read each step: tensor betas may change
        for device, master, items in eight_bit:
            states = [s for _, _, s in items]
            lion8bit_step_(
                [p for p, _, _ in items],
                [g for _, g, _ in items],
                [s["exp_avg"] for s in states],
                [s["exp_avg_absmax"] for s in states],
                [s["master_param"] for s in states] if master else [],
                signed_map=maps_on(device)[0],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
        if full_precision:  # params under min_8bit_size: the fp32 fused Lion
            super()._step_group(group, full_precision, grad_scale, found_inf)
