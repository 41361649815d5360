"""Shared bits of the device-plugin benchmarks: cached fake nodes and stats.

Building a 16x256 fake node with :mod:`hostdev.testing.fakesysfs` takes minutes (the builder
re-syncs every /dev/vfio node on each bind), so built trees are cached under
``~/.cache/hostdev/bench-trees`` and copied per run.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The repository root holds tests/ (kubelet simulator); append, never prepend: the top-level
# operator/ folder would shadow the standard library's operator module.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from hostdev.testing.scenarios import sriov_scale  # noqa: E402

CACHE = Path(os.environ.get("HOSTDEV_CACHE", Path.home() / ".cache" / "hostdev")) / "bench-trees"
SCALES = ((8, 128), (16, 256))


def node_tree(pfs: int, vfs: int) -> Path:
    """A fresh copy of the cached ``pfs`` x ``vfs`` SR-IOV node (built on first use)."""
    src = CACHE / f"sriov-{pfs}x{vfs}"
    if not (src / ".complete").exists():
        shutil.rmtree(src, ignore_errors=True)
        t = time.perf_counter()
        print(f"building the {pfs}x{vfs} fake node (cached afterwards)...", flush=True)
        sriov_scale(src, pfs=pfs, vfs=vfs)
        (src / ".complete").write_text("")
        print(f"  built in {time.perf_counter() - t:.0f}s", flush=True)
    dst = Path(tempfile.mkdtemp(prefix="hb-", dir="/tmp"))
    shutil.copytree(src, dst / "host", symlinks=True)
    return dst


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def fmt_ms(values: list[float]) -> str:
    return (
        f"p50 {pct(values, 50) * 1e3:.3f} ms  p99 {pct(values, 99) * 1e3:.3f} ms  "
        f"max {max(values) * 1e3:.3f} ms  (n={len(values)}, mean "
        f"{statistics.fmean(values) * 1e3:.3f} ms)"
    )


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


RESOURCE = "example.com/e810_vf"


def write_config(workdir: Path) -> Path:
    cfg = workdir / "resources.yaml"
    cfg.write_text(f"- resourceName: {RESOURCE}\n  selector: {{devices: ['1889']}}\n")
    return cfg


def agent_argv(workdir: Path, *extra: str) -> list[str]:
    """``hostdev-node`` on the fake node, talking to the simulator in ``workdir/dp``."""
    return [
        sys.executable,
        "-m",
        "hostdev.deviceplugin.agent",
        f"--host-root={workdir / 'host'}",
        f"--plugin-dir={workdir / 'dp'}",
        f"--state-dir={workdir / 'state'}",
        f"--config={write_config(workdir)}",
        "--metrics-port=0",
        "--log-level=WARNING",
        *extra,
    ]
