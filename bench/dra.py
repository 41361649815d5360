"""The DRA front end of a real ``hostdev-node`` process against a real kube-apiserver + etcd, on
cached fake SR-IOV nodes (8 PFs x 128 VFs = 1,024 units, 16 x 256 = 4,096). Figures only.

- **start -> slices**: from spawning the agent (cluster mode, NodeState with the VFs as a DRA
  resource) to every unit being offered in the node's ResourceSlices, with the slice writes the
  agent made (its ``hostdev_dra_slice_writes`` metric) and its RSS.
- **prepare**: NodePrepareResources over the agent's DRA socket, as the kubelet calls it, for
  claims allocated to one unit each (the claim read from the API server, the re-check and the
  file writes included); p50/p99. Each is unprepared again.
- **unit leaves vfio-pci -> update**: a VF is unbound (its /dev/vfio node goes); time until the
  dra-health stream reports it Unhealthy and until its slice no longer lists it; p50/p99.

    .venv/bin/python bench/dra.py [--sizes 8x128,16x256] [--prepares 200] [--flips 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
from deviceplugin_common import fmt_ms, node_tree, rss_mib
from kubernetes import client as k8s
from kubernetes import watch

from hostdev.deviceplugin.api.dra.v1 import api_pb2 as dra_v1
from hostdev.deviceplugin.api.dra.v1 import api_pb2_grpc as dra_v1_grpc
from hostdev.deviceplugin.api.drahealth.v1 import api_pb2 as health_v1
from hostdev.deviceplugin.api.drahealth.v1 import api_pb2_grpc as health_v1_grpc
from hostdev.host import PciAddress, Sysfs
from hostdev.policy.dra import DRIVER, device_name
from hostdev.testing.fakesysfs import FakeHost
from tests.fixtures.dra import RS, agent_argv, allocate_by_hand, create_claim, one_request
from tests.fixtures.kube import ControlPlane, find_tools, free_port

RES = "example.com/bench-vf"


class SliceWatch:
    """This node's slices as a watch delivers them (no polling: the API server's load stays the
    agent's), with the time each change arrived."""

    def __init__(self, api: k8s.CustomObjectsApi, node: str) -> None:
        self.api, self.node = api, node
        self.devices: dict[str, set[str]] = {}  # slice -> device names
        self.cv = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sel = f"spec.nodeName={self.node}"
        while not self.stop.is_set():
            try:
                resp: Any = self.api.list_cluster_custom_object(
                    *RS, "resourceslices", field_selector=sel
                )
                with self.cv:
                    self.devices = {
                        o["metadata"]["name"]: {d["name"] for d in o["spec"].get("devices") or ()}
                        for o in resp["items"]
                    }
                    self.cv.notify_all()
                w = watch.Watch()
                for ev in w.stream(
                    self.api.list_cluster_custom_object,
                    *RS,
                    "resourceslices",
                    field_selector=sel,
                    resource_version=resp["metadata"]["resourceVersion"],
                    timeout_seconds=60,
                ):
                    obj = ev["object"]
                    name = obj["metadata"]["name"]
                    with self.cv:
                        if ev["type"] == "DELETED":
                            self.devices.pop(name, None)
                        elif ev["type"] in ("ADDED", "MODIFIED"):
                            self.devices[name] = {
                                d["name"] for d in obj["spec"].get("devices") or ()
                            }
                        self.cv.notify_all()
                    if self.stop.is_set():
                        return
            except Exception:  # the watch cache not ready yet (504), expired (410): list again
                if self.stop.is_set():
                    return
                time.sleep(0.2)

    def offered(self) -> dict[str, str]:
        with self.cv:
            return {d: s for s, devs in self.devices.items() for d in devs}

    def wait(self, ok: Any, timeout: float = 600) -> float:
        """perf_counter time at which ``ok(device -> slice)`` first held."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while not ok({d: s for s, devs in self.devices.items() for d in devs}):
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = {k: len(v) for k, v in self.devices.items()}
                    alive = self.thread.is_alive()
                    raise SystemExit(f"timed out waiting for the slices (seen {seen}, {alive=})")
                self.cv.wait(left)
            return time.perf_counter()


def slice_writes(port: int) -> dict[str, int]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("hostdev_dra_slice_writes_total{"):
            verb = line.split('verb="')[1].split('"')[0]
            out[verb] = int(float(line.rsplit(" ", 1)[1]))
    return out


def start_agent(work: Path, kubeconfig: Path, node: str, port: int) -> subprocess.Popen[bytes]:
    argv = agent_argv(
        work,
        kubeconfig,
        f"--metrics-port={port}",
        "--metrics-addr=127.0.0.1",
        f"--log-level={os.environ.get('BENCH_LOG', 'WARNING')}",
    )
    log = (work / "agent.log").open("wb")
    return subprocess.Popen(
        argv, env={**os.environ, "NODE_NAME": node}, stdout=log, stderr=subprocess.STDOUT
    )


def make_claim(api: k8s.CustomObjectsApi, ns: str, name: str, node: str, device: str) -> str:
    obj = create_claim(api, ns, name, one_request("vf"))
    allocate_by_hand(api, ns, name, "vf", node, device)
    return str(obj["metadata"]["uid"])


async def prepares(
    sock: Path, api: k8s.CustomObjectsApi, ns: str, node: str, devices: list[str]
) -> list[float]:
    times = []
    async with grpc.aio.insecure_channel(f"unix://{sock}") as ch:
        stub = dra_v1_grpc.DRAPluginStub(ch)
        for i, dev in enumerate(devices):
            name = f"c{i}-{uuid.uuid4().hex[:5]}"
            uid = make_claim(api, ns, name, node, dev)
            claim = dra_v1.Claim(namespace=ns, uid=uid, name=name)
            t = time.perf_counter()
            resp = await stub.NodePrepareResources(
                dra_v1.NodePrepareResourcesRequest(claims=[claim])
            )
            times.append(time.perf_counter() - t)
            if resp.claims[uid].error:
                raise SystemExit(f"prepare failed: {resp.claims[uid].error}")
            await stub.NodeUnprepareResources(dra_v1.NodeUnprepareResourcesRequest(claims=[claim]))
    return times


async def flips(
    sock: Path, host: FakeHost, slices: SliceWatch, vfs: list[PciAddress]
) -> tuple[list[float], list[float]]:
    health_s: list[float] = []
    slice_s: list[float] = []
    async with grpc.aio.insecure_channel(f"unix://{sock}") as ch:
        stream = health_v1_grpc.DRAResourceHealthStub(ch).NodeWatchResources(
            health_v1.NodeWatchResourcesRequest()
        )
        await stream.read()
        for vf in vfs:
            name = device_name(vf)
            t0 = time.perf_counter()
            host.bind(vf, None)  # leaves vfio-pci: /dev/vfio/<group> goes
            gone = asyncio.create_task(
                asyncio.to_thread(slices.wait, lambda off, name=name: name not in off, 120)
            )
            while True:
                msg = await asyncio.wait_for(stream.read(), 60)
                if any(
                    d.device.device_name == name and d.health == health_v1.UNHEALTHY
                    for d in msg.devices
                ):
                    health_s.append(time.perf_counter() - t0)
                    break
            slice_s.append(await gone - t0)
            host.bind(vf, "vfio-pci")  # back, and wait until it is offered again
            await asyncio.to_thread(slices.wait, lambda off, name=name: name in off, 120)
        stream.cancel()
    return health_s, slice_s


def run_size(cluster: Any, pfs: int, vfs: int, args: argparse.Namespace) -> None:
    api = k8s.CustomObjectsApi(cluster.admin)
    core = k8s.CoreV1Api(cluster.admin)
    node = f"bench-{uuid.uuid4().hex[:6]}"
    core.create_node(k8s.V1Node(metadata=k8s.V1ObjectMeta(name=node)))
    ns = cluster.create_namespace("bench-dra")
    api.create_cluster_custom_object(
        "hostdev.io", "v1alpha1", "passthroughnodestates",
        {
            "apiVersion": "hostdev.io/v1alpha1",
            "kind": "PassthroughNodeState",
            "metadata": {"name": node},
            "spec": {"devices": [{"selector": {"devices": ["1889"]}, "resourceName": RES,
                                  "allocation": "DRA"}]},
        },
    )  # fmt: skip
    work = node_tree(pfs, vfs)
    units = pfs * vfs
    port = free_port()
    slices = SliceWatch(api, node)
    t0 = time.perf_counter()
    proc = start_agent(work, cluster.kubeconfig, node, port)
    try:
        try:
            publish = slices.wait(lambda off: len(off) == units, 300) - t0
        except SystemExit as e:
            raise SystemExit(f"{e}\n" + (work / "agent.log").read_text()[-3000:]) from None
        time.sleep(1.0)
        writes = slice_writes(port)
        rss = rss_mib(proc.pid)
        load = os.getloadavg()
        print(
            f"{pfs}x{vfs} = {units} units: start -> all offered in slices {publish:.2f} s; "
            f"slice writes {json.dumps(writes)}; agent RSS {rss:.0f} MiB; "
            f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
            flush=True,
        )
        sock = work / "plugins" / DRIVER / "dra.sock"
        inv = Sysfs(str(work / "host")).discover()
        vfs_list = sorted(a for a, d in inv.devices.items() if d.device == "1889")
        step = max(1, len(vfs_list) // args.prepares)
        picks = vfs_list[::step][: args.prepares]
        times = asyncio.run(prepares(sock, api, ns, node, [device_name(a) for a in picks]))
        print(f"  prepare (1 unit, via gRPC):  {fmt_ms(times)}", flush=True)
        before = slice_writes(port)
        host = FakeHost(work / "host")
        flip = vfs_list[1 :: max(1, len(vfs_list) // args.flips)][: args.flips]
        health, withdrawn = asyncio.run(flips(sock, host, slices, flip))
        after = slice_writes(port)
        load = os.getloadavg()
        print(f"  leaves vfio-pci -> dra-health Unhealthy: {fmt_ms(health)}")
        print(f"  leaves vfio-pci -> withdrawn from its slice: {fmt_ms(withdrawn)}")
        print(
            f"  slice writes for {len(flip)} out-and-back flips: "
            f"{ {k: after.get(k, 0) - before.get(k, 0) for k in after} }; "
            f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
            flush=True,
        )
    finally:
        slices.stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        api.delete_cluster_custom_object("hostdev.io", "v1alpha1", "passthroughnodestates", node)
        core.delete_node(node)
        for s in api.list_cluster_custom_object(*RS, "resourceslices")["items"]:
            if s["spec"].get("nodeName") == node:
                api.delete_cluster_custom_object(*RS, "resourceslices", s["metadata"]["name"])
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"  kept {work}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="8x128,16x256")
    p.add_argument("--prepares", type=int, default=200)
    p.add_argument("--flips", type=int, default=30)
    args = p.parse_args()
    tools = find_tools()
    if tools is None:
        raise SystemExit("kube-apiserver or etcd missing: run scripts/setup-test-tools.sh")
    with tempfile.TemporaryDirectory() as tmp:
        plane = ControlPlane(Path(tmp) / "kube", tools)
        cluster = plane.start()
        try:
            for size in args.sizes.split(","):
                pfs, vfs = (int(x) for x in size.split("x"))
                run_size(cluster, pfs, vfs, args)
        finally:
            cluster.close()
            plane.stop()


if __name__ == "__main__":
    main()
