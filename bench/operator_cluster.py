"""The operator at cluster scale on a real kube-apiserver + etcd (the test tier's control plane).

2,000 Nodes, 20 PassthroughPolicies (``all`` selects every node; ``pool1``..``pool19`` select
the nodes labelled with their pool, ~105 each), so the operator keeps 2,000 NodeStates. Prints,
each with the load average beside it:

- the first pass: seconds from the operator's spawn until every NodeState exists;
- a policy edit (``all``: numVfs 8 -> 16, affects every NodeState): seconds until every
  NodeState spec carries it, and the API writes it caused by resource (one per NodeState is the
  goal; none to the others);
- a node label change (one node moves to another pool): the writes it caused (one NodeState);
- a pool policy edit (``pool1``): NodeStates written vs NodeStates that select it;
- the operator's RSS (VmRSS, VmHWM);
- a restart with everything in place: writes in the 30 s after the new operator's first pass.

    .venv/bin/python bench/operator_cluster.py [--nodes 2000] [--pools 19]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from operator_requests import (
    GROUP,
    VERSION,
    apiserver_writes,
    free_port,
    operator_metric,
    rss_kib,
    start_plane,
    stop_process,
    tear_down,
)

NODESTATES = "passthroughnodestates"


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def policy(name: str, selector: dict[str, str], device: str, pf: str, num_vfs: int) -> Any:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "PassthroughPolicy",
        "metadata": {"name": name},
        "spec": {"resourceName": f"example.com/{name}", "nodeSelector": {"matchLabels": selector},
                 "selector": {"vendors": ["8086"], "devices": [device], "pfNames": [pf]},
                 "sriov": {"numVfs": num_vfs}, "driver": "vfio-pci"},
    }  # fmt: skip


def pool_of(i: int, pools: int) -> str:
    return f"p{i % pools + 1}"


def wait(what: str, cond: Callable[[], bool], timeout: float, poll: float = 0.5) -> float:
    """Seconds until ``cond()`` holds (SystemExit after ``timeout``)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timeout waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - t0


def writes_since(cluster: Any, before: Counter[str]) -> Counter[str]:
    delta = apiserver_writes(cluster) - before
    delta.pop("leases", None)  # the API server's own lease renewals (kube-system)
    return delta


