"""Node agent start -> the real kubelet device manager has every device allocatable; peak RSS.

For 1 PF x 8 VFs, 8 x 128 (1,024 VFs) and 16 x 256 (4,096): ``hostdev-node`` is started as a
real process beside the kubelet's own device manager (tests/tools/kubelet-harness, polling its
allocatable count every 2 ms); the clock runs from spawning the agent to the manager's
allocatable count holding every VF. Modes:

- ``file-cold``: ``--config`` resource file, no saved lists (scan first);
- ``file-warm``: the lists saved by the previous run are served before the scan;
- ``cluster-cold``: cluster mode against a real kube-apiserver + etcd (tests/fixtures/kube.py)
  with a PassthroughNodeState naming the VFs and no saved lists: the agent reads the NodeState
  before serving anything (the production mode). Peak RSS is read once the NodeState status
  says Succeeded (the whole first sync, its status write and the DRA front end included).
  The agent gets the credentials a DaemonSet pod has (a service-account directory and
  KUBERNETES_SERVICE_HOST/PORT; ``--credentials kubeconfig``: a kubeconfig file instead, the
  development path, which also reads YAML).

The agent runs in an "installed" interpreter layout (``--python installed``, the default): a
throw-away venv whose path entries are the repository and this venv's site-packages, so it
imports exactly this code and these packages but, like the image, with compiled bytecode and
without the editable install's import hook (see deviceplugin_common.agent_python). The agent is
started, as in the image, through its ``hostdev-node`` console script.
``--python dev`` runs the development venv as is. The load average is printed beside every
figure.

Usage: .venv/bin/python bench/deviceplugin_start.py [--runs N] [--sizes 1x8,8x128,16x256]
       [--modes file-cold,file-warm,cluster-cold] [--python installed|dev]
       [--credentials in-cluster|kubeconfig] [--allocate-rounds N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from deviceplugin_common import (
    RESOURCE,
    agent_command,
    agent_python,
    harness_binary,
    load,
    node_tree,
    peak_rss_mib,
    write_config,
)
from kubernetes import client as k8s

from hostdev.policy.naming import socket_name
from tests.fixtures.kube import ControlPlane, find_tools

GROUP, VERSION, PLURAL = "hostdev.io", "v1alpha1", "passthroughnodestates"
SIZES = ((1, 8), (8, 128), (16, 256))


def _wait_socket(sock: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not sock.is_socket():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sock} did not appear")
        time.sleep(0.002)


def start_harness(workdir: Path, n: int, *extra: str) -> subprocess.Popen[bytes]:
    harness = harness_binary()
    dp = workdir / "dp"
    shutil.rmtree(dp, ignore_errors=True)
    proc = subprocess.Popen(
        [
            str(harness),
            f"--dir={dp}",
            f"--resource={RESOURCE}",
            f"--expect={n}",
            "--allocatable",
            "--poll=2ms",
            "--numa-nodes=2",
            "--timeout=300s",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    _wait_socket(dp / "kubelet.sock")
    return proc


def harness_result(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0 or not out:
        raise SystemExit(f"kubelet-harness failed (exit {proc.returncode})")
    res: dict[str, Any] = json.loads(out.decode().splitlines()[0])
    return res


def in_cluster_credentials(workdir: Path, cluster: Cluster) -> tuple[list[str], dict[str, str]]:
    """What a DaemonSet pod has: a service-account directory (token, ca.crt) and
    KUBERNETES_SERVICE_HOST/PORT; the agent then reads no kubeconfig (and imports no YAML)."""
    sa = workdir / "serviceaccount"
    return [f"--service-account-dir={sa}"], cluster.pod_credentials(sa)


def agent_argv(
    python: str, workdir: Path, cluster: Cluster | None, node: str, credentials: list[str]
) -> list[str]:
    argv = [
        *agent_command(python),
        f"--host-root={workdir / 'host'}",
        f"--plugin-dir={workdir / 'dp'}",
        f"--state-dir={workdir / 'state'}",
        "--metrics-port=0",
        "--log-level=WARNING",
    ]
    if cluster is None:
        return [*argv, f"--config={write_config(workdir)}"]
    return [
        *argv,
        f"--node-name={node}",
        *credentials,
        f"--pod-resources-socket={workdir / 'no-kubelet.sock'}",
        f"--kubelet-registry-dir={workdir / 'reg'}",
        f"--kubelet-plugins-dir={workdir / 'plugins'}",
        f"--cdi-dir={workdir / 'cdi'}",
    ]


Cluster = Any  # tests.fixtures.kube.Cluster (kept loose: the bench runs without pytest too)


def node_state(crd: k8s.CustomObjectsApi, name: str) -> None:
    crd.create_cluster_custom_object(
        GROUP,
        VERSION,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "PassthroughNodeState",
            "metadata": {"name": name},
            "spec": {"devices": [{"selector": {"devices": ["1889"]}, "resourceName": RESOURCE}]},
        },
    )


def wait_synced(crd: k8s.CustomObjectsApi, name: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj: Any = crd.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        if (obj.get("status") or {}).get("syncStatus") == "Succeeded":
            return
        time.sleep(0.05)
    raise SystemExit(f"NodeState {name} did not reach Succeeded")


def one_start(
    python: tuple[str, dict[str, str]],
    workdir: Path,
    n: int,
    cluster: Cluster | None,
    rounds: int = 0,
    kubeconfig: bool = False,
) -> tuple[float, float, float, dict[str, Any] | None]:
    """(seconds from spawn to allocatable == n, peak RSS MiB, load average at the end, and
    with ``rounds`` the harness's Allocate round trips: "start", made as soon as every device
    was there (while the agent's post-start work runs), and in cluster mode "settled", made
    again once the NodeState status said Succeeded)."""
    node = f"bench-{uuid.uuid4().hex[:6]}"
    crd = k8s.CustomObjectsApi(cluster.admin) if cluster is not None else None
    if crd is not None:
        node_state(crd, node)
    extra = []
    settled = workdir / "settled"
    settled.unlink(missing_ok=True)
    if rounds:
        sock = workdir / "dp" / socket_name(RESOURCE)
        extra = [f"--rpc-rounds={rounds}", f"--rpc-socket={sock}"]
        if crd is not None:
            extra.append(f"--rpc-settled-file={settled}")
    credentials: list[str] = []
    env = {k: v for k, v in python[1].items() if not k.startswith(("KUBERNETES_", "KUBECONFIG"))}
    if cluster is not None and kubeconfig:
        credentials = [f"--kubeconfig={cluster.kubeconfig}"]
    elif cluster is not None:
        credentials, sa_env = in_cluster_credentials(workdir, cluster)
        env.update(sa_env)
    harness = start_harness(workdir, n, *extra)
    t0 = time.time()
    agent = subprocess.Popen(
        agent_argv(python[0], workdir, cluster, node, credentials),
        stderr=subprocess.DEVNULL,
        cwd="/",
        env=env,
    )
    try:
        if crd is not None:
            wait_synced(crd, node)
            rss = peak_rss_mib(agent.pid)
            settled.touch()  # the harness's second set of Allocate calls may go now
            res = harness_result(harness)
        else:
            res = harness_result(harness)
            time.sleep(0.5)  # the agent's post-start work (saving the lists)
            rss = peak_rss_mib(agent.pid)
        elapsed = float(res["met_unix"]) - t0
    finally:
        agent.terminate()
        agent.wait(timeout=60)
        if crd is not None:
            crd.delete_cluster_custom_object(GROUP, VERSION, PLURAL, node)
    calls = {"start": res.get("rpc_rounds"), "settled": res.get("rpc_rounds_settled")}
    return elapsed, rss, load(), {k: v for k, v in calls.items() if v is not None} or None


def summary(label: str, runs: list[tuple[float, float, float, dict[str, Any] | None]]) -> str:
    times = [r[0] for r in runs]
    return (
        f"{label}: spawn -> allocatable min {min(times):.3f} s, median "
        f"{statistics.median(times):.3f} s, max {max(times):.3f} s; peak RSS "
        f"{max(r[1] for r in runs):.1f} MiB  (n={len(runs)}, load {runs[0][2]:.2f} .. "
        f"{runs[-1][2]:.2f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default=",".join(f"{p}x{v}" for p, v in SIZES))
    ap.add_argument("--modes", default="file-cold,file-warm,cluster-cold")
    ap.add_argument("--python", default="installed", choices=["installed", "dev"])
    ap.add_argument(
        "--credentials",
        default="in-cluster",
        choices=["in-cluster", "kubeconfig"],
        help="cluster-cold: the pod's service account (as the DaemonSet runs) or a kubeconfig",
    )
    ap.add_argument(
        "--allocate-rounds",
        type=int,
        default=0,
        help="cluster-cold: N Allocate calls from grpc-go (one caller) after each start",
    )
    args = ap.parse_args()
    modes = args.modes.split(",")
    python = agent_python(args.python)
    print(
        f"agent interpreter: {args.python} ({python[0]}); cluster-cold credentials: "
        f"{args.credentials}; load {load():.2f}",
        flush=True,
    )
    plane = cluster = None
    work = Path(tempfile.mkdtemp(prefix="hb-kube-", dir="/tmp"))
    try:
        if "cluster-cold" in modes:
            tools = find_tools()
            if tools is None:
                raise SystemExit("kube-apiserver or etcd missing: run scripts/setup-test-tools.sh")
            plane = ControlPlane(work / "kube", tools)
            cluster = plane.start()
        for size in args.sizes.split(","):
            pfs, vfs = (int(x) for x in size.split("x"))
            n = pfs * vfs
            workdir = node_tree(pfs, vfs)
            try:
                for mode in modes:
                    runs = []
                    for _ in range(args.runs):
                        if mode != "file-warm":
                            shutil.rmtree(workdir / "state", ignore_errors=True)
                        elif not (workdir / "state").exists():
                            one_start(python, workdir, n, None)  # leaves the lists behind
                        in_cluster = mode == "cluster-cold"
                        rounds = args.allocate_rounds if in_cluster else 0
                        runs.append(
                            one_start(
                                python,
                                workdir,
                                n,
                                cluster if in_cluster else None,
                                rounds,
                                kubeconfig=args.credentials == "kubeconfig",
                            )
                        )
                    print(summary(f"{pfs}x{vfs} ({n} VFs) {mode}", runs), flush=True)
                    for when, r in (kv for run in runs for kv in (run[3] or {}).items()):
                        print(
                            f"  Allocate round trip, {when} (grpc-go, {r['callers']} caller, "
                            f"{r['calls']} calls, {r['errors']} errors): p50 {r['p50_ms']:.3f} "
                            f"ms, p99 {r['p99_ms']:.3f} ms, max {r['max_ms']:.3f} ms "
                            f"(load {load():.2f})",
                            flush=True,
                        )
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if plane is not None:
            plane.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
