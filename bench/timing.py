"""Shared by the bench scripts: node sizes and a repeat-timer (figures only, no assertions)."""

from __future__ import annotations

import time
from collections.abc import Callable

# (PFs, VFs per PF): ~64, ~512, ~1,024 and ~4,096 VFs.
SIZES = [(2, 32), (4, 128), (8, 128), (16, 256)]


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` calls of ``fn``."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out
