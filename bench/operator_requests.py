"""Operator throughput against a real kube-apiserver + etcd (the test tier's control plane).

1,000 PassthroughRequests over 100 VirtualMachines (10 per VM, so they contend for the same VM
object), created while the operator runs. Prints: seconds until every request is Applied (and
until every deletion is released), API writes per request as the API server counted them
(apiserver_request_total, our own creates/deletes subtracted), the operator's own write
counter, VM optimistic-lock conflicts, and the operator's RSS: idle, at the end of the burst,
after the steady period and after every request was deleted (VmRSS) and its peak (VmHWM); the
load average beside the figures. ``--rate N`` creates at most N requests a second (default:
as fast as 16 client threads go, ~200/s here, faster than the operator applies them): what the
same requests cost without the burst's backlog.

    .venv/bin/python bench/operator_requests.py [--requests 1000] [--vms 100] [--rate N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# tests/ holds the control-plane code; append, never prepend: the top-level operator/ folder
# would shadow the standard library's operator module.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

import yaml  # noqa: E402
from kubernetes import client as k8s  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.fixtures.kube import Cluster, ControlPlane, find_tools, free_port  # noqa: E402

GROUP, VERSION = "hostdev.io", "v1alpha1"
RESOURCE = "vendor.example/bench-vf"
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE"}


def apiserver_writes(cluster: Cluster) -> Counter[str]:
    """Write requests the API server has served, by resource (its own /metrics)."""
    req = urllib.request.Request(f"{cluster.server}/metrics")
    req.add_header("Authorization", f"Bearer {cluster.admin_token}")
    ctx = ssl.create_default_context(cafile=str(cluster.ca_cert))
    with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
        text = resp.read().decode()
    out: Counter[str] = Counter()
    for fam in text_string_to_metric_families(text):
        if fam.name != "apiserver_request":
            continue
        for s in fam.samples:
            if s.name.endswith("_total") and s.labels.get("verb") in WRITE_VERBS:
                sub = s.labels.get("subresource") or ""
                key = s.labels.get("resource", "") + (f"/{sub}" if sub else "")
                out[key] += int(s.value)
    return out


def operator_metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    )


def rss_kib(pid: int, field: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Signal the process group ``proc`` leads; SIGKILL after 30 s."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_plane(prefix: str) -> tuple[Cluster, ControlPlane, Path] | None:
    """A fresh control plane in a new work dir (None, said on stderr, without the tools)."""
    tools = find_tools()
    if tools is None:
        print("kube-apiserver/etcd missing: run scripts/setup-test-tools.sh", file=sys.stderr)
        return None
    work = Path(tempfile.mkdtemp(prefix=prefix))
    plane = ControlPlane(work / "kube", tools)
    return plane.start(), plane, work


def tear_down(cluster: Cluster, plane: ControlPlane, work: Path, ok: bool) -> None:
    """Stop the control plane; remove the work dir after a good run, else say where it is."""
    cluster.close()
    plane.stop()
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work} (process logs, kube/*.log)")


def vm(name: str) -> dict[str, Any]:
    body = yaml.safe_load((REPO / "examples" / "2-vm.yaml").read_text())
    body["metadata"]["name"] = name
    return body


def phases(api: k8s.CustomObjectsApi, ns: str) -> Counter[str]:
    items = api.list_namespaced_custom_object(GROUP, VERSION, ns, "passthroughrequests")["items"]
    return Counter((i.get("status") or {}).get("phase", "none") for i in items)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--steady", type=float, default=30, help="seconds of idle measurement")
    ap.add_argument("--rate", type=float, default=0, help="creates per second (0: no limit)")
    args = ap.parse_args()
    started = start_plane("hostdev-bench-op-")
    if started is None:
        return 1
    cluster, plane, work = started
    op: subprocess.Popen[bytes] | None = None
    ok = False
    try:
        api = k8s.CustomObjectsApi(cluster.admin)
        core = k8s.CoreV1Api(cluster.admin)
        ns = cluster.create_namespace("bench")
        core.create_node(k8s.V1Node(metadata=k8s.V1ObjectMeta(
            name="bench-node", labels={"kubernetes.io/hostname": "bench-node"})))  # fmt: skip
        api.create_cluster_custom_object(GROUP, VERSION, "passthroughpolicies", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "PassthroughPolicy",
            "metadata": {"name": "bench"},
            "spec": {"resourceName": RESOURCE, "selector": {"devices": ["154c"]}},
        })  # fmt: skip
        for i in range(args.vms):
            api.create_namespaced_custom_object("kubevirt.io", "v1", ns, "virtualmachines",
                                                vm(f"vm-{i:03d}"))  # fmt: skip

        port = free_port()
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        log = (work / "operator.log").open("wb")
        op = subprocess.Popen(
            [str(Path(sys.executable).parent / "hostdev-operator"), "--standalone",
             "--metrics-port", str(port)],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        # The node agent's report: 64 VFs under the resource (each request asks for one).
        deadline = time.monotonic() + 60
        while True:
            try:
                api.get_cluster_custom_object(GROUP, VERSION, "passthroughnodestates", "bench-node")
                break
            except k8s.ApiException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        devices = [
            {"pciAddress": f"0000:3b:{2 + i // 8:02x}.{i % 8}", "vendor": "8086",
             "device": "154c", "resourceName": RESOURCE, "health": "Healthy"}
            for i in range(64)
        ]  # fmt: skip
        api.patch_cluster_custom_object_status(GROUP, VERSION, "passthroughnodestates",
            "bench-node", {"status": {"syncStatus": "Succeeded", "devices": devices}})  # fmt: skip
        time.sleep(2)  # let the operator settle its cluster state before counting

        before = apiserver_writes(cluster)
        rss_idle = rss_kib(op.pid, "VmRSS")
        cpu0 = cpu_seconds(op.pid)
        t0 = time.monotonic()

        def create(i: int) -> None:
            if args.rate:
                time.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))
            api.create_namespaced_custom_object(GROUP, VERSION, ns, "passthroughrequests", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "PassthroughRequest",
                "metadata": {"name": f"req-{i:04d}"},
                "spec": {"vmName": f"vm-{i % args.vms:03d}",
                         "devices": [{"name": "nic", "resourceName": RESOURCE}]},
            })  # fmt: skip

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(args.requests)))
        created_s = time.monotonic() - t0
        while True:
            got = phases(api, ns)
            if got.get("Applied", 0) == args.requests:
                break
            if time.monotonic() - t0 > args.timeout or op.poll() is not None:
                print(f"timeout/exit: phases {dict(got)}; log {work / 'operator.log'}")
                return 1
            time.sleep(0.25)
        applied_s = time.monotonic() - t0
        cpu_applied = cpu_seconds(op.pid) - cpu0
        after = apiserver_writes(cluster)
        delta = after - before
        delta["passthroughrequests"] -= args.requests  # our own creates
        delta.pop("leases", None)  # the API server's own lease renewals (kube-system)
        op_writes = delta.total()
        own_counter = operator_metric(port, "hostdev_operator_api_writes_total")
        conflicts = operator_metric(port, "hostdev_operator_api_conflicts_total")
        rss = rss_kib(op.pid, "VmRSS"), rss_kib(op.pid, "VmHWM")

        load_applied = os.getloadavg()[0]
        # steady state: nothing changes, the request refresher still looks every 15 s
        cpu_s0, t_s0 = cpu_seconds(op.pid), time.monotonic()
        time.sleep(args.steady)
        steady = (cpu_seconds(op.pid) - cpu_s0) / (time.monotonic() - t_s0) * 100
        steady_writes = apiserver_writes(cluster) - after
        steady_writes.pop("leases", None)
        rss_steady = rss_kib(op.pid, "VmRSS")

        # every VM holds exactly its 10 entries
        bad = 0
        for i in range(args.vms):
            v = api.get_namespaced_custom_object("kubevirt.io", "v1", ns, "virtualmachines",
                                                 f"vm-{i:03d}")  # fmt: skip
            names = [e["name"] for e in v["spec"]["template"]["spec"]["domain"]["devices"].get(
                "hostDevices", [])]  # fmt: skip
            want = args.requests // args.vms + (1 if i < args.requests % args.vms else 0)
            bad += len(names) != want or len(set(names)) != len(names)

        t1 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda i: api.delete_namespaced_custom_object(
                        GROUP, VERSION, ns, "passthroughrequests", f"req-{i:04d}"
                    ),
                    range(args.requests),
                )
            )
        while phases(api, ns).total():
            if time.monotonic() - t1 > args.timeout:
                print("timeout waiting for deletions")
                return 1
            time.sleep(0.25)
        released_s = time.monotonic() - t1
        time.sleep(5)  # the deletions' last events
        rss_released = rss_kib(op.pid, "VmRSS")

        print(f"operator bench: {args.requests} requests over {args.vms} VMs "
              f"(one node, real kube-apiserver {cluster.server})")  # fmt: skip
        pace = f", at most {args.rate:g}/s" if args.rate else ""
        print(f"  created all requests in          {created_s:7.2f} s (16 client threads{pace})")
        print(f"  all Applied after                {applied_s:7.2f} s "
              f"({args.requests / applied_s:.0f} requests/s; load {load_applied:.2f})")  # fmt: skip
        print(f"  operator CPU until all Applied   {cpu_applied:7.2f} s "
              f"({cpu_applied / args.requests * 1000:.1f} ms per request; {os.cpu_count()} CPUs "
              "shared with etcd, kube-apiserver and this client)")  # fmt: skip
        print(f"  steady state, {args.requests} requests idle  {steady:5.1f} % of a CPU, "
              f"{steady_writes.total()} writes in {args.steady:.0f} s")  # fmt: skip
        print(f"  all deleted + released after     {released_s:7.2f} s")
        print(f"  API writes per request (server)  {op_writes / args.requests:7.2f} "
              f"= {op_writes} writes: " + ", ".join(f"{k} {v}" for k, v in
                                                     sorted(delta.items()) if v))  # fmt: skip
        print(f"  operator's own writes (metric)   {own_counter:7.0f} "
              f"(VM patches + status, kopf's bookkeeping aside)")  # fmt: skip
        print(f"  VM optimistic-lock conflicts     {conflicts:7.0f}")
        print(f"  VMs with wrong entries           {bad:7d}")
        print(f"  operator RSS idle / all Applied / after {args.steady:.0f} s / all deleted / peak "
              f"{rss_idle / 1024:.1f} / {rss[0] / 1024:.1f} / {rss_steady / 1024:.1f} / "
              f"{rss_released / 1024:.1f} / {rss[1] / 1024:.1f} MiB "
              f"(load {os.getloadavg()[0]:.2f})")  # fmt: skip
        ok = bad == 0
        return 0 if ok else 1
    finally:
        stop_process(op)
        tear_down(cluster, plane, work, ok)


if __name__ == "__main__":
    sys.exit(main())
