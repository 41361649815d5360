"""Node agent start -> the kubelet (simulator) has the full device list; agent RSS.

For 8 PFs x 128 VFs and 16 x 256: ``hostdev-node`` is started as a real process against the
kubelet simulator; the clock runs from spawning the process to the simulator's ListAndWatch
holding every VF. "cold" = no saved lists (scan first); "warm" = restart with the lists saved
by the previous run (advertised before the scan, as after a node-agent restart).
Usage: .venv/bin/python bench/deviceplugin_start.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time

from deviceplugin_common import RESOURCE, SCALES, agent_argv, node_tree, rss_mib

from tests.fixtures.kubeletsim import KubeletSim


async def one_start(workdir, n: int) -> tuple[float, float, float]:
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
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
