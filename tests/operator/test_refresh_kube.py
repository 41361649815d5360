"""An applied request's Running/Allocated follow the VMI and the agents' reports: the one
request refresher (hostdev.operator.refresher) is woken by those changes instead of polling
every request every 15 s, and posts an Event per phase change."""

from __future__ import annotations

import pytest

from hostdev.operator.refresher import STATUS_INTERVAL_S, STATUS_SETTLE_S
from tests.fixtures.operator import GROUP, KV_GROUP, Objects, OperatorProcess, wait_for
from tests.operator.test_operator_kube import (
    inventory,
    phase,
    request_body,
    setup_pool,
    suffix,
    vf,
    vm_body,
)

pytestmark = pytest.mark.kube

# A change lands once the request has settled (STATUS_SETTLE_S after its own last write), well
# before a poll every STATUS_INTERVAL_S would have found it.
FOLLOWS_WITHIN = STATUS_INTERVAL_S - 3.0
assert FOLLOWS_WITHIN > STATUS_SETTLE_S + 2.0


def test_running_and_allocated_follow_the_vmi_and_the_report(
    hostdev_operator: OperatorProcess, kube_objects: Objects, kube_namespace: str
) -> None:
    o, ns = kube_objects, kube_namespace
    node, resource = setup_pool(o, suffix(ns))
    o.create(KV_GROUP, "virtualmachines", ns, vm_body("vm1"))
    o.create(GROUP, "passthroughrequests", ns, request_body(
        "nics", "vm1", {"name": "nic", "resourceName": resource}))  # fmt: skip
    wait_for("Applied", lambda: phase(o, ns, "nics") == "Applied")

    # KubeVirt starts the VMI with the entry.
    spec = vm_body("vm1")["spec"]["template"]["spec"]
    spec["domain"]["devices"]["hostDevices"] = [{"name": "nics-nic-0", "deviceName": resource}]
    o.create(KV_GROUP, "virtualmachineinstances", ns, {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "vm1"}, "spec": spec, "status": {"phase": "Running"},
    })  # fmt: skip
    wait_for("Running", lambda: phase(o, ns, "nics") == "Running", timeout=FOLLOWS_WITHIN)

    # The agent reports the launcher pod holding the VF; then the VM stops and releases it.
    held = [{"pciAddress": "0000:3b:02.0", "resourceName": resource, "namespace": ns,
             "pod": "virt-launcher-vm1-x7k2p", "vmi": "vm1"}]  # fmt: skip
    vfs = [vf(f"0000:3b:02.{i}", i, resource) for i in range(2)]
    o.report(node, inventory(*vfs, allocations=held))
    wait_for("Allocated", lambda: phase(o, ns, "nics") == "Allocated", timeout=FOLLOWS_WITHIN)
    o.delete(KV_GROUP, "virtualmachineinstances", ns, "vm1")
    o.report(node, inventory(*vfs))
    wait_for("Applied again", lambda: phase(o, ns, "nics") == "Applied", timeout=FOLLOWS_WITHIN)

    def reasons() -> list[str]:
        found = o.core.list_namespaced_event(ns, field_selector="involvedObject.name=nics")
        return [str(e.reason) for e in found.items]

    # Applied (the apply handler), Running, Allocated, Applied: Events go out in the background.
    got = wait_for(
        "an Event per phase change", lambda: (r := reasons()).count("Applied") >= 2 and r
    )
    assert got.count("Running") == 1 and got.count("Allocated") == 1, got
    o.delete(GROUP, "passthroughrequests", ns, "nics")
    wait_for("request gone", lambda: o.request(ns, "nics") is None)
