"""Pure status rendering for PassthroughNodeState.status: tables over fake-host inventories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hostdev.host import PciAddress, Sysfs
from hostdev.host.model import Inventory
from hostdev.policy.launcher import vmi_of_pod
from hostdev.policy.nodestatus import (
    FAILED,
    IN_PROGRESS,
    SUCCEEDED,
    AllocationRow,
    PodDevices,
    SyncOutcome,
    allocations_from,
    comparable,
    refused_devices,
    render_status,
    served_resources,
    status_changed,
)
from hostdev.policy.plan import Refusal
from hostdev.policy.reported import read_node_state
from hostdev.policy.runs import expand
from hostdev.testing import scenarios

A = PciAddress.parse
NOW = "2026-11-24T18:00:00Z"
NIC = "example.com/nic-vf"
GPU = "example.com/gpu"


def inv_of(build: Any, tmp_path: Path) -> Inventory:
    build(tmp_path)
    return Sysfs(str(tmp_path)).discover()


def dev(status: dict[str, Any], addr: str) -> Any:
    return next(d for d in expand(status["devices"]) if d["pciAddress"] == addr)


def cond(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


# ---- render_status ----------------------------------------------------------------------------
def test_succeeded_sriov_node(tmp_path: Path) -> None:
    inv = inv_of(scenarios.sriov_nic_dual_socket, tmp_path)
    vfs = {A("0000:3b:02.0"): NIC, A("0000:3b:02.1"): NIC}
    out = SyncOutcome(SUCCEEDED, 3, resources=vfs, finished_at=NOW)
    st = render_status(inv, out, (), now=NOW)

    assert st["syncStatus"] == "Succeeded" and st["observedGeneration"] == 3
    assert st["lastError"] == "" and st["lastSyncTime"] == NOW
    assert st["iommu"] == {
        "enabled": True,
        "vendor": "intel",
        "interruptRemapping": True,
        "vfioReady": True,
        "iommufd": False,
        "groupCount": inv.node.group_count,
    }
    # Bridges are not inventory; everything else is, sorted by address.
    addrs = [d["pciAddress"] for d in expand(st["devices"])]
    assert "0000:00:1c.0" not in addrs and addrs == sorted(addrs)
    assert st["deviceCount"] == len(addrs) == 1 + 1 + 3 * (1 + 4)
    pf = dev(st, "0000:3b:00.0")
    assert pf["totalVfs"] == 64 and pf["numVfs"] == 4 and pf["netdevs"] == ["ens1f0"]
    assert pf["driver"] == "ice" and "resourceName" not in pf and "health" not in pf
    vf = dev(st, "0000:3b:02.1")
    assert vf == {
        "pciAddress": "0000:3b:02.1",
        "vendor": "8086",
        "device": "1889",
        "class": "020000",
        "driver": "vfio-pci",
        "iommuGroup": inv.devices[A("0000:3b:02.1")].iommu_group,
        "numaNode": 0,
        "physfn": "0000:3b:00.0",
        "vfIndex": 1,
        "resourceName": NIC,
        "health": "Healthy",
    }
    assert "resourceName" not in dev(st, "0000:3b:02.2")
    assert st["allocations"] == [] and st["allocationCount"] == 0
    assert cond(st, "Synced")["status"] == "True"
    assert cond(st, "IommuReady")["status"] == "True"
    assert all(c["observedGeneration"] == 3 for c in st["conditions"])


@pytest.mark.parametrize(
    ("build", "addr", "health", "message"),
    [
        (scenarios.gpu_with_audio, "0000:17:00.0", "Healthy", None),
        (
            scenarios.group_member_on_host_driver,
            "0000:17:00.0",
            "Unhealthy",
            "IOMMU group",
        ),
        (scenarios.group_member_on_host_driver, "0000:17:00.1", "Unhealthy", "snd_hda_intel"),
        (scenarios.iommu_off, "0000:17:00.0", "Unhealthy", "no IOMMU group"),
    ],
    ids=["viable-group", "group-not-viable", "companion-on-host-driver", "iommu-off"],
)
def test_device_health(
    tmp_path: Path, build: Any, addr: str, health: str, message: str | None
) -> None:
    inv = inv_of(build, tmp_path)
    out = SyncOutcome(SUCCEEDED, 1, resources={A(addr): GPU}, finished_at=NOW)
    d = dev(render_status(inv, out, None, now=NOW), addr)
    assert d["health"] == health
    if message is None:
        assert "message" not in d
    else:
        assert message in d["message"]


def test_units_of_several_functions_are_flagged(tmp_path: Path) -> None:
    inv = inv_of(scenarios.two_gpus_with_audio, tmp_path)
    gpus = {A(a): GPU for a in ("0000:17:00.0", "0000:17:00.1", "0000:65:00.0", "0000:65:00.1")}
    st = render_status(inv, SyncOutcome(SUCCEEDED, 1, resources=gpus), None, now=NOW)
    c = cond(st, "MultiFunctionUnits")
    group = inv.devices[A("0000:17:00.0")].iommu_group
    assert (c["status"], c["reason"]) == ("True", "SeveralFunctionsPerUnit")
    assert c["message"] == (
        f"{GPU}: 0000:17:00.0 and 0000:17:00.1 share IOMMU group {group} and form one unit, of "
        "which a VM entry attaches 0000:17:00.0 only (the rest go along with the group, "
        'unattached); a class selector (e.g. classes: ["0302"] for 3D controllers) serves one '
        "function per unit (1 more such unit(s))"
    )
    # The companion says so; the primary is served as usual.
    assert dev(st, "0000:65:00.1")["message"] == (
        f"goes along with 0000:65:00.0 (same IOMMU group, one unit of {GPU}) but a VM attaches "
        "0000:65:00.0 only: see condition MultiFunctionUnits"
    )
    assert "message" not in dev(st, "0000:65:00.0")
    # Served by class (the GPUs only): one function per unit, nothing to say.
    only = {A("0000:17:00.0"): GPU, A("0000:65:00.0"): GPU}
    st = render_status(inv, SyncOutcome(SUCCEEDED, 1, resources=only), None, now=NOW)
    c = cond(st, "MultiFunctionUnits")
    assert (c["status"], c["reason"]) == ("False", "OneFunctionPerUnit")
    assert "message" not in dev(st, "0000:17:00.1")


def test_iommu_off_node(tmp_path: Path) -> None:
    inv = inv_of(scenarios.iommu_off, tmp_path)
    st = render_status(inv, SyncOutcome(SUCCEEDED, 1, finished_at=NOW), None, now=NOW)
    assert st["iommu"]["enabled"] is False and st["iommu"]["vfioReady"] is False
    assert "vendor" not in st["iommu"]
    c = cond(st, "IommuReady")
    assert c["status"] == "False" and "intel_iommu=on" in c["message"]


@pytest.mark.parametrize(
    ("outcome", "sync", "synced", "error", "has_time"),
    [
        (SyncOutcome(SUCCEEDED, 2, finished_at=NOW), "Succeeded", "True", "", True),
        (SyncOutcome(IN_PROGRESS, 2), "InProgress", "Unknown", "", False),
        (SyncOutcome(FAILED, 2, "boom", finished_at=NOW), "Failed", "False", "boom", True),
        # An error text on a non-failed outcome is never shown as lastError.
        (SyncOutcome(IN_PROGRESS, 2, "stale"), "InProgress", "Unknown", "", False),
    ],
    ids=["succeeded", "in-progress", "failed", "in-progress-ignores-error"],
)
def test_sync_states(
    tmp_path: Path, outcome: SyncOutcome, sync: str, synced: str, error: str, has_time: bool
) -> None:
    inv = inv_of(scenarios.gpu_with_audio, tmp_path)
    st = render_status(inv, outcome, None, now=NOW)
    assert st["syncStatus"] == sync and st["lastError"] == error
    assert cond(st, "Synced")["status"] == synced
    assert ("lastSyncTime" in st) is has_time
    assert "allocations" not in st and "allocationCount" not in st


def test_refusals_land_on_devices(tmp_path: Path) -> None:
    inv = inv_of(scenarios.group_member_on_host_driver, tmp_path)
    g = inv.devices[A("0000:17:00.0")].iommu_group
    r = Refusal(
        f"group {g} (0000:17:00.0, 0000:17:00.1)",
        "bind to vfio-pci",
        ("0000:17:00.1 is in use: /dev/snd/pcmC0D0p held open by pid 7 (pulseaudio)",),
        overridable=True,
    )
    out = SyncOutcome(FAILED, 4, r.describe(), refusals=(r,), finished_at=NOW)
    st = render_status(inv, out, None, now=NOW)
    for a in ("0000:17:00.0", "0000:17:00.1"):
        assert "refused to bind to vfio-pci" in dev(st, a)["message"]
        assert "pulseaudio" in dev(st, a)["message"]
    assert "message" not in dev(st, "0000:01:00.0")
    assert st["lastError"] == r.describe() and cond(st, "Synced")["message"] == r.describe()


def test_conditions_keep_transition_time_when_status_holds(tmp_path: Path) -> None:
    inv = inv_of(scenarios.gpu_with_audio, tmp_path)
    first = render_status(inv, SyncOutcome(SUCCEEDED, 1, finished_at=NOW), None, now=NOW)
    later = "2026-11-24T19:00:00Z"
    again = render_status(
        inv, SyncOutcome(SUCCEEDED, 2, finished_at=later), None, previous=first, now=later
    )
    assert cond(again, "Synced")["lastTransitionTime"] == NOW
    failed = render_status(
        inv, SyncOutcome(FAILED, 3, "x", finished_at=later), None, previous=again, now=later
    )
    assert cond(failed, "Synced")["lastTransitionTime"] == later


def test_operator_reads_back_what_the_agent_writes(tmp_path: Path) -> None:
    """The operator's reader (hostdev.policy.reported) must understand this status."""
    inv = inv_of(scenarios.sriov_nic_dual_socket, tmp_path)
    vfs = {A("0000:3b:02.0"): NIC, A("0000:86:02.1"): NIC}
    rows = (AllocationRow(A("0000:3b:02.0"), NIC, "vms", "virt-launcher-a-x1", "compute", "a"),)
    st = render_status(inv, SyncOutcome(SUCCEEDED, 1, resources=vfs), rows, now=NOW)
    rep = read_node_state("node-1", st)
    assert rep.resources == {NIC: ("0000:3b:02.0", "0000:86:02.1")}
    assert rep.inventory is not None
    assert (
        rep.inventory.devices[A("0000:3b:00.0")].virtfns == inv.devices[A("0000:3b:00.0")].virtfns
    )
    assert [(a.pci_address, a.vmi, a.pod) for a in rep.allocations] == [
        ("0000:3b:02.0", "a", "virt-launcher-a-x1")
    ]
    assert rep.allocations[0].held_by_vm("vms", "a")


