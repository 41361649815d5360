"""PassthroughRequest: capacity verdicts, VM spec changes (add/remove exactly ours), status."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from hostdev.policy.nodestate import Policy, render_cluster
from hostdev.policy.reported import read_node_state
from hostdev.policy.request import (
    EVICTION_ANNOTATION,
    OWNERS_ANNOTATION,
    Capacity,
    Request,
    RequestError,
    VmDevice,
    apply_to_vm,
    check_request,
    needs_restart,
    remove_from_vm,
    running_status,
)
from tests.operator.helpers import device, policy, report
from tests.operator.test_kubevirt_unit import apply

NIC = "vendor.example/nic"
GPU = "vendor.example/gpu"


def request(name: str = "r", *entries: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "generation": 1},
        "spec": {
            "vmName": "vm",
            "devices": list(entries) or [{"name": "nic", "resourceName": NIC, "count": 2}],
            **spec,
        },
    }


def capacity(reports: dict[str, Any], nodes: dict[str, dict[str, str]] | None = None) -> Capacity:
    ps = [
        Policy.from_object(policy("nic", NIC)),
        Policy.from_object(
            policy(
                "gpu",
                GPU,
                {"classes": ["03"]},
                node_selector={"matchLabels": {"gpu": "yes"}},
            )
        ),
    ]
    nodes = nodes or {"n1": {"gpu": "yes"}, "n2": {}}
    reported = {n: read_node_state(n, s) for n, s in reports.items()}
    return Capacity.build(ps, render_cluster(ps, nodes, reported), reported)


def nics(n: int, node_prefix: str = "3b") -> list[dict[str, Any]]:
    return [device(f"0000:{node_prefix}:02.{i}", resource=NIC) for i in range(n)]


GPU_DEV = device("0000:af:00.0", "10de", "2236", cls="030200", resource=GPU)

CASES = [
    # (request entries, reports, accepted, final, reason, message part)
    ([], {"n1": report(*nics(2)), "n2": report()}, True, False, "CapacityAvailable", "n1"),
    (
        [{"name": "x", "resourceName": "vendor.example/nope"}],
        {},
        False,
        True,
        "UnknownResource",
        "resource vendor.example/nope is not provided by any PassthroughPolicy "
        "(known resources: vendor.example/gpu, vendor.example/nic)",
    ),
    (
        [],
        {"n1": report(*nics(1)), "n2": report(*nics(1, "5e"))},
        False,
        True,
        "NoNodeCanSatisfy",
        "vendor.example/nic: needs 2, at most 1 on one node (n1)",
    ),
    ([], {"n1": report(*nics(1))}, False, False, "WaitingForInventory", "n2"),
    (
        [{"name": "nic", "resourceName": NIC, "count": 2}, {"name": "gpu", "resourceName": GPU}],
        {"n1": report(*nics(1), GPU_DEV), "n2": report(*nics(2, "5e"))},
        False,
        True,
        "NoNodeCanSatisfy",
        "vendor.example/nic: needs 2, at most 1 on one node (n1)",
    ),
    (
        [{"name": "g", "node": "n1", "pciAddress": "0000:af:00.0"}],
        {"n1": report(GPU_DEV)},
        True,
        False,
        "CapacityAvailable",
        "1 x vendor.example/gpu fit on n1",
    ),
    (
        [{"name": "g", "node": "n1", "pciAddress": "0000:af:00.7"}],
        {"n1": report(GPU_DEV)},
        False,
        True,
        "UnknownDevice",
        "device 0000:af:00.7 on node n1 does not exist there",
    ),
    (
        [{"name": "g", "node": "n9", "pciAddress": "0000:af:00.0"}],
        {},
        False,
        True,
        "NodeNotSelected",
        "node n9 is not selected by any PassthroughPolicy",
    ),
    (
        [
            {"name": "a", "node": "n1", "pciAddress": "0000:af:00.0"},
            {"name": "b", "node": "n2", "pciAddress": "0000:3b:02.0"},
        ],
        {},
        False,
        True,
        "PinnedToSeveralNodes",
        "n1, n2",
    ),
]


@pytest.mark.parametrize(("entries", "reports", "accepted", "final", "reason", "part"), CASES)
def test_capacity(
    entries: list[dict[str, Any]],
    reports: dict[str, Any],
    accepted: bool,
    final: bool,
    reason: str,
    part: str,
) -> None:
    v = check_request(Request.from_object(request("r", *entries)), capacity(reports))
    assert (v.accepted, v.final, v.reason) == (accepted, final, reason)
    assert part in v.message


def test_accepted_devices_are_named_after_request_and_entry() -> None:
    v = check_request(Request.from_object(request()), capacity({"n1": report(*nics(2))}))
    assert v.devices == (VmDevice("r-nic-0", NIC), VmDevice("r-nic-1", NIC))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"vmName": ""}, "vmName is required"),
        ({"devices": []}, "spec.devices is empty"),
        (
            {"devices": [{"name": "a", "resourceName": NIC, "node": "n", "pciAddress": "x"}]},
            "give resourceName",
        ),
        (
            {"devices": [{"name": "a", "resourceName": NIC}, {"name": "a", "resourceName": NIC}]},
            "unique",
        ),
        ({"placement": "usb"}, "placement"),
    ],
)
def test_invalid_requests(spec: dict[str, Any], message: str) -> None:
    obj = request()
    obj["spec"].update(spec)
    with pytest.raises(RequestError, match=message):
        Request.from_object(obj)


def vm(
    host_devices: list[dict[str, Any]] | None = None, eviction: str | None = None
) -> dict[str, Any]:
    tspec: dict[str, Any] = {"domain": {"devices": {}}}
    if host_devices is not None:
        tspec["domain"]["devices"]["hostDevices"] = host_devices
    if eviction is not None:
        tspec["evictionStrategy"] = eviction
    return {
        "metadata": {"name": "vm", "namespace": "ns", "resourceVersion": "1"},
        "spec": {"runStrategy": "Always", "template": {"spec": tspec}},
    }


def strip(obj: dict[str, Any]) -> dict[str, Any]:
    """Drop what the API server would: empty annotations, the resourceVersion we sent."""
    out = copy.deepcopy(obj)
    out["metadata"].pop("resourceVersion", None)
    if not out["metadata"].get("annotations"):
        out["metadata"].pop("annotations", None)
    out["metadata"]["resourceVersion"] = "1"
    return out


def devs(n: int, req: str = "r") -> list[VmDevice]:
    return [VmDevice(f"{req}-nic-{i}", NIC) for i in range(n)]


MINE = {"name": "mine", "deviceName": "other.example/x"}


@pytest.mark.parametrize(
    ("start", "eviction_after", "evict_ok"),
    [
        (vm(), "None", True),
        (vm([MINE]), "None", True),
        (vm([MINE], eviction="LiveMigrateIfPossible"), "LiveMigrateIfPossible", True),
        (vm(eviction="LiveMigrate"), "LiveMigrate", False),
    ],
)
def test_apply_then_remove_restores_exactly(
    start: dict[str, Any], eviction_after: str, evict_ok: bool
) -> None:
    req = Request.from_object(request())
    change = apply_to_vm(start, req, devs(2), None)
    assert change.refusal is None
    after = apply(start, change.patch)
    tspec = after["spec"]["template"]["spec"]
    names = [e["name"] for e in tspec["domain"]["devices"]["hostDevices"]]
    assert names[-2:] == ["r-nic-0", "r-nic-1"]
    assert tspec["domain"]["devices"]["hostDevices"][-1]["deviceName"] == NIC
    assert tspec.get("evictionStrategy") == eviction_after
    assert change.eviction is not None
    assert (change.eviction.status == "True") is evict_ok
    # idempotent
    assert apply_to_vm(after, req, devs(2), None).patch is None
    # a second request on the same VM
    req2 = Request.from_object(request("s"))
    after2 = apply(after, apply_to_vm(after, req2, devs(1, "s"), None).patch)
    owners = json.loads(after2["metadata"]["annotations"][OWNERS_ANNOTATION])
    assert sorted(owners) == ["r", "s"]
    # remove r: s stays, eviction stays
    after3 = apply(after2, remove_from_vm(after2, "r").patch)
    assert [
        e["name"]
        for e in after3["spec"]["template"]["spec"]["domain"]["devices"]["hostDevices"]
        if e["name"] != "mine"
    ] == ["s-nic-0"]
    assert remove_from_vm(after3, "r").patch is None
    # remove s: exactly the start again
    after4 = apply(after3, remove_from_vm(after3, "s").patch)
    assert strip(after4) == strip(start)


def test_shrinking_and_moving_placement_keeps_foreign_entries() -> None:
    start = vm([MINE])
    req = Request.from_object(request())
    a = apply(start, apply_to_vm(start, req, devs(3), None).patch)
    b = apply(a, apply_to_vm(a, req, devs(1), None).patch)
    assert [
        e["name"] for e in b["spec"]["template"]["spec"]["domain"]["devices"]["hostDevices"]
    ] == [
        "mine",
        "r-nic-0",
    ]
    gpu_req = Request.from_object(request(placement="gpus"))
    c = apply(b, apply_to_vm(b, gpu_req, devs(1), None).patch)
    d = c["spec"]["template"]["spec"]["domain"]["devices"]
    assert d["hostDevices"] == [MINE]
    assert d["gpus"] == [{"name": "r-nic-0", "deviceName": NIC}]


def test_foreign_entry_with_our_name_is_refused_not_overwritten() -> None:
    start = vm([{"name": "r-nic-0", "deviceName": "x.example/y"}])
    change = apply_to_vm(start, Request.from_object(request()), devs(1), None)
    assert change.patch is None
    assert change.refusal is not None
    assert "already has a hostDevices entry named r-nic-0 added by someone else" in change.refusal


def test_pinned_device_pins_vm_to_node_and_unpins_on_removal() -> None:
    start = vm()
    req = Request.from_object(
        request("p", {"name": "g", "node": "n1", "pciAddress": "0000:af:00.0"})
    )
    after = apply(start, apply_to_vm(start, req, [VmDevice("p-g-0", GPU)], "n1").patch)
    assert after["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "n1"}
    other = copy.deepcopy(start)
    other["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "n2"}
    refused = apply_to_vm(other, req, [VmDevice("p-g-0", GPU)], "n1")
    assert refused.refusal is not None
    assert "pinned to node n2" in refused.refusal
    back = apply(after, remove_from_vm(after, "p").patch)
    assert strip(back) == strip(start)
    assert EVICTION_ANNOTATION not in back["metadata"].get("annotations", {})


def test_status_from_vmi_and_allocations() -> None:
    req = Request.from_object(request(applyPolicy="RestartNow"))
    names = ["r-nic-0", "r-nic-1"]
    vmi = {
        "metadata": {"uid": "u1"},
        "spec": {"domain": {"devices": {"hostDevices": [{"name": n} for n in names]}}},
        "status": {"phase": "Running"},
    }
    node = read_node_state(
        "n1",
        report(
            allocations=[
                {
                    "pciAddress": "0000:3b:02.0",
                    "resourceName": NIC,
                    "namespace": "ns",
                    "pod": "virt-launcher-vm-abcde",
                },
                {
                    "pciAddress": "0000:3b:02.1",
                    "resourceName": NIC,
                    "namespace": "ns",
                    "pod": "virt-launcher-vm-abcde",
                    "vmi": "vm",
                },
                {
                    "pciAddress": "0000:3b:02.2",
                    "resourceName": NIC,
                    "namespace": "ns",
                    "pod": "virt-launcher-vm2-xyz",
                },
            ]
        ),
    )
    st = running_status(req, names, vmi, node.allocations, None)
    assert st.phase == "Allocated"
    assert st.fields()["pciAddresses"] == "0000:3b:02.0,0000:3b:02.1"
    assert st.node == "n1"
    st2 = running_status(req, names, None, (), None)
    assert st2.phase == "Applied"
    assert {c.type: c.status for c in st2.conditions} == {
        "Accepted": "True",
        "Applied": "True",
        "Running": "False",
        "Allocated": "False",
    }
    old_vmi = {"metadata": {"uid": "u0"}, "spec": {"domain": {"devices": {}}}}
    assert needs_restart(req, old_vmi, names, None)
    assert not needs_restart(req, old_vmi, names, "u0")
    assert not needs_restart(req, vmi, names, None)


def test_a_resource_in_both_gpus_and_host_devices_is_refused() -> None:
    # KubeVirt reads PCI_RESOURCE_<resource> for each list on its own: both would get the GPU
    start = vm()
    start["spec"]["template"]["spec"]["domain"]["devices"]["gpus"] = [
        {"name": "own-gpu", "deviceName": NIC}
    ]
    change = apply_to_vm(start, Request.from_object(request()), devs(1), None)
    assert change.patch is None
    assert change.refusal == (
        f"VM vm would take resource {NIC} in both gpus and hostDevices (hostDevices: r-nic-0; "
        "gpus: own-gpu): KubeVirt hands each list its own devices from it, so the same device "
        "would be attached twice; use one placement for every entry of it"
    )
    # two requests for one VM, one per list: the second is refused, the first stays
    a = apply(vm(), apply_to_vm(vm(), Request.from_object(request()), devs(1), None).patch)
    s = Request.from_object(request("s", placement="gpus"))
    second = apply_to_vm(a, s, devs(1, "s"), None)
    assert second.patch is None and second.refusal is not None
    assert "hostDevices: r-nic-0; gpus: s-nic-0" in second.refusal
    # another resource in gpus is fine
    ok = apply_to_vm(a, s, [VmDevice("s-gpu-0", GPU)], None)
    assert ok.refusal is None and ok.patch is not None


def test_a_claim_request_in_both_lists_is_refused() -> None:
    entry = {"claimName": "c", "requestName": "gpu"}
    start = vm([{"name": "h", **entry}])
    start["spec"]["template"]["spec"]["domain"]["devices"]["gpus"] = [{"name": "g", **entry}]
    change = apply_to_vm(start, Request.from_object(request()), devs(1), None)
    assert change.refusal is not None
    assert "would take claim c request gpu in both gpus and hostDevices" in change.refusal
