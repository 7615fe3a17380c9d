"""Turns lists of torch tensors into the raw pointers the native backends take."""
from __future__ import annotations

import contextlib

import torch

from fusedopt._ext import cuda_compiled, lib

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/include/fusedopt/dtype.h
DEVICE_CODES = {"cpu": 0, "cuda": 1}


def is_dense(t: torch.Tensor) -> bool:
    """True when the tensor's elements fill its memory span exactly (any dim order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def nvtx_range(name: str, device: torch.device):
    """An NVTX range around a CUDA step or kernel family, so Nsight Systems timelines name fusedopt's
    work ("fusedopt.AdamW.step", "fusedopt.adam_step", ...); nothing on the CPU."""
    return torch.cuda.nvtx.range(name) if device.type == "cuda" else contextlib.nullcontext()


def _ptrs(tensors) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _step_ptrs(steps, device: torch.device) -> list[int]:
    """Pointers to the step counters, which the kernels read and increment as float32 scalars on
    the launch's device: an int64 counter (a hand-edited state) would be misread as float bits, one
    on another device dereferenced there."""
    f32 = torch.float32
    try:
        ptrs = [t.data_ptr() for t in steps if t.dtype is f32 and t.device == device]
    except AttributeError:  # not a tensor
        ptrs = []
    if len(ptrs) != len(steps):
        bad = next(t for t in steps if not isinstance(t, torch.Tensor) or t.dtype != f32 or t.device != device)
        what = f"a {bad.dtype} tensor on {bad.device}" if isinstance(bad, torch.Tensor) else f"a {type(bad).__name__}"
        raise RuntimeError(f"fusedopt: a state['step'] is {what}; the kernels keep it as a float32 tensor on the "
                           f"param's device ({device}): torch.tensor(float(step), device=p.device) "
                           "(load_state_dict converts a checkpoint's)")
    return ptrs


def _dtype_code(tensors, what: str, who: str) -> int:
    """The dtype code of a list the native launch reads as one dtype; raises if they differ (the
    optimizers bucket by dtype; this guards the memory the kernel would misread)."""
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        raise RuntimeError(f"{who}: {what} mix dtypes {sorted({str(t.dtype) for t in tensors})}; one launch takes one dtype")
    return DTYPE_CODES[dtype]


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


class _Launch:
    """What every native launch needs besides its tensor lists: device code, stream, thread count
    and pointers to device scalars (lr, GradScaler's grad_scale/found_inf), kept alive meanwhile."""

    def __init__(self, device: torch.device, lr, grad_scale, found_inf):
        self.device = device
        self.device_code = DEVICE_CODES[device.type]
        self._keep = []
        self.lr_ptr = 0
        if isinstance(lr, torch.Tensor) and device.type == "cuda" and lr.device.type == "cuda":
            self.lr_ptr = self._ptr(lr)
            lr = 0.0
        self.lr = float(lr)
        self.grad_scale_ptr = self._ptr(grad_scale)
        self.found_inf_ptr = self._ptr(found_inf)
        self.stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        self.num_threads = torch.get_num_threads()

    def _ptr(self, t):
        ptr, tmp = _scalar_ptr(t, self.device)
        self._keep.append(tmp)
        return ptr

    def run(self, fn, *args):
        if self.device.type == "cuda":
            with torch.cuda.device(self.device), nvtx_range(f"fusedopt.{fn.__name__}", self.device):
                fn(*args)
        else:
            fn(*args)


def adam_step_(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, *,
    lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
    grad_scale=None, found_inf=None,
) -> None:
    """One fused Adam/AdamW step, in place, over tensors sharing a device and dtypes."""
    L = _Launch(params[0].device, lr, grad_scale, found_inf)
    L.run(
        lib().adam_step,
        L.device_code, _ptrs(params), _ptrs(grads), _ptrs(exp_avgs), _ptrs(exp_avg_sqs),
        _ptrs(max_exp_avg_sqs), _ptrs(masters), _step_ptrs(steps, L.device), [p.numel() for p in params],
        DTYPE_CODES[params[0].dtype], DTYPE_CODES[grads[0].dtype], DTYPE_CODES[exp_avgs[0].dtype],
        L.lr, float(beta1), float(beta2), float(eps), float(weight_decay),
        bool(decoupled), bool(amsgrad), bool(maximize), L.lr_ptr, L.grad_scale_ptr, L.found_inf_ptr,
        L.stream, L.num_threads,
    )


def lion_step_(
    params, grads, exp_avgs, masters, *, lr, beta1, beta2, weight_decay, maximize,
    grad_scale=None, found_inf=None,
) -> None:
    """One fused Lion step, in place, over tensors sharing a device and dtypes."""
    L = _Launch(params[0].device, lr, grad_scale, found_inf)
    L.run(
        lib().lion_step,
        L.device_code, _ptrs(params), _ptrs(grads), _ptrs(exp_avgs), _ptrs(masters), [p.numel() for p in params],
        DTYPE_CODES[params[0].dtype], DTYPE_CODES[grads[0].dtype], DTYPE_CODES[exp_avgs[0].dtype],
        L.lr, float(beta1), float(beta2), float(weight_decay), bool(maximize),
        L.lr_ptr, L.grad_scale_ptr, L.found_inf_ptr, L.stream, L.num_threads,
    )


def adam8bit_step_(
    params, grads, exp_avgs, exp_avg_absmaxs, exp_avg_sqs, exp_avg_sq_absmaxs, masters, steps, *,
    signed_map, unsigned_map, lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
    grad_scale=None, found_inf=None,
) -> None:
    """One fused blockwise 8-bit Adam/AdamW step, in place: exp_avgs/exp_avg_sqs are uint8 codes
    into signed_map/unsigned_map (packed maps on the params' device: fusedopt.quant.maps_on), with one fp32 absmax per
    256-element block in exp_avg_absmaxs/exp_avg_sq_absmaxs (see fusedopt/quant.py)."""
    L = _Launch(params[0].device, lr, grad_scale, found_inf)
    L.run(
        lib().adam8bit_step,
        L.device_code, _ptrs(params), _ptrs(grads), _ptrs(exp_avgs), _ptrs(exp_avg_absmaxs), _ptrs(exp_avg_sqs),
        _ptrs(exp_avg_sq_absmaxs), _ptrs(masters), _step_ptrs(steps, L.device), [p.numel() for p in params],
        DTYPE_CODES[params[0].dtype], DTYPE_CODES[grads[0].dtype], signed_map.data_ptr(), unsigned_map.data_ptr(),
        L.lr, float(beta1), float(beta2), float(eps), float(weight_decay), bool(decoupled), bool(maximize),
        L.lr_ptr, L.grad_scale_ptr, L.found_inf_ptr, L.stream, L.num_threads,
    )


def lion8bit_step_(
    params, grads, exp_avgs, exp_avg_absmaxs, masters, *, signed_map, lr, beta1, beta2, weight_decay, maximize,
    grad_scale=None, found_inf=None,
) -> None:
    """One fused Lion step, in place, with exp_avgs as uint8 codes into signed_map (a packed map on
    the params' device) and one fp32 absmax per 256-element block in exp_avg_absmaxs."""
    L = _Launch(params[0].device, lr, grad_scale, found_inf)
    L.run(
        lib().lion8bit_step,
        L.device_code, _ptrs(params), _ptrs(grads), _ptrs(exp_avgs), _ptrs(exp_avg_absmaxs), _ptrs(masters),
        [p.numel() for p in params], DTYPE_CODES[params[0].dtype], DTYPE_CODES[grads[0].dtype],
        signed_map.data_ptr(), L.lr, float(beta1), float(beta2), float(weight_decay), bool(maximize),
        L.lr_ptr, L.grad_scale_ptr, L.found_inf_ptr, L.stream, L.num_threads,
    )


def muon_prepare_(grads, buffers, outs, *, momentum, nesterov, eps, safety, grad_scale=None, found_inf=None) -> None:
    """Muon's momentum step on same-shape matrices, fused with the normalization and bf16 cast of
    the Newton-Schulz input: outs[i] (bf16, contiguous, numel of grads[i]) = u_i / max(||u_i|| *
    safety, eps, tiny), buffers updated in place (csrc/include/fusedopt/math/muon.h)."""
    device = buffers[0].device
    L = _Launch(device, 0.0, grad_scale, found_inf)
    numels = [b.numel() for b in buffers]
    partials = None
    if device.type == "cuda":  # one double per chunk, in the caller's stream's allocator pool
        chunk = lib().chunk_size()
        partials = torch.empty(sum((n + chunk - 1) // chunk for n in numels), dtype=torch.float64, device=device)
    L.run(
        lib().muon_prepare,
        L.device_code, _ptrs(grads), _ptrs(buffers), _ptrs(outs), numels,
        _dtype_code(buffers, "momentum buffers", "muon_prepare_"), _dtype_code(grads, "grads", "muon_prepare_"),
        float(momentum), bool(nesterov), float(eps),
        float(safety), 0 if partials is None else partials.data_ptr(), L.grad_scale_ptr, L.found_inf_ptr,
        L.stream, L.num_threads,
    )


def muon_apply_(params, outs, *, lr, weight_decay, lr_factor, found_inf=None) -> None:
    """p = p * (1 - lr * weight_decay) - lr * lr_factor * O for same-shape matrices; outs: the
    bf16 Newton-Schulz outputs, contiguous, laid out as the (contiguous) params."""
    L = _Launch(params[0].device, lr, None, found_inf)
    L.run(
        lib().muon_apply,
        L.device_code, _ptrs(params), _ptrs(outs), [p.numel() for p in params], _dtype_code(params, "params", "muon_apply_"),
        L.lr, float(weight_decay), float(lr_factor), L.lr_ptr, L.found_inf_ptr, L.stream, L.num_threads,
    )


def symmetric_gram(x: torch.Tensor, c: torch.Tensor | None = None, *, alpha: float = 1.0,
                   beta: float = 0.0) -> torch.Tensor:
    """alpha * x @ x.mT + beta * c for a batch of bf16 CUDA matrices x ([B, m, n]) and symmetric c
    ([B, m, m]), computing only the tiles on and above the diagonal (csrc/cuda/symmetric_gram.cu).
    Returns a new, exactly symmetric [B, m, m] bf16 tensor; x and c are only read."""
    if x.ndim != 3 or x.dtype != torch.bfloat16 or x.device.type != "cuda":
        raise ValueError("symmetric_gram takes a [batch, rows, cols] bfloat16 CUDA tensor, got "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    check_device_supported(x.device, "fusedopt.symmetric_gram")
    b, m, n = x.shape
    if c is not None and (c.shape != (b, m, m) or c.dtype != x.dtype or c.device != x.device):
        raise ValueError(f"symmetric_gram: c must be a {(b, m, m)} bfloat16 tensor on {x.device}, got "
                         f"{tuple(c.shape)} {c.dtype} on {c.device}")
    x = x.contiguous()
    c = None if c is None else c.contiguous()
    out = torch.empty((b, m, m), dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device), nvtx_range("fusedopt.symmetric_gram", x.device):
        lib().symmetric_gram(x.data_ptr(), 0 if c is None else c.data_ptr(), out.data_ptr(), b, m, n,
                             float(alpha), float(beta), torch.cuda.current_stream(x.device).cuda_stream)
    return out