def test_a_status_too_large_for_etcd_lists_the_telling_devices_first(tmp_path: Path) -> None:
    inv = inv_of(scenarios.sriov_nic_dual_socket, tmp_path)
    served = {A("0000:86:02.3"): NIC}
    r = Refusal("0000:3b:02.2", "bind to vfio-pci", ("x",))
    out = SyncOutcome(FAILED, 1, r.describe(), resources=served, refusals=(r,), finished_at=NOW)
    full = render_status(inv, out, (), now=NOW)
    assert cond(full, "InventoryComplete")["status"] == "True"
    limit = len(json.dumps(full, separators=(",", ":"))) - 400  # two or three entries too many
    cut = render_status(inv, out, (), now=NOW, max_bytes=limit)
    assert len(json.dumps(cut, separators=(",", ":"))) <= limit
    listed = [d["pciAddress"] for d in expand(cut["devices"])]
    assert 0 < len(listed) < cut["deviceCount"] == full["deviceCount"]
    # Served, refused and PFs first; address order kept.
    for must in ("0000:86:02.3", "0000:3b:02.2", "0000:3b:00.0", "0000:3b:00.1", "0000:86:00.0"):
        assert must in listed
    assert listed == sorted(listed)
    c = cond(cut, "InventoryComplete")
    assert c["status"] == "False" and c["reason"] == "Truncated"
    assert c["message"].startswith(f"{len(listed)} of {full['deviceCount']} devices are listed")


