"""Processes in a fake host tree: what ``/proc/<pid>/fd`` shows the safety guards.

A running VM is a QEMU process holding its devices' VFIO group nodes open; the guards read that
from ``/proc/*/fd`` under ``--host-root``. ``hold_open`` makes such a process, ``let_go`` ends it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def hold_open(root: Path | str, pid: int, *nodes: str, comm: str = "qemu-kvm") -> None:
    """Process ``pid`` (named ``comm``) holds each of ``nodes`` (e.g. /dev/vfio/57) open."""
    proc = Path(root) / "proc" / str(pid)
    (proc / "fd").mkdir(parents=True, exist_ok=True)
    (proc / "comm").write_text(comm + "\n")
    start = len(list((proc / "fd").iterdir())) + 3
    for i, node in enumerate(nodes):
        os.symlink(node, proc / "fd" / str(start + i))


def let_go(root: Path | str, pid: int) -> None:
    """Process ``pid`` exits: its file descriptors close."""
    shutil.rmtree(Path(root) / "proc" / str(pid), ignore_errors=True)
