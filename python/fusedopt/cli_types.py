"""argparse types shared by the `python -m fusedopt` commands: a bad value becomes argparse's
one-line usage error instead of a traceback from deep inside the command."""
from __future__ import annotations

import argparse


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v
