"""Device health for the kubelet: Healthy only when VFIO can actually hand the unit out. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hostdev.host.address import PciAddress
from hostdev.host.model import IommuGroup, PciDevice

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


@dataclass(frozen=True, slots=True)
class Verdict:
    healthy: bool
    reason: str | None = None  # why not, naming the device

    @property
    def kubelet(self) -> str:
        return HEALTHY if self.healthy else UNHEALTHY


def unit_health(
    addresses: tuple[PciAddress, ...],
    group: int | None,
    devices: Mapping[PciAddress, PciDevice],
    groups: Mapping[int, IommuGroup],
) -> Verdict:
    """Every member present, on a VFIO driver, still in ``group``; the group viable; and its
    ``/dev/vfio/<group>`` node present."""
    if group is None:
        return Verdict(False, f"{addresses[0]} has no IOMMU group (IOMMU off?)")
    for a in addresses:
        d = devices.get(a)
        if d is None:
            return Verdict(False, f"{a} is gone from the PCI bus")
        if not d.on_vfio:
            return Verdict(False, f"{a} is bound to {d.driver or 'no driver'}, not vfio-pci")
        if d.iommu_group != group:
            return Verdict(False, f"{a} moved from IOMMU group {group} to {d.iommu_group}")
    g = groups.get(group)
    if g is None:
        return Verdict(False, f"IOMMU group {group} of {addresses[0]} is gone")
    if not g.viable:
        return Verdict(False, f"IOMMU group {group} of {addresses[0]} is {g.reason}")
    if not g.vfio_node:
        return Verdict(False, f"/dev/vfio/{group} for {addresses[0]} does not exist")
    return Verdict(True)
