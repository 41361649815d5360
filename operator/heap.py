"""Freed heap pages back to the operating system after a burst (glibc's ``malloc_trim``).

A burst of requests takes the operator's memory up by ~40 MiB (kopf keeps a worker and the
event bodies per object while it is handled). Once the burst is over most of that is free, but
glibc keeps the freed pages in its heaps, so the process stayed at the burst's peak.
``malloc_trim(0)`` hands back free pages anywhere in the heaps, not only at their top (all that
``MALLOC_TRIM_THRESHOLD_`` does, which was tried and changed nothing). It is called on a timer:
~1 ms per call on this heap (measured during a burst), nothing against the ~4 MiB it returns
after one. Where the C library has no ``malloc_trim`` (musl) nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_INTERVAL_S = 1.0

Trim = Callable[[], object]


def find_malloc_trim() -> Trim | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return functools.partial(fn, 0)


async def trim_every(interval: float, trim: Trim) -> None:
    while True:
        await asyncio.sleep(interval)
        trim()


def start(
    interval: float = TRIM_INTERVAL_S, find: Callable[[], Trim | None] = find_malloc_trim
) -> asyncio.Task[None] | None:
    """The trimming task on the running loop (cancel it to stop), None without malloc_trim."""
    trim = find()
    if trim is None:
        log.info("no malloc_trim in this C library: freed heap pages stay with the process")
        return None
    return asyncio.get_running_loop().create_task(trim_every(interval, trim), name="heap-trim")
