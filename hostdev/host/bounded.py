"""Reads of sysfs attributes that can sleep in the kernel, with a deadline.

Some PCI attributes take the device lock to show their value (``sriov_numvfs`` on every kernel,
``driver_override`` on some). While a PF is being unbound from its driver the kernel holds that
lock until every VF is gone, and a VF held open through VFIO is only gone when its user lets go:
minutes, or never. A reader then sleeps uninterruptibly (D state) and cannot even be killed.

So such reads run on worker threads and the caller waits at most ``timeout`` seconds: what did
not answer in time is reported as :data:`BUSY` and its worker is left behind (it finishes by
itself when the kernel lets go). A path whose read is still stuck answers :data:`BUSY` at once,
without another thread. A process cannot end while one of its threads sleeps in the kernel, so
short-lived commands that read through here run detached (:mod:`hostdev.detach`).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Final

BUSY: Final = "busy: the kernel holds the device lock (unbind in progress?)"
DEFAULT_TIMEOUT = 2.0  # seconds; an uncontended sysfs read takes microseconds
_WORKERS = 4  # threads per batch to start with; more are added when the batch stalls
_MAX_WORKERS = 32

_lock = threading.Lock()
_stuck: set[str] = set()  # paths whose read is still sleeping in the kernel


def read_attr(path: str) -> str | None:
    """One attribute's stripped content (None: absent or unreadable), without a deadline: for
    attributes that never wait for a lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def stuck() -> frozenset[str]:
    """Paths whose read is still sleeping in the kernel (from an earlier timed-out batch)."""
    with _lock:
        return frozenset(_stuck)


def read_many(paths: Iterable[str], timeout: float = DEFAULT_TIMEOUT) -> dict[str, str | None]:
    """Each path's stripped content, ``None`` when it cannot be read, or :data:`BUSY` when the
    read did not finish within ``timeout`` seconds (all reads share one deadline)."""
    results: dict[str, str | None] = {}
    todo: deque[str] = deque()
    with _lock:
        for p in dict.fromkeys(paths):
            if p in _stuck:
                results[p] = BUSY
            else:
                todo.append(p)
    if not todo:
        return results
    wanted = len(todo)
    done: dict[str, str | None] = {}
    reading: set[str] = set()
    cond = threading.Condition()
    cancelled = False

    def worker() -> None:
        while True:
            with cond:
                if cancelled or not todo:
                    return
                p = todo.popleft()
                reading.add(p)
            value = read_attr(p)
            with cond, _lock:
                reading.discard(p)
                done[p] = value
                _stuck.discard(p)  # it came back after all (a batch that gave up marked it)
                cond.notify_all()

    workers = 0

    def spawn() -> None:
        nonlocal workers
        workers += 1
        threading.Thread(target=worker, name="sysfs-read", daemon=True).start()

    for _ in range(min(wanted, _WORKERS)):
        spawn()
    deadline = time.monotonic() + timeout
    with cond:
        while len(done) < wanted:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            seen = len(done)
            cond.wait(min(left, 0.05))
            if len(done) == seen and todo and workers < _MAX_WORKERS:
                spawn()  # every worker may be asleep in the kernel: keep the rest moving
        cancelled = True
        with _lock:
            _stuck.update(reading)
    for p in dict.fromkeys(paths):
        if p not in results:
            results[p] = done.get(p, BUSY)
    return results


def read_one(path: str, timeout: float = DEFAULT_TIMEOUT) -> str | None:
    return read_many((path,), timeout)[path]
