"""The last look before a unit goes to a VM: its whole IOMMU group re-read from the host.

Shared by every front end that hands units out: the device plugin's Allocate and the DRA
driver's NodePrepareResources. The verdict itself is pure
(:func:`hostdev.policy.health.recheck_unit`); this module only reads: the group's member list,
each member and each of the unit's own functions (its class, driver and group), and
``/dev/vfio/<group>``.
"""

from __future__ import annotations

import os
from collections.abc import Collection

from hostdev.host.address import PciAddress
from hostdev.host.model import PciDevice
from hostdev.host.sysfs import Sysfs
from hostdev.policy.allocation import AllocUnit
from hostdev.policy.health import FreshGroup, Verdict, recheck_unit, unit_health


def read_group(sysfs: Sysfs, group: int, addresses: Collection[PciAddress]) -> FreshGroup:
    """IOMMU group ``group`` as the host shows it now, with ``addresses`` read too (a function
    that left the group is then seen where it went). Each function is read only as far as the
    verdict needs (:meth:`Sysfs.read_handout`): this runs in every Allocate."""
    members = sysfs.group_members(group)
    devices: dict[PciAddress, PciDevice] = {}
    for a in sorted({*(members or ()), *addresses}):
        dev = sysfs.read_handout(a)
        if dev is not None:
            devices[a] = dev
    vfio_node = os.path.exists(sysfs.path("dev/vfio", str(group)))
    return FreshGroup(group, members, devices, vfio_node)


def recheck(
    sysfs: Sysfs, unit: AllocUnit, advertised: Collection[PciAddress] | None = None
) -> tuple[Verdict, FreshGroup | None]:
    """The verdict on ``unit`` now, and what was read (None for a unit without a group).
    ``advertised``: the group's members when the unit was last judged (None: unknown)."""
    if unit.group is None:
        return unit_health(unit.addresses, None, {}, {}), None
    fresh = read_group(sysfs, unit.group, unit.addresses)
    return recheck_unit(unit.addresses, unit.group, fresh, advertised), fresh
