"""KubeVirt CR merge: add what policies need, keep foreign entries, remove only our own."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hostdev.policy.kubevirt import (
    OWNED_ANNOTATION,
    PciHostDevice,
    desired_entries,
    merge_kubevirt,
)
from hostdev.policy.nodestate import Policy, render_cluster
from hostdev.policy.reported import read_node_state
from tests.operator.helpers import device, policy, report

FOREIGN = {"pciVendorSelector": "10DE:1EB8", "resourceName": "nvidia.com/TU104GL_Tesla_T4"}


def kubevirt(
    entries: list[dict[str, Any]] | None = None,
    gates: list[str] | None = None,
    owned: dict[str, Any] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "kubevirt", "namespace": "kubevirt", "resourceVersion": "7"}
    if owned is not None:
        meta["annotations"] = {OWNED_ANNOTATION: json.dumps(owned, sort_keys=True)}
    config: dict[str, Any] = {}
    if entries is not None:
        config["permittedHostDevices"] = {"pciHostDevices": entries}
    if gates is not None:
        config["developerConfiguration"] = {"featureGates": gates}
    return {"metadata": meta, "spec": {"configuration": config}}


def apply(obj: dict[str, Any], patch: dict[str, Any] | None) -> dict[str, Any]:
    """RFC 7386 merge patch, enough for these tests."""
    if patch is None:
        return obj
    out = dict(obj)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = apply(out[k], v)
        elif isinstance(v, dict):
            out[k] = apply({}, v)
        else:
            out[k] = v
    return out


NIC = PciHostDevice("8086:154C", "vendor.example/nic")
GPU = PciHostDevice("10DE:2236", "vendor.example/gpu")


def test_desired_entries_from_selector_pairs_and_reported_ids() -> None:
    ps = [
        Policy.from_object(policy("nic", "vendor.example/nic")),
        Policy.from_object(policy("gpu", "vendor.example/gpu", {"classes": ["03"]})),
    ]
    reported = {
        "n1": read_node_state("n1", report(device("0000:af:00.0", "10de", "2236", cls="030200")))
    }
    plans = render_cluster(ps, {"n1": {}}, reported)
    assert desired_entries(ps, plans) == (GPU, NIC)


@pytest.mark.parametrize(
    ("before", "wanted", "entries_after", "gates_after", "owned_after"),
    [
        # empty CR: add entry + gate, own both
        (kubevirt(), [NIC], [NIC.as_entry()], ["HostDevices"], [NIC.key]),
        # foreign entry and gate kept in place; gate already there -> not ours
        (
            kubevirt([FOREIGN], ["HostDevices", "Snapshot"]),
            [NIC],
            [FOREIGN, NIC.as_entry()],
            ["HostDevices", "Snapshot"],
            [NIC.key],
        ),
        # identical foreign entry: kept, not taken over
        (kubevirt([NIC.as_entry()], ["HostDevices"]), [NIC], [NIC.as_entry()], ["HostDevices"], []),
        # owned entry no longer wanted: removed, foreign kept, our gate removed
        (
            kubevirt(
                [FOREIGN, NIC.as_entry()],
                ["Snapshot", "HostDevices"],
                {"pciHostDevices": [NIC.key], "featureGate": True},
            ),
            [],
            [FOREIGN],
            ["Snapshot"],
            [],
        ),
        # foreign gate is never removed
        (kubevirt([FOREIGN], ["HostDevices"]), [], [FOREIGN], ["HostDevices"], []),
    ],
)
def test_merge(
    before: dict[str, Any],
    wanted: list[PciHostDevice],
    entries_after: list[dict[str, Any]],
    gates_after: list[str],
    owned_after: list[str],
) -> None:
    change = merge_kubevirt(before, wanted)
    after = apply(before, change.patch)
    config = after["spec"]["configuration"]
    assert config.get("permittedHostDevices", {}).get("pciHostDevices", []) == entries_after
    assert config.get("developerConfiguration", {}).get("featureGates", []) == gates_after
    ann = after["metadata"].get("annotations", {}).get(OWNED_ANNOTATION)
    assert (json.loads(ann)["pciHostDevices"] if ann else []) == owned_after
    # idempotent: merging again changes nothing
    assert merge_kubevirt(after, wanted).patch is None


def test_patch_carries_resource_version_for_optimistic_locking() -> None:
    change = merge_kubevirt(kubevirt(), [NIC])
    assert change.patch is not None
    assert change.patch["metadata"]["resourceVersion"] == "7"
    assert change.added == (NIC.key,)
