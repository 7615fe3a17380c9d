"""Adam and AdamW: drop-ins for torch.optim.Adam / torch.optim.AdamW, one native launch per bucket."""
from __future__ import annotations

import torch

from fusedopt._ops import adam_step_
from fusedopt.optim.base import (
    FusedOptimizer,
    as_float,
    reject_torch_only_flags,
    state_dtype_name,
    state_dtype_of,
)
from fusedopt.quant import ADAM_8BIT_MOMENTS, dequantize_state


class Adam(FusedOptimizer):
    r"""Adam with torch.optim.Adam's signature, state_dict keys and numerics, fused on CPU and CUDA.

    Extra keyword options (also per param group):
        master_weights (bool): for bf16/fp16 params keep an fp32 copy in ``state['master_param']``;
            the update reads and writes it and rounds it back into the param in the same pass.
            Params changed outside the optimizer (e.g. ``load_state_dict`` on the model) are
            not seen by the master copy: reload the optimizer state too.
        state_dtype (torch.dtype): ``torch.float32`` (default) or ``torch.bfloat16`` for
            ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``.

    ``foreach``/``fused`` are accepted for signature compatibility (the step is always fused);
    ``foreach=True``, ``fused=False`` and ``differentiable=True`` raise.
    Under ``torch.amp.GradScaler`` the kernel unscales gradients in registers (``.grad`` is never
    written) and skips the step, state and step counter included, when an inf/NaN was found.
    """

    _elementwise_state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool = False,
        state_dtype: torch.dtype | str = torch.float32,
        _extra_defaults: dict | None = None,
    ) -> None:
        reject_torch_only_flags(f"fusedopt.{type(self).__name__}", foreach, fused, differentiable)
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),  # as given: torch keeps tensor betas, which a schedule may edit in place
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
            master_weights=bool(master_weights),
            state_dtype=state_dtype_name(state_dtype),
            **(_extra_defaults or {}),  # subclasses' own group options (e.g. min_8bit_size)
        )
        self._check_hyper(defaults, "defaults")
        super().__init__(params, defaults)

    # --- hyperparameters -------------------------------------------------------------------
    def _check_hyper(self, g: dict, where: str, at_step: bool = False) -> None:
        self._check_lr(g["lr"], where, at_step)
        if not g["eps"] >= 0.0:
            raise ValueError(f"{self._who}: invalid epsilon {g['eps']} in {where}: eps must be >= 0")
        self._check_betas(g["betas"], where, at_step)
        self._check_weight_decay(g["weight_decay"], where)
        reject_torch_only_flags(self._who, g.get("foreach"), g.get("fused"), g.get("differentiable"))
        state_dtype_name(g["state_dtype"])

    def _validate_group(self, group: dict, index: int, at_step: bool = False) -> None:
        self._check_hyper(group, f"param group {index}", at_step)

    # --- state -----------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        sd = state_dtype_of(group["state_dtype"])
        state = {
            "step": self._new_step(p),
            "exp_avg": torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)
        if self._wants_master(group, p):
            state["master_param"] = self._copy_like(p, p, torch.float32)
        return state

    def _load_param_state(self, p: torch.Tensor, saved: dict, group: dict, where: str) -> dict:
        self._check_loaded_shapes(p, saved, where)
        # An Adam8bit/AdamW8bit checkpoint: its uint8 moments are dequantized to fp32 first.
        saved = dequantize_state(saved, p.numel(), where, ADAM_8BIT_MOMENTS)
        needed = ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
        missing = [k for k in needed if k not in saved]
        if missing:
            raise ValueError(f"{where}: state lacks {missing} (amsgrad={group['amsgrad']})")
        sd = state_dtype_of(group["state_dtype"])
        state = {k: v for k, v in saved.items() if k not in self._elementwise_state_keys and k != "step"}
        state["step"] = self._new_step(p, float(torch.as_tensor(saved["step"]).item()))
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if k in saved:
                state[k] = self._copy_like(p, saved[k], sd)
        if self._wants_master(group, p):
            state["master_param"] = self._copy_like(p, saved.get("master_param", p), torch.float32)
        return state

    # --- step ------------------------------------------------------------------------------
    def _step_group(self, group: dict, pairs, grad_scale, found_inf) -> None:
        beta1, beta2 = (as_float(b) for b in group["betas"])  # read each step: tensor betas may change
        amsgrad = group["amsgrad"]
        for (*_, master), items in self._buckets(group, pairs).items():
            states = [s for _, _, s in items]
            adam_step_(
                [p for p, _, _ in items],
                [g for _, g, _ in items],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                [s["master_param"] for s in states] if master else [],
                [s["step"] for s in states],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled=group["decoupled_weight_decay"],
                amsgrad=amsgrad,
                maximize=group["maximize"],
                grad_scale=grad_scale,
                found_inf=found_inf,
            )


class AdamW(Adam):
    r"""AdamW (decoupled weight decay) with torch.optim.AdamW's signature and state_dict keys.

    See :class:`fusedopt.Adam` for the extra options (``master_weights``, ``state_dtype``).
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | str = torch.float32,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable,
            fused=fused, decoupled_weight_decay=True, master_weights=master_weights, state_dtype=state_dtype,
        )

    def _normalize_loaded_group(self, group: dict) -> None:
        super()._normalize_loaded_group(group)
        group["decoupled_weight_decay"] = True

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
