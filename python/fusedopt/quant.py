"""Blockwise 8-bit quantization of optimizer moments: the maps, and conversions for checkpoints.

A moment tensor is cut into blocks of ``BLOCK = 256`` consecutive elements, in the tensor's memory
order. A block keeps one fp32 ``absmax`` (its largest magnitude) and one uint8 code per element:
``value ~= map[code] * absmax``. Quantizing rounds ``value / absmax`` to the nearest map entry (a
tie to the smaller), except that a nonzero value never becomes 0 or changes sign: it takes the
nearest entry of its own sign (why: csrc/include/fusedopt/math/quant8.h, where the rounding lives;
this module uses it through the native CPU entry points, so checkpoint conversion rounds exactly
as the optimizer step does).

The maps are *dynamic* maps (Dettmers 2016, "8-Bit Approximations for Parallelism in Deep
Learning"; bitsandbytes' ``create_dynamic_map``): a sign, a decade and a linear fraction, so
relative precision is roughly even over 7 decades instead of concentrated near absmax. Decade
``10**(i-6)`` (``i = 0..6``) holds the midpoints of ``n_i`` equal steps of ``[0.1, 1] * 10**(i-6)``:

- unsigned (``exp_avg_sq >= 0``): ``n_i = 2**(i+1)``, 2 + 4 + ... + 128 = 254 values, plus 0 and 1;
- signed (``exp_avg``): ``n_i = 2**i``, 127 values per sign, plus 0 and 1; the most negative
  midpoint (-0.99297) is moved to -1, so a block's extreme element is exact whatever its sign
  (in bitsandbytes' map -1 is not representable and costs that element 0.7%).

Both maps are strictly increasing, hold 0 exactly (code 127 signed, 0 unsigned) and reach 1 (and
-1). Worst-case rounding error, relative to absmax: 0.0035 (unsigned) and 0.0070 (signed) for
values in [0.1, 1] * absmax (0.0105 in [-1, -0.979], the price of an exact -1), ten times less per
decade below. The values are computed in float64 and rounded once to float32, so they do not
depend on the machine.
"""
from __future__ import annotations

import functools

import torch

from fusedopt._ext import lib
from fusedopt._ops import is_dense

BLOCK = 256
MAP_SIZE = 256
DECADES = 7
SIGNED_ZERO_CODE = 127
UNSIGNED_ZERO_CODE = 0


@functools.cache
def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted float32 values a code stands for (CPU tensor; do not modify)."""
    values = [0.0, 1.0]
    for i in range(DECADES):
        n = 2**i if signed else 2 ** (i + 1)
        scale = 10.0 ** (i - (DECADES - 1))
        edges = [0.1 + 0.9 * k / n for k in range(n + 1)]
        mids = [scale * (a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        values += mids + ([-x for x in mids] if signed else [])
    values.sort()
    if signed:
        values[0] = -1.0
    assert len(values) == MAP_SIZE
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


@functools.cache
def quant_map(signed: bool) -> torch.Tensor:
    """The dynamic map as the kernels take it: a uint8 CPU buffer holding a ``math::QuantMap`` (the
    256 values and the tables that guide the search for the nearest one; csrc/.../math/quant8.h
    and quant8_coarse.h, whose table the AVX-512 VBMI quantizer reads where
    ``lib().set_cpu_quantizer`` lets it run: by default on AMD)."""
    values = dynamic_map(signed)
    out = torch.empty(lib().quant_map_bytes(), dtype=torch.uint8)
    lib().build_quant_map(values.data_ptr(), out.data_ptr())
    return out


@functools.cache
def _maps_cached(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # The copy below and its sync would abort the capture with CUDA's "operation not permitted
        # when stream is capturing"; say what to do instead (exceptions are not cached).
        raise RuntimeError(f"fusedopt: the first 8-bit step on {device} copies the quantization maps there, "
                           "which a CUDA graph capture cannot hold; run one step before capturing (the warm-up "
                           "of torch's CUDA-graph recipe)")
    maps = quant_map(True).to(device), quant_map(False).to(device)
    if device.type == "cuda":
        # A copy from pageable memory may still be in flight when .to() returns; kernels on
        # other streams will read these tensors, so finish it (once per device and process).
        torch.cuda.current_stream(device).synchronize()
    return maps


def maps_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed, unsigned) packed maps (see quant_map) on `device`, copied there once (so later steps never copy, and a
    captured CUDA graph can keep reading them)."""
    return _maps_cached(torch.device(device))