def start_operator(work: Path, cluster: Any, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    log = (work / "operator.log").open("ab")
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "hostdev-operator"), "--standalone",
         "--metrics-port", str(port)],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def cluster_passes(port: int) -> float:
    try:
        return operator_metric(port, "hostdev_operator_reconciles_total")
    except OSError:
        return -1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--pools", type=int, default=19, help="pool policies besides 'all'")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    started = start_plane("hostdev-bench-cluster-")
    if started is None:
        return 1
    cluster, plane, work = started
    op: subprocess.Popen[bytes] | None = None
    ok = False
    try:
        api = k8s.CustomObjectsApi(cluster.admin)
        core = k8s.CoreV1Api(cluster.admin)
        names = [f"node-{i:04d}" for i in range(args.nodes)]

        def node(i: int) -> None:
            labels = {"kubernetes.io/hostname": names[i], "bench/all": "true",
                      "bench/pool": pool_of(i, args.pools)}  # fmt: skip
            core.create_node(k8s.V1Node(metadata=k8s.V1ObjectMeta(name=names[i], labels=labels)))

        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(node, range(args.nodes)))
        everyone = policy("all", {"bench/all": "true"}, "154c", "ens1f0", 8)
        api.create_cluster_custom_object(GROUP, VERSION, "passthroughpolicies", everyone)
        for p in range(1, args.pools + 1):
            api.create_cluster_custom_object(GROUP, VERSION, "passthroughpolicies",
                policy(f"pool{p}", {"bench/pool": f"p{p}"}, "10ed", "ens2f0", 4))  # fmt: skip
        print(f"cluster: {args.nodes} Nodes, {args.pools + 1} policies created in "
              f"{time.monotonic() - t0:.1f} s (real kube-apiserver {cluster.server}; {load()})",
              flush=True)  # fmt: skip

        def states() -> dict[str, Any]:
            items: Any = api.list_cluster_custom_object(GROUP, VERSION, NODESTATES)
            items = items["items"]
            return {i["metadata"]["name"]: i for i in items}

        port = free_port()
        t0 = time.monotonic()
        op = start_operator(work, cluster, port)
        wait("every NodeState", lambda: len(states()) == args.nodes, args.timeout, poll=1.0)
        print(f"  first pass: {args.nodes} NodeStates exist {time.monotonic() - t0:7.1f} s "
              f"after the operator's spawn ({load()})", flush=True)  # fmt: skip
        time.sleep(10)  # its last passes (policy status) settle

        def num_vfs(obj: Any, pf: str) -> int | None:
            for p in (obj.get("spec") or {}).get("pfs") or ():
                if p.get("pfName") == pf:
                    return int(p["numVfs"])
            return None

        # 1. policy edit reaching every NodeState
        before = apiserver_writes(cluster)
        t0 = time.monotonic()
        api.patch_cluster_custom_object(GROUP, VERSION, "passthroughpolicies", "all",
                                        {"spec": {"sriov": {"numVfs": 16}}})  # fmt: skip
        took = wait("the edit in every NodeState",
                    lambda: all(num_vfs(s, "ens1f0") == 16 for s in states().values()),
                    args.timeout)  # fmt: skip
        took = time.monotonic() - t0
        time.sleep(5)
        w = writes_since(cluster, before)
        w["passthroughpolicies"] -= 1  # ours
        print(f"  policy edit (all {args.nodes} NodeStates affected): every spec after "
              f"{took:6.1f} s ({load()}); writes {dict(+w)}", flush=True)  # fmt: skip

        # 2. a pool policy edit: only its ~nodes/pools NodeStates
        members = [n for i, n in enumerate(names) if pool_of(i, args.pools) == "p1"]
        before = apiserver_writes(cluster)
        t0 = time.monotonic()
        api.patch_cluster_custom_object(GROUP, VERSION, "passthroughpolicies", "pool1",
                                        {"spec": {"sriov": {"numVfs": 6}}})  # fmt: skip

        def pool_done() -> bool:
            got = states()
            return all(num_vfs(got[n], "ens2f0") == 6 for n in members)

        took = wait("the pool edit", pool_done, args.timeout)
        time.sleep(5)
        w = writes_since(cluster, before)
        w["passthroughpolicies"] -= 1
        print(f"  pool policy edit ({len(members)} NodeStates select it): every spec after "
              f"{took:6.1f} s ({load()}); writes {dict(+w)}", flush=True)  # fmt: skip

        # 3. one node changes pool
        moved, target = names[0], pool_of(1, args.pools)
        before = apiserver_writes(cluster)
        t0 = time.monotonic()
        core.patch_node(moved, {"metadata": {"labels": {"bench/pool": target}}})
        want = f"example.com/pool{target[1:]}"

        def moved_done() -> bool:
            obj: Any = api.get_cluster_custom_object(GROUP, VERSION, NODESTATES, moved)
            return any(d.get("resourceName") == want for d in obj["spec"].get("devices") or ())

        took = wait("the moved node", moved_done, args.timeout, poll=0.1)
        time.sleep(5)
        w = writes_since(cluster, before)
        w["nodes"] -= 1
        print(f"  node label change (one node to another pool): its NodeState after "
              f"{took:6.2f} s ({load()}); writes {dict(+w)}", flush=True)  # fmt: skip
        print(f"  operator RSS now / peak {rss_kib(op.pid, 'VmRSS') / 1024:.1f} / "
              f"{rss_kib(op.pid, 'VmHWM') / 1024:.1f} MiB ({load()})", flush=True)  # fmt: skip

        # 4. restart with everything in place
        stop_process(op)
        before = apiserver_writes(cluster)
        t0 = time.monotonic()
        op = start_operator(work, cluster, port)
        wait("the new operator's first pass", lambda: cluster_passes(port) >= 1, args.timeout)
        first = time.monotonic() - t0
        time.sleep(30)
        w = writes_since(cluster, before)
        print(f"  restart: first pass {first:5.1f} s after spawn; writes in the 30 s after it "
              f"{dict(+w)} ({load()})", flush=True)  # fmt: skip
        print(f"  operator RSS after restart now / peak {rss_kib(op.pid, 'VmRSS') / 1024:.1f} / "
              f"{rss_kib(op.pid, 'VmHWM') / 1024:.1f} MiB", flush=True)  # fmt: skip
        ok = True
        return 0
    finally:
        stop_process(op)
        tear_down(cluster, plane, work, ok)


if __name__ == "__main__":
    sys.exit(main())
