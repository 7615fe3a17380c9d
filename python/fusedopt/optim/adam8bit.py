"""Adam8bit and AdamW8bit: Adam/AdamW with blockwise 8-bit moments (Dettmers et al. 2022)."""
from __future__ import annotations

import torch

from fusedopt._ops import adam8bit_step_
from fusedopt.optim.adam import Adam
from fusedopt.optim.base import as_float
from fusedopt.optim.blockwise8bit import Blockwise8bit
from fusedopt.quant import ADAM_8BIT_MOMENTS, maps_on


class Adam8bit(Blockwise8bit, Adam):
    r"""Adam whose moments are stored in 8 bits: about 2.03 bytes of state per parameter instead of 8.

    The update is :class:`fusedopt.Adam`'s, run on the dequantized moments (one native pass per
    bucket; csrc/include/fusedopt/math/adam8bit.h). Per parameter with at least
    ``min_8bit_size`` elements the state is:

    - ``exp_avg`` / ``exp_avg_sq``: uint8 codes with the param's shape, into the signed / unsigned
      dynamic maps of :mod:`fusedopt.quant`;
    - ``exp_avg_absmax`` / ``exp_avg_sq_absmax``: fp32, one per 256-element block (memory order);
    - ``step`` (and ``master_param`` with ``master_weights=True``), as for Adam.

    Smaller params (decided per original param, as bitsandbytes) keep fp32 ``exp_avg`` /
    ``exp_avg_sq`` and run through the fp32 fused Adam: keeping their few bytes exact costs little.

    Differences from :class:`fusedopt.Adam`: no ``amsgrad`` and no ``state_dtype`` (the small
    params' states are fp32). Non-finite gradients: under a GradScaler the whole step is skipped,
    as for Adam. Without one, in an 8-bit param an element whose new moment would be inf/NaN is
    skipped alone (its param and moments keep their values), so it cannot poison the absmax shared
    by its block; small params propagate NaN/inf exactly as Adam does.

    Checkpoints hold plain tensors (``torch.load(weights_only=True)`` works). Loading one from
    ``torch.optim.Adam(W)`` or ``fusedopt.Adam(W)`` quantizes its moments; ``fusedopt.Adam(W)``
    loads this optimizer's checkpoints by dequantizing them. Resuming an 8-bit checkpoint copies
    the codes, so it continues bitwise identically.

    Second moment with ``beta2`` near 1. Per step ``v`` shrinks by at most ``1 - beta2`` of itself
    and grows little unless the gradient jumps: less than half a rounding step of the map (0.35% of
    the block's absmax near the top). Rounding to nearest (as bitsandbytes and torchao do) loses
    such changes, so an element's ``v`` in effect moves with its block's absmax, i.e. its largest
    element; when that one decays (a past gradient spike fading) its neighbours' ``v`` decays along
    and their steps come out longer than AdamW's. Measured on a small MLP over 300 steps: ``v`` at
    0.75x AdamW's and a 2-13% lower loss at ``beta2 = 0.999``, -6% to +0.2% at 0.99, no bias
    (+-1%) at 0.95.
    """

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
        min_8bit_size: int = 4096,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay, master_weights=master_weights,
            _extra_defaults={"min_8bit_size": min_8bit_size},
        )

    _moments = ADAM_8BIT_MOMENTS

    def _check_hyper(self, g: dict, where: str, at_step: bool = False) -> None:
        super()._check_hyper(g, where, at_step)
        if g["amsgrad"]:
            raise ValueError(f"{self._who}: amsgrad is not supported with 8-bit states ({where}); use fusedopt.AdamW")
        self._check_8bit_options(g, where)

    def _step_group(self, group: dict, pairs, grad_scale, found_inf) -> None:
        eight_bit, full_precision = self._split_8bit(group, pairs)
        beta1, beta2 = (as_float(b) for b in group["betas"])  # read each step: tensor betas may change
        for device, master, items in eight_bit:
            states = [s for _, _, s in items]
            signed_map, unsigned_map = maps_on(device)
            adam8bit_step_(
                [p for p, _, _ in items],
                [g for _, g, _ in items],
                [s["exp_avg"] for s in states],
                [s["exp_avg_absmax"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["exp_avg_sq_absmax"] for s in states],
                [s["master_param"] for s in states] if master else [],
                [s["step"] for s in states],
                signed_map=signed_map,
                unsigned_map=unsigned_map,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled=group["decoupled_weight_decay"],
                maximize=group["maximize"],
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
        if full_precision:  # params under min_8bit_size: the fp32 fused Adam
            super()._step_group(group, full_precision, grad_scale, found_inf)


class AdamW8bit(Adam8bit):
    r"""AdamW (decoupled weight decay) with blockwise 8-bit moments; see :class:`Adam8bit`.

    Signature of ``torch.optim.AdamW`` plus ``master_weights`` and ``min_8bit_size``.
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
        min_8bit_size: int = 4096,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable,
            fused=fused, decoupled_weight_decay=True, master_weights=master_weights, min_8bit_size=min_8bit_size,
        )

    def _normalize_loaded_group(self, group: dict) -> None:
        super()._normalize_loaded_group(group)
        group["decoupled_weight_decay"] = True

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
