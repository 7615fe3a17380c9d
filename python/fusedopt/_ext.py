"""Loads the native extension. Importing fusedopt never fails for a missing backend: the error
comes at the first call that needs it, naming what is missing."""
from __future__ import annotations

import torch

try:
    from fusedopt import _C  # noqa: F401

    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    _C = None
    _IMPORT_ERROR = e


def lib():
    if _C is None:
        raise RuntimeError(
            "fusedopt's native extension fusedopt._C could not be imported "
            f"({_IMPORT_ERROR}); reinstall with `pip install .` from the source tree"
        )
    return _C


def cuda_compiled() -> bool:
    return _C is not None and bool(_C.cuda_compiled())


def backends() -> dict:
    """What this build holds and what this machine can run."""
    compiled = cuda_compiled()
    return {
        "cpu": _C is not None,
        "cpu_isa": _C.cpu_isa() if _C is not None else "",
        "cuda_compiled": compiled,
        "cuda_archs": _C.cuda_archs() if compiled else "",
        "cuda_usable": compiled and torch.cuda.is_available(),
    }
