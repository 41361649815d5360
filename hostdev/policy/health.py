"""Device health for the kubelet: Healthy only when VFIO can actually hand the unit out. Pure.

Two entry points share one rule set:

- :func:`unit_health` judges a unit against an inventory (ListAndWatch, NodeState status);
- :func:`recheck_unit` judges it against its IOMMU group re-read from the host an instant
  before it is handed to a VM (device-plugin Allocate, DRA NodePrepareResources; the reader is
  :mod:`hostdev.deviceplugin.recheck`).

Every reason is one sentence naming the device, saying what is wrong and what to do.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from hostdev.host.address import PciAddress
from hostdev.host.model import IommuGroup, PciDevice
from hostdev.host.sysfs import make_group

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
    """Every function of the unit present, on a VFIO driver and still in ``group``; the whole
    group viable (every other non-bridge member on vfio-pci, pci-stub or no driver, as VFIO
    requires); and its ``/dev/vfio/<group>`` node present."""
    first = addresses[0]
    if group is None:
        return Verdict(
            False,
            f"{first} is in no IOMMU group: turn the IOMMU on (VT-d/AMD-Vi in the firmware, "
            "intel_iommu=on or amd_iommu=on on the kernel command line) to assign it",
        )
    for a in addresses:
        d = devices.get(a)
        if d is None:
            return Verdict(False, f"{a} is gone from the PCI bus")
        if not d.on_vfio:
            return Verdict(False, f"{a} is bound to {d.driver or 'no driver'}, not vfio-pci")
        if d.iommu_group != group:
            where = "no IOMMU group" if d.iommu_group is None else f"group {d.iommu_group}"
            return Verdict(
                False,
                f"{a} moved from IOMMU group {group} to {where}; "
                "it is advertised again once the agent has re-read it",
            )
    g = groups.get(group)
    if g is None:
        return Verdict(False, f"IOMMU group {group} of {first} no longer exists")
    if not g.viable:
        return Verdict(False, f"IOMMU group {group} of {first} cannot be assigned: {g.reason}")
    if not g.vfio_node:
        return Verdict(
            False,
            f"/dev/vfio/{group} (IOMMU group {group} of {first}) does not exist: "
            "check that the vfio-pci module is loaded and the group is bound to it",
        )
    return Verdict(True)


@dataclass(frozen=True, slots=True)
class FreshGroup:
    """A unit's IOMMU group as re-read from the host just now."""

    number: int
    members: tuple[PciAddress, ...] | None  # the kernel's listing now; None: the group is gone
    devices: Mapping[PciAddress, PciDevice]  # fresh reads of the members and the unit's own
    # functions (an address missing here is gone from the bus)
    vfio_node: bool  # /dev/vfio/<number> exists


def recheck_unit(
    addresses: tuple[PciAddress, ...],
    group: int,
    fresh: FreshGroup,
    advertised: Collection[PciAddress] | None = None,
) -> Verdict:
    """May the unit (``addresses`` in ``group``) go to a VM now? The rules of
    :func:`unit_health`, over the whole group as just read, plus: the group still has the
    members it had when the unit was advertised (``advertised``; None skips that check)."""
    groups: dict[int, IommuGroup] = {}
    if fresh.members is not None:
        members = [fresh.devices[a] for a in fresh.members if a in fresh.devices]
        groups[group] = make_group(group, members, frozenset({group} if fresh.vfio_node else ()))
    verdict = unit_health(addresses, group, fresh.devices, groups)
    if not verdict.healthy or advertised is None or fresh.members is None:
        return verdict
    if set(advertised) != set(fresh.members):
        now = ", ".join(map(str, sorted(fresh.members)))
        was = ", ".join(map(str, sorted(advertised)))
        return Verdict(
            False,
            f"IOMMU group {group} of {addresses[0]} changed since it was advertised "
            f"(members now {now}; were {was}); it is judged again at the agent's next rescan",
        )
    return verdict