def test_vfs_alike_are_listed_as_runs(tmp_path: Path) -> None:
    """A PF's idle VFs and its served ones are a few entries, not one each; the reader gets
    every function back (hostdev.policy.reported)."""
    inv = inv_of(scenarios.sriov_nic_dual_socket, tmp_path)
    served = {A(f"0000:3b:02.{i}"): NIC for i in range(4)}
    st = render_status(
        inv, SyncOutcome(SUCCEEDED, 1, resources=served, finished_at=NOW), (), now=NOW
    )
    runs = [e for e in st["devices"] if "count" in e]
    assert runs[0] == {
        "pciAddress": "0000:3b:02.0",
        "lastPciAddress": "0000:3b:02.3",
        "count": 4,
        **{k: v for k, v in dev(st, "0000:3b:02.0").items() if k != "pciAddress"},
    }
    assert runs[0]["resourceName"] == NIC and runs[0]["health"] == "Healthy"
    assert st["deviceCount"] == len(expand(st["devices"])) > len(st["devices"])
    rep = read_node_state("n", st)
    assert rep.inventory is not None and len(rep.inventory.devices) == st["deviceCount"]
    assert rep.resources[NIC] == tuple(str(a) for a in sorted(served))


# ---- change detection -------------------------------------------------------------------------
BASE: dict[str, Any] = {
    "syncStatus": "Succeeded",
    "lastSyncTime": NOW,
    "devices": [{"pciAddress": "0000:17:00.0", "driver": "vfio-pci"}],
    "allocations": [],
    "conditions": [{"type": "Synced", "status": "True", "lastTransitionTime": NOW}],
}


