"""Blockers: the real planner's refusals on a fake host where QEMU processes hold VFs, matched
with the kubelet's allocations, name exactly the VMs in the way."""

from __future__ import annotations

from pathlib import Path

from hostdev.deviceplugin.config.facts import gather_facts
from hostdev.host import PciAddress, Sysfs
from hostdev.policy.blockers import (
    Blocker,
    find_blockers,
    read_blockers,
    summary,
    with_blockers,
)
from hostdev.policy.nodeconfig import parse_node_config
from hostdev.policy.nodestatus import AllocationRow
from hostdev.policy.plan import Refusal, plan
from hostdev.testing import scenarios
from hostdev.testing.fakeprocs import hold_open, let_go

A = PciAddress.parse
PF = "0000:3b:00.0"
RES = "example.com/vf"


def row(addr: str, pod: str, vmi: str | None) -> AllocationRow:
    return AllocationRow(A(addr), RES, "ns", pod, "compute", vmi)


def setup(tmp_path: Path) -> tuple[Sysfs, list[PciAddress]]:
    scenarios.sriov_nic_dual_socket(tmp_path / "host", numvfs=4)
    sysfs = Sysfs(str(tmp_path / "host"))
    return sysfs, list(sysfs.discover().devices[A(PF)].virtfns)


def refusals(
    sysfs: Sysfs, spec: dict[str, object], originals: dict[PciAddress, str]
) -> tuple[Refusal, ...]:
    inv = sysfs.discover()
    return plan(parse_node_config(spec), inv, gather_facts(sysfs, inv), originals).refusals


def group(sysfs: Sysfs, addr: PciAddress) -> str:
    g = sysfs.discover().devices[addr].iommu_group
    return f"/dev/vfio/{g}"


def test_restore_blocked_by_two_of_three_vms(tmp_path: Path) -> None:
    sysfs, vfs = setup(tmp_path)
    root = tmp_path / "host"
    # Three VMs hold VFs 0, 1 and 2; the spec no longer wants VFs 0 and 1 (restore to iavf).
    for pid, vf in zip((901, 902, 903), vfs[:3], strict=True):
        hold_open(root, pid, group(sysfs, vf))
    spec = {"devices": [{"selector": {"pfNames": ["ens1f0#2-3"]}, "resourceName": RES}]}
    originals = {vf: "iavf" for vf in vfs}
    refused = refusals(sysfs, spec, originals)
    allocs = [row(str(vfs[0]), "virt-launcher-a-1", "a"), row(str(vfs[1]), "virt-launcher-b-1",
              "b"), row(str(vfs[2]), "virt-launcher-c-1", "c")]  # fmt: skip
    got = find_blockers(refused, allocs)
    assert [(b.pci_address, b.vmi, b.pod, b.action) for b in got] == [
        (vfs[0], "a", "virt-launcher-a-1", "restore iavf"),
        (vfs[1], "b", "virt-launcher-b-1", "restore iavf"),
    ]
    assert all("held open by pid 90" in b.reason for b in got)
    assert summary(got).startswith("the spec waits for VM ns/a (0000:3b:02.0); VM ns/b (")
    # Without the kubelet's view the holders are still listed, without pods.
    unknown = find_blockers(refused, None)
    assert [(b.pci_address, b.pod) for b in unknown] == [(vfs[0], None), (vfs[1], None)]
    assert "a process outside Kubernetes" in summary(unknown)
    # VM a lets go: only b is left.
    let_go(root, 901)
    got = find_blockers(refusals(sysfs, spec, originals), allocs)
    assert [b.vmi for b in got] == ["b"]


def test_numvfs_change_names_the_vms_on_its_vfs(tmp_path: Path) -> None:
    sysfs, vfs = setup(tmp_path)
    hold_open(tmp_path / "host", 950, group(sysfs, vfs[3]))
    spec = {"pfs": [{"pciAddress": PF, "numVfs": 8}]}
    got = find_blockers(refusals(sysfs, spec, {}), [row(str(vfs[3]), "virt-launcher-d-9", "d")])
    assert [(b.pci_address, b.vmi, b.action) for b in got] == [
        (vfs[3], "d", f"set numVfs 8 ({PF})")
    ]
    # Above sriov_totalvfs as well: evicting VMs would not help, so nobody is a blocker.
    spec = {"pfs": [{"pciAddress": PF, "numVfs": 100}]}
    assert find_blockers(refusals(sysfs, spec, {}), [row(str(vfs[3]), "p", "d")]) == ()


def test_status_gets_blockers_then_clears_them() -> None:
    b = Blocker(A("0000:3b:02.0"), "restore iavf", "x (a running VM owns the group)", "ns",
                "virt-launcher-a-1", "a", RES)  # fmt: skip
    base = {"conditions": [{"type": "Synced", "status": "False"}]}
    first = with_blockers(dict(base), [b], previous={}, generation=3, now="T1")
    assert first["blockers"] == [{
        "pciAddress": "0000:3b:02.0", "action": "restore iavf",
        "reason": "x (a running VM owns the group)", "namespace": "ns",
        "pod": "virt-launcher-a-1", "vmi": "a", "resourceName": RES}]  # fmt: skip
    blocked = {c["type"]: c for c in first["conditions"]}["Blocked"]
    assert blocked["status"] == "True" and "VM ns/a (0000:3b:02.0)" in blocked["message"]
    assert read_blockers(first) == (b,)
    # Nothing blocks any more: an empty list and Blocked False, so a merge patch clears them.
    second = with_blockers(dict(base), [], previous=first, generation=3, now="T2")
    assert second["blockers"] == []
    assert {c["type"]: c["status"] for c in second["conditions"]}["Blocked"] == "False"
    # A node that never had blockers never shows the field or the condition.
    assert with_blockers(dict(base), [], previous={}, generation=1, now="T") == base


def test_thousands_of_blockers_stay_bounded() -> None:
    many = [
        Blocker(A(f"0000:{3 + i // 256:02x}:{(i // 8) % 32:02x}.{i % 8}"), "set numVfs 0 (pf)",
                "x (a running VM owns the group)", "ns", f"virt-launcher-v{i}-1", f"v{i}", RES)
        for i in range(2000)
    ]  # fmt: skip
    st = with_blockers({}, many, previous={}, generation=1, now="T")
    assert len(st["blockers"]) == 512
    msg = {c["type"]: c for c in st["conditions"]}["Blocked"]["message"]
    assert msg.count("VM ns/") == 10 and "and 1990 more holders" in msg


def test_allocated_to_a_pod_counts_as_held_and_other_reasons_do_not() -> None:
    vf = "0000:3b:02.3"
    in_use = f"VF {vf} is in use: /dev/vfio/60 is held open by pid 9 (a running VM owns the group)"
    allocated = f"VF {vf} is allocated to pod ns/virt-launcher-d-9 (example.com/vf)"
    held = Refusal("0000:3b:00.0", "set numVfs 8", (in_use, allocated))
    (b,) = find_blockers([held], [row(vf, "virt-launcher-d-9", "d")])
    assert (str(b.pci_address), b.vmi, b.action) == (vf, "d", "set numVfs 8 (0000:3b:00.0)")
    assert b.reason == f"{in_use}; {allocated}"  # one entry per device and holder
    wanted = Refusal("0000:3b:00.0", "set numVfs 8", (f"VF {vf} is wanted in the desired state",))
    assert find_blockers([wanted], [row(vf, "virt-launcher-d-9", "d")]) == ()
