"""Node agent start -> the kubelet (simulator) has the full device list; agent RSS.

For 8 PFs x 128 VFs and 16 x 256: ``hostdev-node`` is started as a real process against the
kubelet simulator; the clock runs from spawning the process to the simulator's ListAndWatch
holding every VF. "cold" = no saved lists (scan first); "warm" = restart with the lists saved
by the previous run (advertised before the scan, as after a node-agent restart).
With the real kubelet device manager (tests/tools/kubelet-harness, when built) the same is
timed against Kubernetes' own code: from spawning the agent to the manager reporting capacity.
Usage: .venv/bin/python bench/deviceplugin_start.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import time
from pathlib import Path

from deviceplugin_common import RESOURCE, SCALES, agent_argv, node_tree, rss_mib

from tests.fixtures.kubeletsim import KubeletSim


async def one_start(workdir: Path, n: int) -> tuple[float, float, float]:
    sim = KubeletSim(str(workdir / "dp"))
    await sim.start(wipe=True)
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *agent_argv(workdir), stderr=asyncio.subprocess.DEVNULL
    )
    try:
        await sim.wait_registered(RESOURCE, within=120)
        t_reg = time.monotonic() - t0
        await sim.client(RESOURCE).wait_for(lambda d: len(d) == n, within=120)
        t_list = time.monotonic() - t0
        await asyncio.sleep(1.0)  # let the scan settle before reading RSS
        rss = rss_mib(proc.pid)
    finally:
        proc.terminate()
        await proc.wait()
        await sim.stop()
    return t_reg, t_list, rss


def harness_binary() -> Path | None:
    cache = Path(os.environ.get("HOSTDEV_CACHE", Path.home() / ".cache" / "hostdev"))
    path = Path(os.environ.get("HOSTDEV_TOOLS_BIN", cache / "bin")) / "kubelet-harness"
    return path if path.is_file() else None


def _wait_socket(sock: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not sock.is_socket():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sock} did not appear")
        time.sleep(0.005)


async def one_start_real(workdir: Path, n: int, harness: Path) -> float:
    """Agent spawn -> the real device manager has capacity n (harness exits with its result)."""
    kubelet = await asyncio.create_subprocess_exec(
        str(harness),
        f"--dir={workdir / 'dp'}",
        f"--resource={RESOURCE}",
        f"--expect={n}",
        "--timeout=120s",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    sock = workdir / "dp" / "kubelet.sock"
    await asyncio.to_thread(_wait_socket, sock)
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *agent_argv(workdir), stderr=asyncio.subprocess.DEVNULL
    )
    try:
        out, _ = await kubelet.communicate()
        elapsed = time.monotonic() - t0
        res = json.loads(out.decode().splitlines()[0])
        assert res["capacity"][RESOURCE] == n, res["capacity"]
    finally:
        proc.terminate()
        await proc.wait()
    return elapsed


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    for pfs, vfs in SCALES:
        n = pfs * vfs
        workdir = node_tree(pfs, vfs)
        try:
            for mode in ("cold", "warm"):
                regs, lists, rsss = [], [], []
                for _ in range(args.runs):
                    if mode == "cold":
                        shutil.rmtree(workdir / "state", ignore_errors=True)
                    else:
                        await one_start(workdir, n)  # leaves the saved lists behind
                    t_reg, t_list, rss = await one_start(workdir, n)
                    regs.append(t_reg)
                    lists.append(t_list)
                    rsss.append(rss)
                print(
                    f"{pfs}x{vfs} ({n} VFs) {mode}: registered {min(regs):.3f}s "
                    f"(median {sorted(regs)[len(regs) // 2]:.3f}s), full list "
                    f"{min(lists):.3f}s (median {sorted(lists)[len(lists) // 2]:.3f}s), "
                    f"agent RSS {max(rsss):.1f} MiB",
                    flush=True,
                )
            harness = harness_binary()
            if harness is None:
                print(f"{pfs}x{vfs}: real kubelet device manager: harness not built, skipped")
                continue
            for mode in ("cold", "warm"):
                times = []
                for _ in range(args.runs):
                    if mode == "cold":
                        shutil.rmtree(workdir / "state", ignore_errors=True)
                    times.append(await one_start_real(workdir, n, harness))
                print(
                    f"{pfs}x{vfs} ({n} VFs) {mode}, real kubelet device manager: capacity "
                    f"{n} after {min(times):.3f}s (median {sorted(times)[len(times) // 2]:.3f}s)",
                    flush=True,
                )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
