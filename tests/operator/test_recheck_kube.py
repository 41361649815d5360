"""Requests the capacity check turned away apply as soon as an agent reports the capacity: the
re-check follows NodeState changes (no back-off clock), and costs no write while the answer
stays the same."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.operator import GROUP, KV_GROUP, Objects, OperatorProcess, wait_for
from tests.operator.test_operator_kube import (
    inventory,
    phase,
    policy,
    request_body,
    suffix,
    vf,
    vm_body,
)

pytestmark = pytest.mark.kube

# Long enough that a retry clock (the old back-off waited 60 s for Refused, 10 s doubling for
# Pending) could not be what applies the requests; short enough to fail fast when broken.
APPLIED_WITHIN = 8.0


def checks(op: OperatorProcess) -> float:
    """How often the operator found a request Pending (each capacity check counts)."""
    return sum(
        s.value
        for fam in text_string_to_metric_families(op.metrics())
        for s in fam.samples
        if s.name == "hostdev_operator_reconciles_total"
        and s.labels == {"kind": "request", "result": "pending"}
    )


def test_refused_and_pending_requests_apply_when_capacity_appears(
    hostdev_operator: OperatorProcess, kube_objects: Objects, kube_namespace: str
) -> None:
    o, ns, sfx = kube_objects, kube_namespace, suffix(kube_namespace)
    node, late, resource = f"c-{sfx}", f"d-{sfx}", f"vendor.example/cap-{sfx}"
    o.create_node(node, {"hostdev.io/pool": sfx})
    o.create_policy(policy(f"cap-{sfx}", resource, {"devices": ["154c"]}, sfx))
    o.report(node, inventory(vf("0000:3b:02.0", 0, resource)))
    o.create(KV_GROUP, "virtualmachines", ns, vm_body("vm1"))
    o.create(KV_GROUP, "virtualmachines", ns, vm_body("vm2"))
    # Two VFs on one node: the only node has one -> Refused (final, as far as anyone knows).
    o.create(GROUP, "passthroughrequests", ns, request_body(
        "two", "vm1", {"name": "nic", "resourceName": resource, "count": 2}))  # fmt: skip
    # Pinned to a node whose agent has not reported yet -> Pending.
    o.create(GROUP, "passthroughrequests", ns, request_body(
        "pinned", "vm2", {"name": "g", "node": late, "pciAddress": "0000:5e:00.0"}))  # fmt: skip
    req = wait_for("two Refused", lambda: phase(o, ns, "two") == "Refused" and o.request(ns, "two"))
    assert "needs 2, at most 1" in req["status"]["message"]
    # The pinned node joins the pool: both wait for its agent now (re-checked at once).
    o.create_node(late, {"hostdev.io/pool": sfx})
    wait_for("both Pending", lambda: {phase(o, ns, "two"), phase(o, ns, "pinned")} == {"Pending"})

    # A report that adds no capacity (an allocation changes): both are checked again (the
    # operator counts each check), and nothing is written.
    versions = {n: o.request(ns, n)["metadata"]["resourceVersion"] for n in ("two", "pinned")}  # type: ignore[index]
    before = checks(hostdev_operator)
    o.report(node, inventory(vf("0000:3b:02.0", 0, resource), allocations=[{
        "pciAddress": "0000:3b:02.0", "resourceName": resource, "namespace": ns,
        "pod": "virt-launcher-other-abcde", "vmi": "other"}]))  # fmt: skip
    wait_for("both re-checked", lambda: checks(hostdev_operator) >= before + 2)
    for n, rv in versions.items():
        assert o.request(ns, n)["metadata"]["resourceVersion"] == rv, n  # type: ignore[index]

    # Capacity appears: a second VF on the first node, the second node reports its GPU.
    o.report(node, inventory(*(vf(f"0000:3b:02.{i}", i, resource) for i in range(2))))
    wait_for("two Applied", lambda: phase(o, ns, "two") == "Applied", timeout=APPLIED_WITHIN)
    gpu = {**vf("0000:5e:00.0", 0, resource), "physfn": None, "vfIndex": None}
    o.report(late, inventory({k: v for k, v in gpu.items() if v is not None}))
    wait_for("pinned Applied", lambda: phase(o, ns, "pinned") == "Applied", timeout=APPLIED_WITHIN)
    for n in ("two", "pinned"):
        o.delete(GROUP, "passthroughrequests", ns, n)
        wait_for(f"{n} released", lambda n=n: o.request(ns, n) is None)
