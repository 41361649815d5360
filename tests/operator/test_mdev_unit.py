"""mdev policies: NodeState spec.mdevs rendering, the agent's parsing of it, and KubeVirt's
permittedHostDevices.mediatedDevices (ownership-tracked like pciHostDevices)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hostdev.deviceplugin.nodestate.runner import to_resource_configs
from hostdev.policy.kubevirt import (
    OWNED_ANNOTATION,
    MediatedDevice,
    PciHostDevice,
    desired_entries,
    merge_kubevirt,
)
from hostdev.policy.mdev import MdevSpec
from hostdev.policy.nodeconfig import NodeConfigError, parse_node_config
from hostdev.policy.nodestate import Policy, PolicyError, render_cluster, render_node
from hostdev.policy.reported import read_node_state
from hostdev.policy.request import Capacity, Request, check_request
from tests.operator.helpers import policy
from tests.operator.test_kubevirt_unit import apply, kubevirt

VGPU = "nvidia.com/GRID_M60-2Q"


def mdev_policy(name: str, resource: str = VGPU, **kw: Any) -> dict[str, Any]:
    obj = policy(name, resource, **kw)
    del obj["spec"]["selector"]
    obj["spec"]["mdev"] = {"type": "GRID M60-2Q", "count": 4, "parents": ["0000:3b:*"]}
    return obj


def test_policy_with_mdev_renders_spec_mdevs_and_the_agent_serves_them() -> None:
    p = Policy.from_object(mdev_policy("vgpu"))
    assert p.mdev == MdevSpec("GRID M60-2Q", 4, ("0000:3b:*",))
    plan = render_node("n1", [p, Policy.from_object(policy("nic"))])
    assert plan.spec["mdevs"] == [
        {"resourceName": VGPU, "type": "GRID M60-2Q", "count": 4, "parents": ["0000:3b:*"]}
    ]
    assert [d["resourceName"] for d in plan.spec["devices"]] == ["vendor.example/nic"]
    config = parse_node_config(plan.spec)
    assert config.mdevs == ((VGPU, p.mdev),)
    (cfg,) = to_resource_configs({}, frozenset(), config.mdevs)
    assert cfg.resource_name == VGPU and cfg.mdev == p.mdev and not cfg.dra


def test_an_mdev_policy_with_allocation_dra_is_served_through_dra() -> None:
    obj = mdev_policy("vgpu")
    obj["spec"]["allocation"] = "DRA"
    p = Policy.from_object(obj)
    plan = render_node("n1", [p])
    assert plan.spec["mdevs"] == [
        {
            "resourceName": VGPU,
            "type": "GRID M60-2Q",
            "count": 4,
            "parents": ["0000:3b:*"],
            "allocation": "DRA",
        }
    ]
    config = parse_node_config(plan.spec)
    assert config.mdevs == ((VGPU, p.mdev),) and config.dra_resources() == {VGPU}
    (cfg,) = to_resource_configs({}, config.dra_resources(), config.mdevs)
    assert cfg.mdev == p.mdev and cfg.dra


def test_pci_only_specs_stay_as_they_were() -> None:
    plan = render_node("n1", [Policy.from_object(policy("nic"))])
    assert "mdevs" not in plan.spec


def test_precedence_decides_pci_or_mdev_for_one_resource() -> None:
    pci = Policy.from_object(policy("pci", VGPU, priority=5))
    vgpu = Policy.from_object(mdev_policy("vgpu"))
    plan = render_node("n1", [vgpu, pci])
    assert "mdevs" not in plan.spec
    (c,) = plan.conflicts
    assert (c.loser, c.winner) == ("vgpu", "pci")
    assert f"resource {VGPU} is PCI functions of policy pci on this node" in c.message


@pytest.mark.parametrize(
    ("change", "msg"),
    [
        ({"selector": {"vendors": ["10de"]}}, "set exactly one of selector"),
        ({"sriov": {"numVfs": 2}}, "sriov does not go with mdev"),
        ({"mdev": {"type": "x"}}, "mdev.count"),
    ],
)
def test_bad_mdev_policies_are_refused(change: dict[str, Any], msg: str) -> None:
    obj = mdev_policy("vgpu")
    obj["spec"].update(change)
    with pytest.raises(PolicyError, match=msg):
        Policy.from_object(obj)


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ({"mdevs": [{"type": "t", "count": 1}]}, r"mdevs\[0\].resourceName: required"),
        (
            {"mdevs": [{"resourceName": "a.io/x", "type": "t", "count": 1}] * 2},
            "listed twice",
        ),
        (
            {
                "devices": [{"pciAddress": "0000:3b:00.0", "resourceName": "a.io/x"}],
                "mdevs": [{"resourceName": "a.io/x", "type": "t", "count": 1}],
            },
            "either PCI functions or mediated-device instances",
        ),
        (
            {
                "devices": [{"pciAddress": "0000:3b:00.0", "resourceName": "a.io/x.y"}],
                "mdevs": [{"resourceName": "a.io/x_y", "type": "t", "count": 1}],
            },
            r"mdevs\[0\].resourceName: resource names a.io/x.y and a.io/x_y both become",
        ),
        ({"mdevs": [{"resourceName": "a.io/x", "type": "t", "count": -1}]}, "mdev.count"),
    ],
)
def test_node_spec_mdevs_errors_name_the_entry(spec: dict[str, Any], msg: str) -> None:
    with pytest.raises(NodeConfigError, match=msg):
        parse_node_config(spec)


FOREIGN_MDEV = {"mdevNameSelector": "GRID T4-1Q", "resourceName": "nvidia.com/GRID_T4-1Q"}


def test_kubevirt_mediated_devices_are_added_owned_and_removed() -> None:
    wanted = desired_entries([Policy.from_object(mdev_policy("vgpu"))], {})
    assert wanted == (MediatedDevice("GRID M60-2Q", VGPU),)
    cr = kubevirt()
    cr["spec"]["configuration"]["permittedHostDevices"] = {"mediatedDevices": [FOREIGN_MDEV]}
    change = merge_kubevirt(cr, wanted)
    assert change.added == (f"GRID M60-2Q={VGPU}",)
    cr = apply(cr, change.patch)
    assert cr["spec"]["configuration"]["permittedHostDevices"]["mediatedDevices"] == [
        FOREIGN_MDEV,
        {"mdevNameSelector": "GRID M60-2Q", "resourceName": VGPU, "externalResourceProvider": True},
    ]
    assert "HostDevices" in cr["spec"]["configuration"]["developerConfiguration"]["featureGates"]
    owned = json.loads(cr["metadata"]["annotations"][OWNED_ANNOTATION])
    assert owned["mediatedDevices"] == [f"GRID M60-2Q={VGPU}"]
    assert merge_kubevirt(cr, wanted).patch is None  # converged
    # the policy goes: only our entry goes, the foreign one stays
    gone = merge_kubevirt(cr, ())
    assert gone.removed == (f"GRID M60-2Q={VGPU}",)
    cr = apply(cr, gone.patch)
    assert cr["spec"]["configuration"]["permittedHostDevices"]["mediatedDevices"] == [FOREIGN_MDEV]


def test_pci_and_mdev_entries_side_by_side() -> None:
    nic = PciHostDevice("8086:154C", "vendor.example/nic")
    vgpu = MediatedDevice("GRID M60-2Q", VGPU)
    cr = apply(kubevirt(), merge_kubevirt(kubevirt(), (nic, vgpu)).patch)
    permitted = cr["spec"]["configuration"]["permittedHostDevices"]
    assert [e["resourceName"] for e in permitted["pciHostDevices"]] == ["vendor.example/nic"]
    assert [e["resourceName"] for e in permitted["mediatedDevices"]] == [VGPU]
    # dropping the mdev policy leaves the PCI list untouched (not even re-sent)
    change = merge_kubevirt(cr, (nic,))
    assert change.patch is not None
    assert change.patch["spec"]["configuration"]["permittedHostDevices"] == {"mediatedDevices": []}


def test_passthrough_request_counts_healthy_mdev_instances_and_places_them_as_gpus() -> None:
    ps = [Policy.from_object(mdev_policy("vgpu"))]
    nodes: dict[str, dict[str, str]] = {"n1": {}}

    def status(*health: str) -> dict[str, Any]:
        instances = [
            {"uuid": f"{i:08x}-0000-4000-8000-000000000000", "parent": "0000:3b:00.0",
             "type": "nvidia-35", "resourceName": VGPU, "health": h}
            for i, h in enumerate(health)
        ]  # fmt: skip
        return {"syncStatus": "Succeeded", "devices": [], "mdev": {"instances": instances}}

    def verdict(*health: str, count: int = 2) -> Any:
        reported = {"n1": read_node_state("n1", status(*health))}
        cap = Capacity.build(ps, render_cluster(ps, nodes, reported), reported)
        req = {
            "metadata": {"name": "r", "namespace": "ns", "generation": 1},
            "spec": {
                "vmName": "vm",
                "placement": "gpus",
                "devices": [{"name": "vgpu", "resourceName": VGPU, "count": count}],
            },
        }
        return check_request(Request.from_object(req), cap)

    ok = verdict("Healthy", "Healthy")
    assert ok.accepted and [d.device_name for d in ok.devices] == [VGPU, VGPU]
    short = verdict("Healthy", "Unhealthy")
    assert not short.accepted
    assert f"{VGPU}: needs 2, at most 1 on one node (n1)" in short.message
