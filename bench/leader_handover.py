"""Operator leader handover on a Lease (real kube-apiserver), with the chart's timings.

Each round: leader A and standby B run; A is killed with SIGKILL (no release); prints how long
until B holds the Lease and until B has answered a policy change (its first write). Then B is
stopped with SIGTERM (it releases the Lease) while C stands by: how long until C holds it.
Load average printed beside the figures.

    .venv/bin/python bench/leader_handover.py [--rounds 5] [--lease-duration 15]
        [--renew-deadline 10] [--retry-period 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

# operator_requests puts the repository on sys.path (for tests.fixtures) and has the helpers.
from operator_requests import free_port, start_plane, stop_process, tear_down

from tests.fixtures.kube import Cluster

GROUP, VERSION = "hostdev.io", "v1alpha1"
OPERATOR = Path(sys.executable).parent / "hostdev-operator"


class Replica:
    def __init__(self, cluster: Cluster, work: Path, name: str, lease: list[str]) -> None:
        self.name = name
        self.log = work / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(OPERATOR), "--leader-elect", "--lease-identity", name, *lease,
                 "--metrics-port", str(free_port())],
                cwd=work, env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int) -> None:
        stop_process(self.proc, sig)


def until(what: str, probe: Any, timeout: float = 120.0) -> float:
    t0 = time.monotonic()
    while not probe():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.02)
    return time.monotonic()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lease-duration", type=float, default=15.0)
    ap.add_argument("--renew-deadline", type=float, default=10.0)
    ap.add_argument("--retry-period", type=float, default=2.0)
    args = ap.parse_args()
    started = start_plane("hostdev-bench-lease-")
    if started is None:
        return 1
    cluster, plane, work = started
    replicas: list[Replica] = []
    ok = False
    try:
        api = k8s.CustomObjectsApi(cluster.admin)
        leases = k8s.CoordinationV1Api(cluster.admin)
        ns = cluster.create_namespace("lease")
        lease = ["--lease-namespace", ns, "--lease-duration", str(args.lease_duration),
                 "--renew-deadline", str(args.renew_deadline),
                 "--retry-period", str(args.retry_period)]  # fmt: skip
        api.create_cluster_custom_object(GROUP, VERSION, "passthroughpolicies", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "PassthroughPolicy",
            "metadata": {"name": "bench"},
            "spec": {"resourceName": "vendor.example/x", "selector": {"devices": ["154c"]}},
        })  # fmt: skip

        def holder() -> str | None:
            try:
                spec = leases.read_namespaced_lease("hostdev-operator", ns).spec
            except k8s.ApiException:
                return None
            return spec.holder_identity if spec else None

        def observed() -> int | None:
            obj = api.get_cluster_custom_object(GROUP, VERSION, "passthroughpolicies", "bench")
            return (obj.get("status") or {}).get("observedGeneration")

        def bump(n: int) -> int:
            got = api.patch_cluster_custom_object(GROUP, VERSION, "passthroughpolicies", "bench",
                                                  {"spec": {"priority": n}})  # fmt: skip
            return int(got["metadata"]["generation"])

        def start(name: str) -> Replica:
            r = Replica(cluster, work, name, lease)
            replicas.append(r)
            return r

        kill_lease, kill_write, term_lease = [], [], []
        leader = start("r0")
        until("first leader", lambda: holder() == "r0")
        for i in range(args.rounds):
            standby = start(f"r{i + 1}")
            until("standby", lambda s=standby: "standing by" in s.text())
            gen = bump(i + 1)
            until("leader answered", lambda g=gen: observed() == g)
            gen = bump(100 + i)
            t0 = time.monotonic()
            leader.stop(signal.SIGKILL)
            t_lease = until("takeover", lambda s=standby: holder() == s.name)
            t_write = until("new leader answered", lambda g=gen: observed() == g)
            kill_lease.append(t_lease - t0)
            kill_write.append(t_write - t0)
            leader = standby
        for i in range(args.rounds):
            standby = start(f"t{i}")
            until("standby", lambda s=standby: "standing by" in s.text())
            t0 = time.monotonic()
            leader.stop(signal.SIGTERM)  # returns once it exited (after releasing)
            t_lease = until("takeover", lambda s=standby: holder() == s.name)
            term_lease.append(t_lease - t0)
            leader = standby

        def fig(xs: list[float]) -> str:
            return f"p50 {statistics.median(xs):6.2f} s   max {max(xs):6.2f} s   (n={len(xs)})"

        load = os.getloadavg()
        print(f"leader handover (lease {args.lease_duration:g} s, renew deadline "
              f"{args.renew_deadline:g} s, retry {args.retry_period:g} s; "
              f"real kube-apiserver {cluster.server})")  # fmt: skip
        print(f"  kill -9 -> standby holds the Lease   {fig(kill_lease)}")
        print(f"  kill -9 -> standby's first write     {fig(kill_write)}")
        print(f"  SIGTERM -> standby holds the Lease   {fig(term_lease)} "
              "(from the signal; includes the old leader's kopf shutdown)")  # fmt: skip
        print(f"  load average                        {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
              f"({os.cpu_count()} CPUs)")  # fmt: skip
        ok = True
        return 0
    finally:
        for r in replicas:
            stop_process(r.proc)
        tear_down(cluster, plane, work, ok)


if __name__ == "__main__":
    sys.exit(main())