def num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def zero_code(signed: bool) -> int:
    return SIGNED_ZERO_CODE if signed else UNSIGNED_ZERO_CODE


# --- memory order ---------------------------------------------------------------------------
def memory_order_flat(t: torch.Tensor) -> torch.Tensor:
    """1-D view of a dense tensor in memory order: the order the 256-element blocks are cut in
    (it differs from index order for e.g. channels_last params). Non-dense tensors are copied."""
    if t.is_contiguous():
        return t.view(-1)
    if is_dense(t):
        return t.as_strided((t.numel(),), (1,), t.storage_offset())
    return t.contiguous().view(-1)


def _like(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`flat` (memory order) as a tensor with `like`'s shape and strides."""
    out = torch.empty_like(like, dtype=flat.dtype, device=flat.device)
    memory_order_flat(out).copy_(flat)
    return out


# --- conversions (native CPU code; checkpoint-time only, so the device round trip is fine) ----
def quantize_blockwise(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of a float tensor: codes have x's shape and strides (uint8), absmax is
    fp32 of shape (ceil(numel / 256),); both on x's device. Non-finite values raise."""
    flat = memory_order_flat(x).detach().to("cpu", torch.float32).contiguous()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("cannot quantize a tensor holding inf or NaN (the block's absmax would be poisoned)")
    if not signed and bool((flat < 0).any()):
        raise ValueError("the unsigned map holds values >= 0 only (exp_avg_sq is never negative)")
    codes = torch.empty(flat.numel(), dtype=torch.uint8)
    absmax = torch.empty(num_blocks(flat.numel()), dtype=torch.float32)
    lib().quantize_blockwise(
        flat.data_ptr(), flat.numel(), quant_map(signed).data_ptr(), codes.data_ptr(), absmax.data_ptr(),
        torch.get_num_threads(),
    )
    return _like(codes.to(x.device), x), absmax.to(x.device)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 tensor with the codes' shape, strides and device."""
    flat = memory_order_flat(codes).to("cpu").contiguous()
    if flat.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {flat.dtype}")
    if absmax.numel() != num_blocks(flat.numel()):
        raise ValueError(f"{absmax.numel()} absmax values for {flat.numel()} elements; expected {num_blocks(flat.numel())}")
    scale = absmax.detach().to("cpu", torch.float32).contiguous()
    out = torch.empty(flat.numel(), dtype=torch.float32)
    lib().dequantize_blockwise(
        flat.data_ptr(), scale.data_ptr(), flat.numel(), quant_map(signed).data_ptr(), out.data_ptr(),
        torch.get_num_threads(),
    )
    return _like(out.to(codes.device), codes)


# --- optimizer state ------------------------------------------------------------------------
# state key of an 8-bit moment -> (key of its absmax, signed map?)
ADAM_8BIT_MOMENTS = {"exp_avg": ("exp_avg_absmax", True), "exp_avg_sq": ("exp_avg_sq_absmax", False)}
LION_8BIT_MOMENTS = {"exp_avg": ("exp_avg_absmax", True)}


def is_8bit_state(saved: dict, moments: dict) -> bool:
    # uint8 moments without their absmax count too: read as values they would load as 0..255
    # (check_8bit_state then names the missing absmax).
    return any(
        absmax_key in saved or (isinstance(saved.get(key), torch.Tensor) and saved[key].dtype == torch.uint8)
        for key, (absmax_key, _) in moments.items()
    )


def check_8bit_state(saved: dict, numel: int, where: str, moments: dict) -> None:
    """Raise ValueError (naming `where`) unless `saved` holds well-formed 8-bit `moments`."""
    for key, (absmax_key, _) in moments.items():
        codes, absmax = saved.get(key), saved.get(absmax_key)
        if not isinstance(codes, torch.Tensor) or not isinstance(absmax, torch.Tensor):
            raise ValueError(f"{where}: an 8-bit state needs tensors '{key}' and '{absmax_key}'")
        if codes.dtype != torch.uint8:
            raise ValueError(f"{where}: state['{key}'] of an 8-bit state must be uint8 codes, got {codes.dtype}")
        if absmax.dtype != torch.float32 or absmax.shape != (num_blocks(numel),):
            raise ValueError(
                f"{where}: state['{absmax_key}'] must be float32 of shape ({num_blocks(numel)},) "
                f"(one per {BLOCK}-element block), got {absmax.dtype} {tuple(absmax.shape)}"
            )
        if not bool(torch.isfinite(absmax).all()) or bool((absmax < 0).any()):
            raise ValueError(f"{where}: state['{absmax_key}'] holds negative or non-finite values")


def dequantize_state(saved: dict, numel: int, where: str, moments: dict) -> dict:
    """A copy of a saved state with 8-bit `moments` replaced by fp32 tensors; any other state is
    returned as is. This is how the full-precision optimizers load their 8-bit twins' checkpoints."""
    if not is_8bit_state(saved, moments):
        return saved
    check_8bit_state(saved, numel, where, moments)
    absmax_keys = {absmax_key for absmax_key, _ in moments.values()}
    out = {k: v for k, v in saved.items() if k not in absmax_keys}
    for key, (absmax_key, signed) in moments.items():
        out[key] = dequantize_blockwise(saved[key], saved[absmax_key], signed)
    return out


def new_8bit_moments(p: torch.Tensor, moments: dict) -> dict:
    """Zero 8-bit `moments` for param p: codes of 0 with p's layout, and zero absmax per block."""
    out = {}
    for key, (absmax_key, signed) in moments.items():
        out[key] = torch.full_like(p, zero_code(signed), dtype=torch.uint8, memory_format=torch.preserve_format)
        out[absmax_key] = torch.zeros(num_blocks(p.numel()), dtype=torch.float32, device=p.device)
    return out


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and memory order (strides of size-1 dims do not matter)."""
    return a.shape == b.shape and all(a.stride(d) == b.stride(d) for d in range(a.dim()) if a.size(d) > 1)


def load_8bit_moments(p: torch.Tensor, saved: dict, where: str, moments: dict) -> dict:
    """{key: codes, absmax_key: absmax} of `moments` for param p (on p's device, in p's layout)
    from a saved state. 8-bit moments saved for p's layout are copied as they are, so a resumed run
    continues bitwise identically; full-precision ones (the optimizer's fp32 twin or torch's), or
    8-bit ones saved for a param laid out differently (blocks follow memory order), are quantized."""
    if is_8bit_state(saved, moments):
        check_8bit_state(saved, p.numel(), where, moments)
        if all(_same_layout(saved[k], p) for k in moments):
            out = {}
            for key, (absmax_key, _) in moments.items():
                out[key] = torch.empty_like(p, dtype=torch.uint8).copy_(saved[key])
                out[absmax_key] = saved[absmax_key].to(device=p.device, dtype=torch.float32, copy=True)
            return out
    full = dequantize_state(saved, p.numel(), where, moments)
    out = {}
    for key, (absmax_key, signed) in moments.items():
        try:
            out[key], out[absmax_key] = quantize_blockwise(torch.empty_like(p, dtype=torch.float32).copy_(full[key]), signed)
        except ValueError as e:
            raise ValueError(f"{where}: state['{key}']: {e}") from None
    return out