@pytest.mark.parametrize(
    ("written", "new", "changed"),
    [
        (None, BASE, True),
        (BASE, dict(BASE), False),
        (BASE, {**BASE, "lastSyncTime": "2030-01-01T00:00:00Z"}, False),
        (
            BASE,
            {
                **BASE,
                "conditions": [{"type": "Synced", "status": "True", "lastTransitionTime": "x"}],
            },
            False,
        ),
        (BASE, {**BASE, "conditions": [{"type": "Synced", "status": "False"}]}, True),
        (BASE, {**BASE, "devices": [{"pciAddress": "0000:17:00.0", "driver": "nvidia"}]}, True),
        # Allocations unknown this time: nothing new to say about them.
        (BASE, {k: v for k, v in BASE.items() if k != "allocations"}, False),
        (BASE, {**BASE, "observedGeneration": 2}, True),
        ({}, {"syncStatus": "Succeeded"}, True),
    ],
    ids=[
        "never-written",
        "identical",
        "only-sync-time",
        "only-transition-time",
        "condition-status",
        "driver",
        "allocations-unknown",
        "new-key",
        "empty-written",
    ],
)
def test_status_changed(written: dict[str, Any] | None, new: dict[str, Any], changed: bool) -> None:
    assert status_changed(written, new) is changed


def test_comparable_drops_only_timestamps() -> None:
    c = comparable(BASE)
    assert "lastSyncTime" not in c
    assert c["conditions"] == [{"type": "Synced", "status": "True"}]
    assert c["devices"] == BASE["devices"]


# ---- allocations ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("meta", "vmi"),
    [
        (
            {
                "ownerReferences": [
                    {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "name": "db"}
                ]
            },
            "db",
        ),
        (
            {
                "labels": {"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": "uid-1"},
                "annotations": {"kubevirt.io/domain": "web"},
            },
            "web",
        ),
        ({"labels": {"vm.kubevirt.io/name": "tmpl"}}, "tmpl"),
        # An annotation alone is not enough: only a launcher pod's domain is a VMI.
        ({"annotations": {"kubevirt.io/domain": "x"}}, None),
        (
            {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs"}]},
            None,
        ),
        ({}, None),
    ],
    ids=["owner-reference", "launcher-domain", "template-label", "bare-annotation", "rs", "none"],
)
def test_vmi_of_pod(meta: dict[str, Any], vmi: str | None) -> None:
    assert vmi_of_pod(meta) == vmi


def test_allocations_expand_units_and_skip_foreign(tmp_path: Path) -> None:
    inv = inv_of(scenarios.gpu_with_audio, tmp_path)
    served = served_resources({A("0000:17:00.0"): GPU, A("0000:17:00.1"): GPU})
    assert served == {GPU: (A("0000:17:00.0"), A("0000:17:00.1"))}
    pods = [
        # The kubelet device ID of a unit is its lowest address: both functions are held.
        PodDevices("vms", "virt-launcher-a-1", "compute", GPU, ("0000:17:00.0",)),
        PodDevices("vms", "other", "c", "nvidia.com/gpu", ("GPU-1234",)),
        PodDevices("vms", "odd", "c", GPU, ("not-an-address",)),
    ]
    rows = allocations_from(pods, served, inv, {("vms", "virt-launcher-a-1"): "a"})
    assert rows == (
        AllocationRow(A("0000:17:00.0"), GPU, "vms", "virt-launcher-a-1", "compute", "a"),
        AllocationRow(A("0000:17:00.1"), GPU, "vms", "virt-launcher-a-1", "compute", "a"),
    )
    assert rows[0].to_status() == {
        "pciAddress": "0000:17:00.0",
        "resourceName": GPU,
        "namespace": "vms",
        "pod": "virt-launcher-a-1",
        "container": "compute",
        "vmi": "a",
    }
    assert "vmi" not in AllocationRow(A("0000:17:00.0"), GPU, "n", "p", "c").to_status()


def test_refused_devices_subject_forms(tmp_path: Path) -> None:
    inv = inv_of(scenarios.sriov_nic_dual_socket, tmp_path)
    got = refused_devices(
        [
            Refusal("0000:3b:02.0", "bind to vfio-pci", ("a",)),
            Refusal("pf ens1f1", "set numVfs 8", ("b",)),
            Refusal("group 9 (0000:86:02.0, 0000:86:02.1)", "bind to vfio-pci", ("c",)),
            Refusal("0000:3b:02.0", "restore ice", ("d",)),
            Refusal("pf nosuch0", "set numVfs 1", ("e",)),
        ],
        inv,
    )
    assert set(got) == {A("0000:3b:02.0"), A("0000:3b:00.1"), A("0000:86:02.0"), A("0000:86:02.1")}
    assert got[A("0000:3b:02.0")] == "refused to bind to vfio-pci: a / refused to restore ice: d"
    assert got[A("0000:3b:00.1")] == "refused to set numVfs 8: b"
