"""Lion (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay, one state."""
from __future__ import annotations

import torch

from fusedopt._ops import lion_step_
from fusedopt.optim.base import STATE_DTYPES, FusedOptimizer, as_float, state_dtype_name


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
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=(as_float(betas[0]), as_float(betas[1])),
            weight_decay=weight_decay,
            maximize=maximize,
            capturable=capturable,
            master_weights=bool(master_weights),
            state_dtype=state_dtype_name(state_dtype),
        )
        self._check_group(defaults, "defaults")
        super().__init__(params, defaults)

    def _check_group(self, g: dict, where: str, at_step: bool = False) -> None:
        self._check_lr(g["lr"], where, at_step)
        self._check_betas(g["betas"], where)
        self._check_weight_decay(g["weight_decay"], where)
        state_dtype_name(g["state_dtype"])

    def _validate_group(self, group: dict, index: int, at_step: bool = False) -> None:
        self._check_group(group, f"param group {index}", at_step)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        sd = STATE_DTYPES[group["state_dtype"]]
        state = {"exp_avg": torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)}
        if self._wants_master(group, p):
            state["master_param"] = self._copy_like(p, p, torch.float32)
        return state

    def _load_param_state(self, p: torch.Tensor, saved: dict, group: dict, where: str) -> dict:
        self._check_loaded_shapes(p, saved, where)
        if "exp_avg" not in saved:
            raise ValueError(f"{where}: state lacks 'exp_avg'")
        state = {k: v for k, v in saved.items() if k not in self._elementwise_state_keys}
        state["exp_avg"] = self._copy_like(p, saved["exp_avg"], STATE_DTYPES[group["state_dtype"]])
        if self._wants_master(group, p):
            state["master_param"] = self._copy_like(p, saved.get("master_param", p), torch.float32)
        return state

    def _step_group(self, group: dict, pairs, grad_scale, found_inf) -> None:
        beta1, beta2 = group["betas"]
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
