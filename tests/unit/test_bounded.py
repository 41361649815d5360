"""Reads with a deadline (hostdev.host.bounded), and discovery/scan of a PF whose lock is held.

A FIFO stands in for an attribute whose read waits for the device lock: opening it for reading
blocks until a writer comes, as a read of ``sriov_numvfs`` blocks while a PF's unbind waits for
a VF's VFIO user. The real thing is tests/kernel/guest/test_guest_nic.py."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostdev.cli import main
from hostdev.host import bounded
from hostdev.host.address import PciAddress
from hostdev.host.sysfs import Sysfs
from hostdev.testing.fakesysfs import FakeHost

PF = "0000:3b:00.0"


def release(path: Path) -> None:
    """A blocked reader of the FIFO goes on (it reads EOF)."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.close(fd)


def wait_until(cond: object, what: str) -> None:
    end = time.monotonic() + 20
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[list[Path]]:
    """FIFOs to block on; every one is released at the end (no reader thread is left)."""
    made: list[Path] = []
    yield made
    for p in made:
        if str(p) in bounded.stuck():
            release(p)
    wait_until(lambda: not bounded.stuck() & {str(p) for p in made}, "the readers to finish")


def fifo(tmp_path: Path, name: str, made: list[Path]) -> Path:
    p = tmp_path / name
    os.mkfifo(p)
    made.append(p)
    return p


def sysfs_readers() -> int:
    return sum(t.name == "sysfs-read" for t in threading.enumerate())


def test_plain_reads(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("7\n")
    got = bounded.read_many([str(tmp_path / "a"), str(tmp_path / "missing")], 1.0)
    assert got == {str(tmp_path / "a"): "7", str(tmp_path / "missing"): None}


def test_a_read_that_never_answers_is_busy_and_not_retried(
    tmp_path: Path, locked: list[Path]
) -> None:
    p = fifo(tmp_path, "sriov_numvfs", locked)
    assert bounded.read_one(str(p), 0.1) == bounded.BUSY
    assert str(p) in bounded.stuck()
    before = sysfs_readers()
    assert bounded.read_one(str(p), 5.0) == bounded.BUSY  # answered at once: still stuck
    assert sysfs_readers() == before  # and no second thread piles up on it
    release(p)
    wait_until(lambda: str(p) not in bounded.stuck(), "the stuck read to come back")


def test_stuck_reads_do_not_hold_up_the_others(tmp_path: Path, locked: list[Path]) -> None:
    stuck = [str(fifo(tmp_path, f"f{i}", locked)) for i in range(6)]  # more than the workers
    plain = []
    for i in range(20):
        (tmp_path / f"p{i}").write_text(f"{i}\n")
        plain.append(str(tmp_path / f"p{i}"))
    got = bounded.read_many(stuck + plain, 2.0)
    assert [got[p] for p in stuck] == [bounded.BUSY] * 6
    assert [got[p] for p in plain] == [str(i) for i in range(20)]


def test_discovery_and_scan_mark_a_pf_whose_lock_is_held(
    tmp_path: Path, locked: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    h = FakeHost(tmp_path / "root")
    h.add_pf(PF, vendor="8086", device="10c9", vf_device="10ca", totalvfs=7, numvfs=2,
             vf_driver="igbvf")  # fmt: skip
    attr = h.device_dir(PF) / "sriov_numvfs"
    attr.unlink()
    os.mkfifo(attr)
    locked.append(attr)
    sysfs = Sysfs(str(h.root), read_timeout=0.2)
    inv = sysfs.discover()
    pf = inv.devices[PciAddress.parse(PF)]
    assert pf.sriov_numvfs is None and len(pf.virtfns) == 2
    assert pf.busy == f"sriov_numvfs did not answer: {bounded.BUSY}"
    assert sysfs.read_device(pf.address).busy == pf.busy  # type: ignore[union-attr]
    assert main(["scan", "--host-root", str(h.root), "--json"]) == 0
    (row,) = [d for d in json.loads(capsys.readouterr().out)["devices"] if d["address"] == PF]
    assert row["busy"] == pf.busy and row["assignable"] == "no" and row["reason"] == pf.busy
    assert main(["scan", "--host-root", str(h.root)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(PF))
    assert "PF busy/7" in line and "unbind in progress?" in line
