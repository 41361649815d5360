"""Device plugin at runtime, ``hostdev-node`` as a real process against the kubelet simulator:

- Allocate latency (gRPC round trip seen by the caller) with 1 and 50 concurrent callers, plus
  the handler's own cost measured in-process (re-check of the device on the fake sysfs);
- event -> ListAndWatch update: a VF leaves vfio-pci (driver link flipped, /dev/vfio/<group>
  removed, as the kernel does) -> the simulator receives the list with it Unhealthy; and back;
- kubelet restart (sockets wiped, kubelet.sock re-created) -> registered again / full list.
Usage: .venv/bin/python bench/deviceplugin_runtime.py [--scale 8x128|16x256|all]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import time
import urllib.request
from pathlib import Path

from deviceplugin_common import RESOURCE, SCALES, agent_argv, fmt_ms, node_tree, rss_mib

from hostdev.deviceplugin.metrics import Metrics
from hostdev.deviceplugin.plugin import ResourcePlugin
from hostdev.deviceplugin.resources import parse_resources
from hostdev.host import Sysfs
from hostdev.host.model import Inventory
from tests.fixtures.kube import free_port
from tests.fixtures.kubeletsim import KubeletSim, PluginClient


def _allocate_histogram(port: int) -> dict[float, float]:
    """Cumulative bucket counts of hostdev_allocate_seconds (le -> count)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[float, float] = {}
    for m in re.finditer(
        r'^hostdev_allocate_seconds_bucket\{le="([^"]+)",[^}]*\} (\S+)$', text, re.M
    ):
        out[float(m.group(1))] = float(m.group(2))
    return out


def _server_side(before: dict[float, float], after: dict[float, float]) -> str:
    delta = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = delta[float("inf")]

    def q(p: float) -> str:
        for le, n in delta.items():
            if n >= p * total:
                return f"<= {le * 1e3:g} ms"
        return "?"

    return f"handler (server side, histogram): p50 {q(0.5)}, p99 {q(0.99)}"


async def bench_allocate(client: PluginClient, ids: list[str], port: int) -> None:
    rnd = random.Random(1)
    for _ in range(50):  # warm up the channel
        await client.allocate([rnd.choice(ids)])
    for callers, per_caller in ((1, 2000), (50, 60)):
        lat: list[float] = []

        async def caller(lat: list[float] = lat, per_caller: int = per_caller) -> None:
            for _ in range(per_caller):
                t = time.perf_counter()
                await client.allocate([rnd.choice(ids)])
                lat.append(time.perf_counter() - t)

        before = await asyncio.to_thread(_allocate_histogram, port)
        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        wall = time.perf_counter() - t0
        after = await asyncio.to_thread(_allocate_histogram, port)
        print(
            f"  Allocate round trip, {callers:2d} concurrent callers: {fmt_ms(lat)}; "
            f"{len(lat) / wall:.0f} calls/s; {_server_side(before, after)}",
            flush=True,
        )


def bench_allocate_handler(host: Path, inv: Inventory) -> None:
    (cfg,) = parse_resources([{"resourceName": RESOURCE, "selector": {"devices": ["1889"]}}])
    plugin = ResourcePlugin(cfg, Sysfs(str(host)), "/nonexistent", Metrics())
    plugin.update(inv)
    ids = sorted(plugin.devices)
    rnd = random.Random(2)
    lat = []
    for _ in range(5000):
        t = time.perf_counter()
        plugin.container_response([rnd.choice(ids)])
        lat.append(time.perf_counter() - t)
    print(f"  Allocate handler alone (in-process, 1 device): {fmt_ms(lat)}", flush=True)


async def bench_events(client: PluginClient, host: Path, ids: list[str], rounds: int) -> None:
    rnd = random.Random(3)
    down: list[float] = []
    up: list[float] = []
    for _ in range(rounds):
        vf = rnd.choice(ids)
        dev = host / "sys/bus/pci/devices" / vf
        group = os.path.basename(os.readlink(dev / "iommu_group"))
        node = host / "dev/vfio" / group
        link = dev / "driver"
        target = os.readlink(link)
        # Unbind from vfio-pci the way the kernel shows it: driver link, then the group node.
        t = time.perf_counter()
        link.unlink()
        node.unlink()
        await client.wait_for(lambda d, vf=vf: d[vf].health == "Unhealthy", within=10)
        down.append(time.perf_counter() - t)
        t = time.perf_counter()
        link.symlink_to(target)
        node.write_text("")
        await client.wait_for(lambda d, vf=vf: d[vf].health == "Healthy", within=10)
        up.append(time.perf_counter() - t)
        await asyncio.sleep(0.01)
    print(f"  event -> ListAndWatch, VF leaves vfio-pci: {fmt_ms(down)}", flush=True)
    print(f"  event -> ListAndWatch, VF back on vfio-pci: {fmt_ms(up)}", flush=True)


async def bench_kubelet_restart(sim: KubeletSim, n: int, rounds: int) -> None:
    reg: list[float] = []
    full: list[float] = []
    for i in range(rounds):
        t = await sim.restart()
        await sim.wait_registered(RESOURCE, count=i + 2, within=30)
        reg.append(sim.registrations[-1].at - t)
        await sim.client(RESOURCE).wait_for(lambda d: len(d) == n, within=30)
        full.append(time.monotonic() - t)
    print(f"  kubelet restart -> re-registered: {fmt_ms(reg)}", flush=True)
    print(f"  kubelet restart -> kubelet has the full list again: {fmt_ms(full)}", flush=True)


async def run_scale(pfs: int, vfs: int) -> None:
    n = pfs * vfs
    workdir = node_tree(pfs, vfs)
    host = workdir / "host"
    print(f"{pfs}x{vfs} ({n} VFs):", flush=True)
    sim = KubeletSim(str(workdir / "dp"))
    await sim.start(wipe=True)
    port = free_port()
    argv = [a for a in agent_argv(workdir, "--no-uevents") if a != "--metrics-port=0"]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        f"--metrics-port={port}",
        "--metrics-addr=127.0.0.1",
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await sim.wait_registered(RESOURCE, within=120)
        client = sim.client(RESOURCE)
        ids = sorted(await client.wait_for(lambda d: len(d) == n, within=120))
        print(f"  agent RSS after start: {rss_mib(proc.pid):.1f} MiB", flush=True)
        await bench_allocate(client, ids, port)
        await bench_events(sim.client(RESOURCE), host, ids, rounds=100)
        await bench_kubelet_restart(sim, n, rounds=10)
        print(f"  agent RSS at the end: {rss_mib(proc.pid):.1f} MiB", flush=True)
    finally:
        proc.terminate()
        await proc.wait()
        await sim.stop()
    bench_allocate_handler(host, Sysfs(str(host)).discover())
    shutil.rmtree(workdir, ignore_errors=True)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="all", choices=["8x128", "16x256", "all"])
    args = ap.parse_args()
    for pfs, vfs in SCALES:
        if args.scale in ("all", f"{pfs}x{vfs}"):
            await run_scale(pfs, vfs)


if __name__ == "__main__":
    asyncio.run(main())
