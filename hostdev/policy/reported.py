"""What node agents report in ``PassthroughNodeState.status``, read back into the host model so
the operator can run the same selectors the agent runs. Pure; tolerant of partial reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from hostdev.host.address import PciAddress, PciAddressError
from hostdev.host.model import Inventory, NodeIommu, PciDevice
from hostdev.policy.runs import expand


@dataclass(frozen=True, slots=True)
class Allocation:
    """One device held by one pod (and VMI), as the agent read it from PodResources."""

    node: str
    pci_address: str
    resource_name: str
    namespace: str
    pod: str
    vmi: str | None

    def held_by_vm(self, namespace: str, vm_name: str) -> bool:
        # KubeVirt names launcher pods virt-launcher-<vmi>-<random>; a VM's VMI has its name.
        return self.namespace == namespace and (
            self.vmi == vm_name
            or (self.vmi is None and self.pod.startswith(f"virt-launcher-{vm_name}-"))
        )


@dataclass(frozen=True, slots=True)
class ReportedNode:
    """One node's agent report: None inventory means the agent has not reported devices yet."""

    name: str
    inventory: Inventory | None
    # resourceName -> PCI addresses advertised (mdev resources: the UUIDs of their instances)
    resources: Mapping[str, tuple[str, ...]]
    allocations: tuple[Allocation, ...]

    def count(self, resource_name: str) -> int:
        return len(self.resources.get(resource_name, ()))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _addr(value: Any) -> PciAddress | None:
    if not isinstance(value, str):
        return None
    try:
        return PciAddress.parse(value)
    except PciAddressError:
        return None


def _entries(value: Any) -> list[Mapping[str, Any]]:
    """A status list with its runs (:mod:`hostdev.policy.runs`) expanded."""
    return expand(value) if isinstance(value, list) else []


def read_node_state(name: str, status: Mapping[str, Any] | None) -> ReportedNode:
    """Build the node's view from its status; entries with unusable addresses are skipped."""
    status = status or {}
    raw_devices = status.get("devices")
    allocations = tuple(
        Allocation(
            node=name,
            pci_address=str(a.get("pciAddress", "")),
            resource_name=str(a.get("resourceName", "")),
            namespace=str(a.get("namespace", "")),
            pod=str(a.get("pod", "")),
            vmi=a.get("vmi") or None,
        )
        for a in _entries(status.get("allocations"))
    )
    if not isinstance(raw_devices, list):
        return ReportedNode(name, None, {}, allocations)
    devices: dict[PciAddress, PciDevice] = {}
    resources: dict[str, list[str]] = {}
    virtfns: dict[PciAddress, list[tuple[int, PciAddress]]] = {}
    for raw in expand(raw_devices):
        address = _addr(raw.get("pciAddress"))
        if address is None:
            continue
        physfn = _addr(raw.get("physfn"))
        vf_index = _int(raw.get("vfIndex"))
        if physfn is not None and vf_index is not None:
            virtfns.setdefault(physfn, []).append((vf_index, address))
        devices[address] = PciDevice(
            address=address,
            vendor=(raw.get("vendor") or None),
            device=(raw.get("device") or None),
            subsystem_vendor=None,
            subsystem_device=None,
            class_code=(raw.get("class") or None),
            driver=(raw.get("driver") or None),
            iommu_group=_int(raw.get("iommuGroup")),
            numa_node=_int(raw.get("numaNode")),
            physfn=physfn,
            vf_index=vf_index,
            sriov_totalvfs=_int(raw.get("totalVfs")),
            sriov_numvfs=_int(raw.get("numVfs")),
            netdevs=tuple(str(n) for n in raw.get("netdevs") or ()),
        )
        resource = raw.get("resourceName")
        if isinstance(resource, str) and resource:
            resources.setdefault(resource, []).append(str(address))
    mdev = status.get("mdev")
    for inst in (mdev.get("instances") or ()) if isinstance(mdev, Mapping) else ():
        # A mediated-device resource's capacity: its healthy instances (status.mdev)
        if not isinstance(inst, Mapping) or inst.get("health") != "Healthy":
            continue
        resource, uuid = inst.get("resourceName"), inst.get("uuid")
        if isinstance(resource, str) and resource and isinstance(uuid, str):
            resources.setdefault(resource, []).append(uuid)
    for pf, vfs in virtfns.items():
        if pf in devices:
            devices[pf] = replace(devices[pf], virtfns=tuple(a for _, a in sorted(vfs)))
    iommu = status.get("iommu") or {}
    node = NodeIommu(
        enabled=bool(iommu.get("enabled")),
        vendor=iommu.get("vendor") if iommu.get("vendor") in {"intel", "amd", "other"} else None,
        units=(),
        interrupt_remapping=iommu.get("interruptRemapping"),
        vfio_modules={},
        vfio_container=bool(iommu.get("vfioReady")),
        iommufd=bool(iommu.get("iommufd")),
        cmdline=(),
        group_count=_int(iommu.get("groupCount")) or 0,
    )
    inventory = Inventory(node=node, devices=dict(sorted(devices.items())), groups={})
    return ReportedNode(
        name, inventory, {r: tuple(sorted(a)) for r, a in resources.items()}, allocations
    )
