"""DRA policies in the operator, pure: NodeState rendering, KubeVirt gates, the DeviceClass, and
PassthroughRequest entries that become claim requests of a ResourceClaimTemplate."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hostdev.policy.dra import device_class
from hostdev.policy.kubevirt import DRA_GATES, OWNED_ANNOTATION, desired_entries, merge_kubevirt
from hostdev.policy.nodeconfig import NodeConfigError, parse_node_config
from hostdev.policy.nodestate import Policy, render_cluster, render_node
from hostdev.policy.reported import read_node_state
from hostdev.policy.request import (
    OWNERS_ANNOTATION,
    Capacity,
    Request,
    apply_to_vm,
    check_request,
    remove_from_vm,
)
from hostdev.policy.request_dra import claim_template, pod_claim_name
from tests.operator.helpers import device, policy, report
from tests.operator.test_kubevirt_unit import apply, kubevirt

GPU = "vendor.example/gpu"
NIC = "vendor.example/nic"


def gpu_policy(**kw: Any) -> Policy:
    return Policy.from_object(policy("gpus", GPU, {"classes": ["0302"]}, allocation="DRA", **kw))


def test_dra_policies_render_allocation_and_a_conflict_decides_one_way() -> None:
    dra = gpu_policy(priority=5)
    dp = Policy.from_object(policy("old-gpus", GPU, {"classes": ["03"]}))
    plan = render_node("n1", [dp, dra])
    assert plan.spec["devices"] == [
        {
            "selector": {"classes": ["0302"]},
            "driver": "vfio-pci",
            "resourceName": GPU,
            "allocation": "DRA",
        },
        {
            "selector": {"classes": ["03"]},
            "driver": "vfio-pci",
            "resourceName": GPU,
            "allocation": "DRA",
        },
    ]
    (c,) = plan.conflicts
    assert c.loser == "old-gpus" and "allocated by DRA (policy gpus)" in c.message
    # The agent accepts what is rendered; a hand-written spec mixing both is refused.
    assert parse_node_config(plan.spec).dra_resources() == {GPU}
    with pytest.raises(NodeConfigError, match="served one way on a node"):
        parse_node_config(
            {
                "devices": [
                    {"pciAddress": "0000:17:00.0", "resourceName": GPU, "allocation": "DRA"},
                    {"pciAddress": "0000:18:00.0", "resourceName": GPU},
                ]
            }
        )
    # Device-plugin specs stay as they were before DRA existed (no allocation key).
    assert "allocation" not in render_node("n1", [dp]).spec["devices"][0]


def test_kubevirt_gets_the_dra_gates_and_no_permitted_entries_for_dra_policies() -> None:
    ps = [gpu_policy(), Policy.from_object(policy("nic", NIC))]
    reported = {
        "n1": read_node_state("n1", report(device("0000:17:00.0", "10de", "2236", cls="030200")))
    }
    wanted = desired_entries(ps, render_cluster(ps, {"n1": {}}, reported))
    assert [w.resource_name for w in wanted] == [NIC]
    change = merge_kubevirt(kubevirt(), wanted, DRA_GATES)
    after = apply(kubevirt(), change.patch)
    gates = after["spec"]["configuration"]["developerConfiguration"]["featureGates"]
    assert gates == ["HostDevices", "GPUsWithDRA", "HostDevicesWithDRA"]
    owned = json.loads(after["metadata"]["annotations"][OWNED_ANNOTATION])
    assert owned["featureGates"] == ["GPUsWithDRA", "HostDevicesWithDRA"]
    assert merge_kubevirt(after, wanted, DRA_GATES).patch is None
    # The DRA policy goes: only the gates we added go with it.
    gone = apply(after, merge_kubevirt(after, wanted, ()).patch)
    assert gone["spec"]["configuration"]["developerConfiguration"]["featureGates"] == [
        "HostDevices"
    ]


def test_a_gate_the_admin_disabled_is_reported_not_added() -> None:
    kv = kubevirt(gates=["Snapshot"])
    kv["spec"]["configuration"]["developerConfiguration"]["disabledFeatureGates"] = ["GPUsWithDRA"]
    change = merge_kubevirt(kv, [], DRA_GATES)
    assert change.blocked == ("GPUsWithDRA",)
    after = apply(kv, change.patch)
    assert after["spec"]["configuration"]["developerConfiguration"]["featureGates"] == [
        "Snapshot",
        "HostDevicesWithDRA",
    ]


def test_device_class_of_a_policy() -> None:
    dc = device_class(
        "gpus",
        GPU,
        labels={"app.kubernetes.io/managed-by": "hostdev-operator"},
        owner_uid="uid-gpus",
    )
    assert dc["apiVersion"] == "resource.k8s.io/v1" and dc["kind"] == "DeviceClass"
    assert dc["metadata"]["ownerReferences"][0]["uid"] == "uid-gpus"
    assert dc["spec"]["selectors"][0]["cel"]["expression"].endswith(
        '.resourceName == "vendor.example/gpu"'
    )


def _capacity(*ps: Policy) -> Capacity:
    rep = report(
        device("0000:17:00.0", "10de", "2236", cls="030200", resource=GPU),
        device("0000:17:00.1", "10de", "1aef", cls="040300", resource=GPU),
        device("0000:18:00.0", "10de", "2236", cls="030200", resource=GPU),
        device("0000:3b:00.2", resource=NIC),
    )
    rep["devices"][0]["iommuGroup"] = rep["devices"][1]["iommuGroup"] = 40
    rep["devices"][2]["iommuGroup"] = 41
    reported = {"n1": read_node_state("n1", rep)}
    return Capacity.build(ps, render_cluster(ps, {"n1": {}}, reported), reported)


def _request(
    *entries: dict[str, Any], placement: str = "hostDevices", name: str = "vm-gpus"
) -> Request:
    return Request.from_object(
        {
            "metadata": {"name": name, "namespace": "vms", "generation": 1},
            "spec": {"vmName": "vm", "devices": list(entries), "placement": placement},
        }
    )


def vm(**tspec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "vm", "namespace": "vms", "resourceVersion": "3"},
        "spec": {"template": {"spec": {"domain": {"devices": {}}, **tspec}}},
    }


def test_dra_entries_become_claim_requests_of_one_template() -> None:
    cap = _capacity(gpu_policy())
    req = _request({"name": "gpu", "resourceName": GPU, "count": 2})
    v = check_request(req, cap)
    assert v.accepted, v.message
    assert [(d.name, d.device_class, d.request_name) for d in v.devices] == [
        ("vm-gpus-gpu-0", "gpus", "gpu-0"),
        ("vm-gpus-gpu-1", "gpus", "gpu-1"),
    ]
    change = apply_to_vm(vm(), req, v.devices, v.pin_node)
    assert change.refusal is None and change.patch is not None
    after = apply(vm(), change.patch)
    tspec = after["spec"]["template"]["spec"]
    assert tspec["domain"]["devices"]["hostDevices"] == [
        {"name": "vm-gpus-gpu-0", "claimName": "vm-gpus", "requestName": "gpu-0"},
        {"name": "vm-gpus-gpu-1", "claimName": "vm-gpus", "requestName": "gpu-1"},
    ]
    assert tspec["resourceClaims"] == [{"name": "vm-gpus", "resourceClaimTemplateName": "vm-gpus"}]
    assert tspec["evictionStrategy"] == "None"  # same eviction handling as device plugins
    owners = json.loads(after["metadata"]["annotations"][OWNERS_ANNOTATION])
    assert owners["vm-gpus"]["claim"] == "vm-gpus"
    assert apply_to_vm(after, req, v.devices, v.pin_node).patch is None  # idempotent
    tmpl = claim_template("vms", req.name, "uid-r", v.devices, {"a": "b"})
    assert tmpl["kind"] == "ResourceClaimTemplate" and tmpl["metadata"]["name"] == "vm-gpus"
    assert tmpl["spec"]["spec"]["devices"]["requests"] == [
        {
            "name": f"gpu-{i}",
            "exactly": {"deviceClassName": "gpus", "allocationMode": "ExactCount", "count": 1},
        }
        for i in range(2)
    ]
    # Someone else's resourceClaims entry survives the removal of ours.
    foreign = {"name": "other", "resourceClaimName": "shared"}
    after["spec"]["template"]["spec"]["resourceClaims"].append(foreign)
    removed = apply(after, remove_from_vm(after, req.name).patch)
    rspec = removed["spec"]["template"]["spec"]
    assert rspec["resourceClaims"] == [foreign]
    assert "hostDevices" not in rspec["domain"]["devices"]
    assert "evictionStrategy" not in rspec


def test_pinned_dra_entry_selects_the_units_first_function_and_pins_the_node() -> None:
    cap = _capacity(gpu_policy())
    req = _request({"name": "gpu", "node": "n1", "pciAddress": "0000:17:00.1"})
    v = check_request(req, cap)
    assert v.accepted and v.pin_node == "n1"
    (d,) = v.devices
    assert d.pci_address == "0000:17:00.0"  # the unit's pciBusID attribute
    tmpl = claim_template("vms", req.name, None, v.devices, {})
    sel = tmpl["spec"]["spec"]["devices"]["requests"][0]["exactly"]["selectors"]
    assert sel == [
        {
            "cel": {
                "expression": 'device.attributes["resource.kubernetes.io"].pciBusID == '
                '"0000:17:00.0"'
            }
        }
    ]
    after = apply(vm(), apply_to_vm(vm(), req, v.devices, v.pin_node).patch)
    assert after["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "n1"}


def test_gpus_never_mix_dra_and_device_plugin() -> None:
    cap = _capacity(gpu_policy(), Policy.from_object(policy("nic", NIC)))
    mixed = _request(
        {"name": "gpu", "resourceName": GPU},
        {"name": "nic", "node": "n1", "pciAddress": "0000:3b:00.2"},
        placement="gpus",
    )
    assert check_request(mixed, cap).reason == "MixedGpuAllocation"
    req = _request({"name": "gpu", "resourceName": GPU}, placement="gpus")
    v = check_request(req, cap)
    has_dp_gpu = vm(domain={"devices": {"gpus": [{"name": "g", "deviceName": "nvidia.com/x"}]}})
    change = apply_to_vm(has_dp_gpu, req, v.devices, v.pin_node)
    assert change.refusal and "both DRA and device-plugin gpus" in change.refusal


def test_a_foreign_resource_claim_of_the_same_name_is_refused() -> None:
    cap = _capacity(gpu_policy())
    req = _request({"name": "gpu", "resourceName": GPU})
    v = check_request(req, cap)
    taken = vm(resourceClaims=[{"name": "vm-gpus", "resourceClaimName": "theirs"}])
    change = apply_to_vm(taken, req, v.devices, v.pin_node)
    assert change.refusal and "resourceClaims entry named vm-gpus" in change.refusal


def test_moving_a_resource_to_dra_rewrites_the_requests_entries() -> None:
    dp = Policy.from_object(policy("gpus", GPU, {"classes": ["0302"]}))
    req = _request({"name": "gpu", "resourceName": GPU})
    v1 = check_request(req, _capacity(dp))
    first = apply(vm(), apply_to_vm(vm(), req, v1.devices, None).patch)
    assert first["spec"]["template"]["spec"]["domain"]["devices"]["hostDevices"] == [
        {"name": "vm-gpus-gpu-0", "deviceName": GPU}
    ]
    v2 = check_request(req, _capacity(gpu_policy()))
    second = apply(first, apply_to_vm(first, req, v2.devices, None).patch)
    assert second["spec"]["template"]["spec"]["domain"]["devices"]["hostDevices"] == [
        {"name": "vm-gpus-gpu-0", "claimName": "vm-gpus", "requestName": "gpu-0"}
    ]
    back = apply(second, apply_to_vm(second, req, v1.devices, None).patch)
    assert "resourceClaims" not in back["spec"]["template"]["spec"]


def test_pod_claim_names_are_dns_labels() -> None:
    assert pod_claim_name("vm-gpus") == "vm-gpus"
    long = pod_claim_name("a." * 40 + "b")
    assert len(long) <= 63 and long.startswith("hostdev-")
