"""What the blockwise 8-bit optimizers (Adam8bit/AdamW8bit, Lion8bit) add to their full-precision
base: the per-param 8-bit-or-fp32 decision, 8-bit state creation and loading, and the split of a
group's buckets into 8-bit launches and the base's own fp32 path."""
from __future__ import annotations

import torch

from fusedopt.optim.base import policy_numel, state_dtype_name
from fusedopt.quant import load_8bit_moments, new_8bit_moments


class Blockwise8bit:
    """Mixin, listed before the full-precision base class (``class Lion8bit(Blockwise8bit, Lion)``).

    A param with at least ``min_8bit_size`` elements (the whole param's, when sharded) keeps its
    moments ``_moments`` (state key -> (absmax key, signed map?)) as uint8 codes plus one fp32
    absmax per 256-element block; a smaller one keeps the base's fp32 state and update."""

    _moments: dict[str, tuple[str, bool]] = {}
    _has_step: bool = True  # Adam counts steps, Lion does not

    def _check_8bit_options(self, g: dict, where: str) -> None:
        size = g["min_8bit_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"{self._who}: min_8bit_size must be an int >= 0, got {size!r} in {where}")
        if state_dtype_name(g["state_dtype"]) != "float32":
            raise ValueError(f"{self._who}: state_dtype is fixed (8-bit moments, fp32 for small params) in {where}")

    def _normalize_loaded_group(self, group: dict) -> None:
        super()._normalize_loaded_group(group)
        # A base checkpoint with state_dtype=bfloat16 loads too: its moments are converted.
        group["state_dtype"] = "float32"

    @staticmethod
    def _is_8bit(p: torch.Tensor, group: dict) -> bool:
        return policy_numel(p) >= group["min_8bit_size"]

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        if not self._is_8bit(p, group):
            return super()._init_state(p, group)
        state = {"step": self._new_step(p)} if self._has_step else {}
        state.update(new_8bit_moments(p, self._moments))
        if self._wants_master(group, p):
            state["master_param"] = self._copy_like(p, p, torch.float32)
        return state

    def _load_param_state(self, p: torch.Tensor, saved: dict, group: dict, where: str) -> dict:
        if not self._is_8bit(p, group):
            return super()._load_param_state(p, saved, group, where)  # dequantizes if needed
        self._check_loaded_shapes(p, saved, where)
        missing = [k for k in (["step"] if self._has_step else []) + list(self._moments) if k not in saved]
        if missing:
            raise ValueError(f"{where}: state lacks {missing}")
        absmax_keys = {absmax_key for absmax_key, _ in self._moments.values()}
        dropped = set(self._elementwise_state_keys) | absmax_keys | {"step"}
        state = {k: v for k, v in saved.items() if k not in dropped}
        if self._has_step:
            state["step"] = self._new_step(p, float(torch.as_tensor(saved["step"]).item()))
        state.update(load_8bit_moments(p, saved, where, self._moments))
        if self._wants_master(group, p):
            state["master_param"] = self._copy_like(p, saved.get("master_param", p), torch.float32)
        return state

    def _split_8bit(self, group: dict, pairs) -> tuple[list, list]:
        """([(device, master?, [(param, grad, state)])] of 8-bit buckets, [(param, grad)] for the
        base's fp32 path)."""
        eight_bit, full_precision = [], []
        for (device, _, _, state_dtype, master), items in self._buckets(group, pairs).items():
            if state_dtype == torch.uint8:
                eight_bit.append((device, master, items))
            else:
                full_precision += [(p, g) for p, g, _ in items]
        return eight_bit, full_precision
