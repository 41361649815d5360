"""How fast a waiting PassthroughRequest applies once capacity appears (real kube-apiserver).

Each round: a new node joins the policy's pool, a request pinned to a device on it waits
(Pending: the node's agent has not reported), then the "agent" reports the device. Prints the
time from the report being accepted by the API server to the request being Applied (p50, p99,
max), the operator's writes per request, and the load average beside them.

    .venv/bin/python bench/capacity_recheck.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kubernetes import client as k8s

# operator_requests puts the repository on sys.path (for tests.fixtures) and has the helpers.
from operator_requests import (
    free_port,
    operator_metric,
    start_plane,
    stop_process,
    tear_down,
    vm,
)

GROUP, VERSION = "hostdev.io", "v1alpha1"
RESOURCE = "vendor.example/bench-gpu"


def phase(api: k8s.CustomObjectsApi, ns: str, name: str) -> str | None:
    obj = api.get_namespaced_custom_object(GROUP, VERSION, ns, "passthroughrequests", name)
    return (obj.get("status") or {}).get("phase")


def wait(what: str, probe: object, timeout: float = 120.0, every: float = 0.01) -> float:
    t0 = time.monotonic()
    while not probe():  # type: ignore[operator]
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(every)
    return time.perf_counter()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    started = start_plane("hostdev-bench-cap-")
    if started is None:
        return 1
    cluster, plane, work = started
    op: subprocess.Popen[bytes] | None = None
    ok = False
    try:
        api = k8s.CustomObjectsApi(cluster.admin)
        core = k8s.CoreV1Api(cluster.admin)
        ns = cluster.create_namespace("bench")
        api.create_cluster_custom_object(GROUP, VERSION, "passthroughpolicies", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "PassthroughPolicy",
            "metadata": {"name": "bench"},
            "spec": {"resourceName": RESOURCE, "selector": {"classes": ["0302"]},
                     "nodeSelector": {"matchLabels": {"bench": "cap"}}},
        })  # fmt: skip
        port = free_port()
        with (work / "operator.log").open("wb") as log:
            op = subprocess.Popen(
                [str(Path(sys.executable).parent / "hostdev-operator"), "--standalone",
                 "--metrics-port", str(port)],
                cwd=work, env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        latencies: list[float] = []
        writes0: float | None = None
        for i in range(args.rounds):
            node, name = f"cap-{i:03d}", f"req-{i:03d}"
            core.create_node(k8s.V1Node(metadata=k8s.V1ObjectMeta(
                name=node, labels={"kubernetes.io/hostname": node, "bench": "cap"})))  # fmt: skip
            api.create_namespaced_custom_object("kubevirt.io", "v1", ns, "virtualmachines",
                                                vm(f"vm-{i:03d}"))  # fmt: skip
            api.create_namespaced_custom_object(GROUP, VERSION, ns, "passthroughrequests", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "PassthroughRequest",
                "metadata": {"name": name},
                "spec": {"vmName": f"vm-{i:03d}", "devices": [
                    {"name": "gpu", "node": node, "pciAddress": "0000:17:00.0"}]},
            })  # fmt: skip
            wait("Pending", lambda n=name: phase(api, ns, n) == "Pending", every=0.05)
            wait("NodeState", lambda n=node: api.list_cluster_custom_object(
                GROUP, VERSION, "passthroughnodestates",
                field_selector=f"metadata.name={n}")["items"], every=0.05)  # fmt: skip
            if writes0 is None:
                writes0 = operator_metric(port, "hostdev_operator_api_writes_total")
            report = {
                "status": {
                    "syncStatus": "Succeeded",
                    "iommu": {"enabled": True},
                    "devices": [
                        {
                            "pciAddress": "0000:17:00.0",
                            "vendor": "10de",
                            "device": "2236",
                            "class": "030200",
                            "resourceName": RESOURCE,
                            "health": "Healthy",
                        }
                    ],
                }
            }
            api.patch_cluster_custom_object_status(GROUP, VERSION, "passthroughnodestates",
                                                   node, report)  # fmt: skip
            t0 = time.perf_counter()
            t1 = wait("Applied", lambda n=name: phase(api, ns, n) == "Applied")
            latencies.append(t1 - t0)
        writes = operator_metric(port, "hostdev_operator_api_writes_total") - (writes0 or 0)
        lat = sorted(latencies)
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        load = os.getloadavg()
        print(f"capacity re-check: {args.rounds} requests Pending until their node reported "
              f"(real kube-apiserver {cluster.server})")  # fmt: skip
        print(f"  report accepted -> Applied   p50 {statistics.median(lat) * 1000:6.0f} ms   "
              f"p99 {p99 * 1000:6.0f} ms   max {lat[-1] * 1000:6.0f} ms")  # fmt: skip
        print(f"  operator writes per request  {writes / args.rounds:6.2f} (VM patch, status, "
              "NodeState spec of the new node, its policy status)")  # fmt: skip
        print(f"  load average                 {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
              f"({os.cpu_count()} CPUs)")  # fmt: skip
        ok = True
        return 0
    finally:
        stop_process(op)
        tear_down(cluster, plane, work, ok)


if __name__ == "__main__":
    sys.exit(main())
