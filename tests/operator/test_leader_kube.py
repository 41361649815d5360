"""Lease leader election between operator processes against the real API server. Each process
authenticates as its own user, so the audit log tells whose writes are whose."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.fixtures.kube import Cluster
from tests.fixtures.operator import (
    GROUP,
    VERSION,
    Objects,
    OperatorProcess,
    free_port,
    identity_kubeconfig,
    wait_for,
)
from tests.operator.test_operator_kube import policy

pytestmark = pytest.mark.kube

# Short leases keep the test quick; the defaults (15/10/2 s) are measured in bench/.
DURATION, DEADLINE, RETRY = 6.0, 4.0, 0.5
ROUNDS = int(os.environ.get("HOSTDEV_LEADER_ROUNDS", "50"))
# Sleeps until the wall-clock time in argv[1], then becomes the operator: both processes of a
# round start within a millisecond or two of each other, whatever the fork cost was.
BARRIER = (
    "import os, sys, time; time.sleep(max(0.0, float(sys.argv[1]) - time.time())); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


class Replicas:
    def __init__(self, cluster: Cluster, ns: str, lease: str, tmp: Path) -> None:
        self.cluster, self.ns, self.lease, self.tmp = cluster, ns, lease, tmp
        self.all: list[OperatorProcess] = []

    def make(self, name: str) -> OperatorProcess:
        user = f"op-{name}-{uuid.uuid4().hex[:6]}"
        d = self.tmp / name
        d.mkdir()
        op = OperatorProcess(
            self.cluster, d, metrics_port=free_port(), user=user,
            kubeconfig=identity_kubeconfig(self.cluster, user, d / "kubeconfig"),
            args=("--leader-elect", "--lease-namespace", self.ns, "--lease-name", self.lease,
                  "--lease-identity", user, "--lease-duration", str(DURATION),
                  "--renew-deadline", str(DEADLINE), "--retry-period", str(RETRY)),
        )  # fmt: skip
        self.all.append(op)
        return op

    def holder(self) -> str | None:
        try:
            lease = k8s.CoordinationV1Api(self.cluster.admin).read_namespaced_lease(
                self.lease, self.ns
            )
        except k8s.ApiException as e:
            if e.status == 404:
                return None
            raise
        return lease.spec.holder_identity if lease.spec else None

    def writes(self, op: OperatorProcess) -> list[dict[str, Any]]:
        """Everything ``op`` wrote except its lease."""
        return [e for e in self.cluster.audit(user=op.user, stage="ResponseComplete")
                if (e.get("objectRef") or {}).get("resource") != "leases"]  # fmt: skip

    def logged_writes(self, op: OperatorProcess, what: str) -> list[dict[str, Any]]:
        """``op``'s writes once at least one is in the audit log: the API server logs a
        ResponseComplete event after the response, so a write seen through the API may not be
        in the log yet (seen once in a loaded run)."""
        return wait_for(what, lambda: self.writes(op), timeout=30)

    def stop_all(self) -> None:
        for op in self.all:
            op.stop()


@pytest.fixture
def replicas(
    kube_apiserver: Cluster, kube_objects: Objects, kube_namespace: str, tmp_path: Path
) -> Iterator[Replicas]:
    del kube_objects  # teardown order: processes stop before the objects go
    r = Replicas(kube_apiserver, kube_namespace, f"hostdev-{uuid.uuid4().hex[:6]}", tmp_path)
    try:
        yield r
    finally:
        r.stop_all()
        for op in r.all:
            op.check_log()


def bump(o: Objects, name: str, n: int) -> int:
    """A spec change the leader must answer with a status write (observedGeneration)."""
    got = o.api.patch_cluster_custom_object(GROUP, VERSION, "passthroughpolicies", name,
                                            {"spec": {"priority": n % 1000}})  # fmt: skip
    return int(got["metadata"]["generation"])


def observed(o: Objects, name: str) -> int | None:
    return (o.policy(name).get("status") or {}).get("observedGeneration")


# 50 rounds of two operator start-ups take 3.5-8 min on 2 idle cores and longer on a loaded
# machine; the limit only catches a hang (each wait in a round has its own).
@pytest.mark.timeout(1800)
def test_two_processes_started_together_never_lead_at_once(
    replicas: Replicas, kube_objects: Objects, kube_namespace: str
) -> None:
    """Even rounds race to create the Lease, odd rounds to take a released one."""
    o, sfx = kube_objects, kube_namespace.rsplit("-", 1)[-1]
    name = f"le-{sfx}"
    o.create_policy(policy(name, f"vendor.example/le-{sfx}", {"devices": ["154c"]}, sfx))
    leases = k8s.CoordinationV1Api(replicas.cluster.admin)
    # A round whose spawns ended after the common start (a loaded machine) did not start both
    # processes together: its checks still run, but it is repeated, up to ROUNDS more times.
    together, late = 0, []
    for i in range(2 * ROUNDS):
        if together == ROUNDS:
            break
        if i % 2 == 0:
            with contextlib.suppress(k8s.ApiException):
                leases.delete_namespaced_lease(replicas.lease, replicas.ns)
        elif replicas.holder() is not None:
            leases.patch_namespaced_lease(replicas.lease, replicas.ns, {"spec": {
                "holderIdentity": None, "leaseDurationSeconds": 1}})  # fmt: skip
        gen = bump(o, name, i)
        a, b = replicas.make(f"{i}a"), replicas.make(f"{i}b")
        start_at = time.time() + 1.0
        for op in (a, b):
            op.prefix = (sys.executable, "-c", BARRIER, repr(start_at))
            op.start()
        if time.time() < start_at:  # both spawns ended before the common start
            together += 1
        else:
            late.append(round(time.time() - start_at, 3))
        leader = wait_for(f"round {i}: a leader answered", lambda g=gen: observed(o, name) == g
                          and replicas.holder(), timeout=60)  # fmt: skip
        ops = {op.user: op for op in (a, b)}
        assert leader in ops, (leader, list(ops))
        replicas.logged_writes(ops[leader], f"round {i}: the leader's write in the audit log")
        by = {user: len(replicas.writes(op)) for user, op in ops.items()}
        assert sorted(by.values())[0] == 0 and by[leader] >= 1, f"round {i}: writes {by}"
        standby = a if leader == b.user else b
        # On a loaded machine the standby may still be importing when the leader answers:
        # wait until it has seen the Lease, then check it never led or wrote.
        wait_for(f"round {i}: the other stands by", lambda s=standby: "standing by"
                 in s.log_text(), timeout=60)  # fmt: skip
        assert "leading" not in standby.log_text()
        assert len(replicas.writes(standby)) == 0, f"round {i}: the standby wrote"
        for op in (a, b):
            op.assert_alive()
            op.stop(signal.SIGKILL)  # quick; the next round resets the Lease itself
    # ROUNDS rounds in which both processes exec'd the operator at the same instant (the
    # barrier): their spawns had finished before it.
    assert together == ROUNDS, f"{together} of {ROUNDS} rounds started together; late by {late}"


def test_kill9_hands_over_after_the_lease_and_sigterm_at_once(
    replicas: Replicas, kube_objects: Objects, kube_namespace: str
) -> None:
    o, sfx = kube_objects, kube_namespace.rsplit("-", 1)[-1]
    name = f"ho-{sfx}"
    o.create_policy(policy(name, f"vendor.example/ho-{sfx}", {"devices": ["154c"]}, sfx))
    first = replicas.make("first")
    first.start()
    wait_for("first leads", lambda: replicas.holder() == first.user, timeout=60)
    wait_for("first answered", lambda: observed(o, name) == 1, timeout=60)
    second = replicas.make("second")
    second.start()
    wait_for("second stands by", lambda: "standing by" in second.log_text(), timeout=60)

    # kill -9: no release. The standby takes over once the lease has expired. The policy
    # changes only after the kill, so the answer can come from the new leader alone.
    killed = time.monotonic()
    first.stop(signal.SIGKILL)
    gen = bump(o, name, 1)
    wait_for("second leads", lambda: replicas.holder() == second.user, timeout=60)
    took = time.monotonic() - killed
    wait_for("second answered", lambda: observed(o, name) == gen, timeout=60)
    replicas.logged_writes(second, "the new leader's write in the audit log")
    print(f"handover after kill -9: {took:.2f}s (lease duration {DURATION}s, retry {RETRY}s)")

    # SIGTERM: kopf stops, the lease is released, a standby takes it at its next look.
    third = replicas.make("third")
    third.start()
    wait_for("third stands by", lambda: "standing by" in third.log_text(), timeout=60)
    second.stop(signal.SIGTERM)
    assert second.proc is None
    assert "Lease" in second.log_text() and "released" in second.log_text()
    wait_for("third leads", lambda: replicas.holder() == third.user, timeout=60)


def test_foreign_holder_is_respected_until_its_lease_expires(
    replicas: Replicas, kube_objects: Objects, kube_namespace: str, kube_apiserver: Cluster
) -> None:
    o, sfx = kube_objects, kube_namespace.rsplit("-", 1)[-1]
    name = f"fh-{sfx}"
    o.create_policy(policy(name, f"vendor.example/fh-{sfx}", {"devices": ["154c"]}, sfx))
    leases = k8s.CoordinationV1Api(kube_apiserver.admin)
    foreign_duration = 4

    def renew() -> datetime:
        now = datetime.now(UTC)
        stamp = now.isoformat(timespec="microseconds").replace("+00:00", "Z")
        body = {"metadata": {"name": replicas.lease}, "spec": {
            "holderIdentity": "someone-else", "leaseDurationSeconds": foreign_duration,
            "renewTime": stamp}}  # fmt: skip
        try:
            leases.create_namespaced_lease(replicas.ns, body)
        except k8s.ApiException as e:
            if e.status != 409:
                raise
            leases.patch_namespaced_lease(replicas.lease, replicas.ns, body)
        return now

    renew()
    op = replicas.make("op")
    op.start()
    wait_for("the operator stands by", lambda: "held by someone-else" in op.log_text(), timeout=60)
    # The foreign holder keeps renewing for longer than a lease: the operator stays out.
    until = time.monotonic() + 2 * foreign_duration
    while time.monotonic() < until:
        last = renew()
        time.sleep(1.0)
    assert replicas.holder() == "someone-else"
    assert replicas.writes(op) == []
    # It stops renewing: the operator takes over, not before the lease ran out.
    wait_for("the operator leads", lambda: replicas.holder() == op.user, timeout=60)
    wait_for("it works", lambda: observed(o, name) == 1, timeout=60)
    first_write = min(
        datetime.fromisoformat(e["stageTimestamp"].replace("Z", "+00:00"))
        for e in replicas.logged_writes(op, "its writes in the audit log")
    )
    assert (first_write - last).total_seconds() >= foreign_duration
