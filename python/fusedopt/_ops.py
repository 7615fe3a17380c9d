"""Turns lists of torch tensors into the raw pointers the native backends take."""
from __future__ import annotations

import torch

from fusedopt._ext import cuda_compiled, lib

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/include/fusedopt/dtype.h
DEVICE_CODES = {"cpu": 0, "cuda": 1}


def _ptrs(tensors) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _scalar_ptr(t: torch.Tensor | None, device: torch.device) -> tuple[int, torch.Tensor | None]:
    """Pointer to a float32 scalar on `device` (GradScaler tensors, device lr); keeps the temp alive."""
    if t is None:
        return 0, None
    if t.dtype != torch.float32 or t.device != device:
        t = t.to(device=device, dtype=torch.float32)
    return t.data_ptr(), t


def check_device_supported(device: torch.device, who: str) -> None:
    if device.type == "cuda" and not cuda_compiled():
        raise RuntimeError(
            f"{who}: params are on {device} but this fusedopt build has no CUDA backend "
            "(it was built without nvcc or with FUSEDOPT_CUDA=off); rebuild with FUSEDOPT_CUDA=on"
        )
    if device.type not in DEVICE_CODES:
        raise RuntimeError(f"{who}: device type '{device.type}' is not supported (use cpu or cuda)")


def adam_step_(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, *,
    lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
    grad_scale=None, found_inf=None,
) -> None:
    """One fused Adam/AdamW step, in place, over tensors sharing a device and dtypes."""
    device = params[0].device
    keep = []
    lr_ptr = 0
    if isinstance(lr, torch.Tensor):
        if device.type == "cuda" and lr.device.type == "cuda":
            lr_ptr, tmp = _scalar_ptr(lr, device)
            keep.append(tmp)
            lr = 0.0
        else:
            lr = float(lr)
    gs_ptr, tmp = _scalar_ptr(grad_scale, device)
    keep.append(tmp)
    fi_ptr, tmp = _scalar_ptr(found_inf, device)
    keep.append(tmp)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    state_dtype = exp_avgs[0].dtype
    call = lambda: lib().adam_step(  # noqa: E731
        DEVICE_CODES[device.type], _ptrs(params), _ptrs(grads), _ptrs(exp_avgs), _ptrs(exp_avg_sqs),
        _ptrs(max_exp_avg_sqs), _ptrs(masters), _ptrs(steps), [p.numel() for p in params],
        DTYPE_CODES[params[0].dtype], DTYPE_CODES[grads[0].dtype], DTYPE_CODES[state_dtype],
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
        bool(decoupled), bool(amsgrad), bool(maximize), lr_ptr, gs_ptr, fi_ptr, stream,
        torch.get_num_threads(),
    )
    if device.type == "cuda":
        with torch.cuda.device(device):
            call()
    else:
        call()
