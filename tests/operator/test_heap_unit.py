"""Freed heap pages back to the OS (hostdev.operator.heap): the real glibc call, the timer."""

from __future__ import annotations

import asyncio
import logging

import pytest

from hostdev.operator.heap import find_malloc_trim, start, trim_every


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_malloc_trim_returns_freed_pages_that_glibc_kept() -> None:
    trim = find_malloc_trim()
    assert trim is not None, "this runner's C library is glibc: malloc_trim must be found"
    # 64 MiB in 4 KiB blocks (glibc's heap, below its mmap threshold); one block in 16 stays,
    # so the free pages lie between live ones and glibc keeps them on free().
    blocks = [bytes(4000) for _ in range(16 * 1024)]
    kept = blocks[::16]
    del blocks
    before = _rss_kib()
    trim()
    after = _rss_kib()
    assert len(kept) == 1024
    assert before - after > 24 * 1024, (before, after)


async def test_trim_every_keeps_calling_until_cancelled() -> None:
    calls, third = [0], asyncio.Event()

    def fake_trim() -> int:
        calls[0] += 1
        if calls[0] == 3:
            third.set()
        return 1

    task = asyncio.create_task(trim_every(0.001, fake_trim))
    await asyncio.wait_for(third.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_start_runs_the_timer_or_says_there_is_nothing_to_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    called = asyncio.Event()
    task = start(0.001, find=lambda: called.set)
    assert task is not None and task.get_name() == "heap-trim"
    await asyncio.wait_for(called.wait(), 10)
    task.cancel()

    with caplog.at_level(logging.INFO, logger="hostdev.operator.heap"):
        assert start(0.001, find=lambda: None) is None
    assert "no malloc_trim in this C library" in caplog.text
