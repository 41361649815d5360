"""Two operator replicas with kopf peering: one leads, the other pauses and takes over."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.fixtures.kube import Cluster
from tests.fixtures.operator import GROUP, KV_GROUP, Objects, OperatorProcess, wait_for
from tests.operator.test_operator_kube import phase, request_body, setup_pool, suffix, vm_body

pytestmark = pytest.mark.kube


def test_standby_replica_pauses_then_takes_over(
    kube_apiserver: Cluster, kube_objects: Objects, kube_namespace: str, tmp_path: Path
) -> None:
    o, ns, sfx = kube_objects, kube_namespace, suffix(kube_namespace)
    peering = f"hostdev-{sfx}"
    o.api.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering},
    })  # fmt: skip
    o.cleanup.append(
        lambda: o.api.delete_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering)
    )
    replicas = {}
    for name, prio in (("standby", "10"), ("leader", "100")):
        (tmp_path / name).mkdir()
        replicas[name] = OperatorProcess(
            kube_apiserver, tmp_path / name, args=("--peering", peering, "--priority", prio)
        )
    standby, leader = replicas["standby"], replicas["leader"]
    try:
        standby.start()

        def peers() -> int:
            obj = o.api.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering)
            return len(obj.get("status") or {})

        wait_for("the standby in the peering", lambda: peers() == 1)
        leader.start()
        wait_for("both replicas in the peering", lambda: peers() == 2)
        wait_for("the standby to pause", lambda: "Pausing operations in favour of" in
                 standby.log_text())  # fmt: skip
        _, resource = setup_pool(o, sfx)
        o.create(KV_GROUP, "virtualmachines", ns, vm_body("vm1"))
        o.create(GROUP, "passthroughrequests", ns, request_body(
            "one", "vm1", {"name": "nic", "resourceName": resource}))  # fmt: skip
        wait_for("Applied by the leader", lambda: phase(o, ns, "one") == "Applied", timeout=40)
        assert "/one: VM vm1 hostDevices now has one-nic-0" in leader.log_text()
        assert "now has" not in standby.log_text()

        leader.stop(signal.SIGTERM)  # a clean exit removes it from the peering at once
        wait_for("the standby to resume", lambda: "Resuming operations" in standby.log_text())
        o.create(GROUP, "passthroughrequests", ns, request_body(
            "two", "vm1", {"name": "nic", "resourceName": resource}))  # fmt: skip
        wait_for("Applied by the former standby", lambda: phase(o, ns, "two") == "Applied",
                 timeout=40)  # fmt: skip
        names = [e["name"] for e in o.vm(ns, "vm1")["spec"]["template"]["spec"]["domain"][
            "devices"]["hostDevices"]]  # fmt: skip
        assert names == ["one-nic-0", "two-nic-0"]
        for req in ("one", "two"):
            o.delete(GROUP, "passthroughrequests", ns, req)
            wait_for(f"{req} released", lambda r=req: o.request(ns, r) is None)
    finally:
        for r in replicas.values():
            r.stop()
        for r in replicas.values():
            # kopf 1.45.2 bug: when peering pauses a replica while a watch request is still
            # connecting, kopf's done-callback calls asyncio.current_task() outside any task
            # and asserts on None (kopf/_cogs/clients/api.py, stream()); asyncio logs it, the
            # pause itself works. Anything else in the log still fails the test.
            r.check_log(tolerate=("request_cancel_callback",))
