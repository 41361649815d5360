"""The node agent's live picture of the PCI bus, kept current by full or targeted re-reads.

A full :meth:`Sysfs.discover` walks every function; on a node with thousands of VFs that is
too slow for a per-event rescan. A uevent names its device, so :meth:`HostView.refresh` re-reads
only those functions (and the PF of a VF, which holds its ``virtfnN`` link) and rebuilds the
derived IOMMU-group verdicts from the device map in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace

from hostdev.host.address import PciAddress
from hostdev.host.model import Inventory, IommuGroup, NodeIommu, PciDevice
from hostdev.host.sysfs import Sysfs, group_verdict

log = logging.getLogger(__name__)


class HostView:
    def __init__(self, sysfs: Sysfs) -> None:
        self.sysfs = sysfs
        self._devices: dict[PciAddress, PciDevice] = {}
        self._node: NodeIommu | None = None
        self._inventory: Inventory | None = None

    @property
    def inventory(self) -> Inventory:
        if self._inventory is None:
            return self.full()
        return self._inventory

    def full(self) -> Inventory:
        """Re-read everything (start-up, periodic resync, events we cannot attribute)."""
        inv = self.sysfs.discover()
        self._devices = dict(inv.devices)
        self._node = inv.node
        self._inventory = inv
        return inv

    def refresh(self, addresses: Iterable[PciAddress]) -> Inventory:
        """Re-read ``addresses`` (gone ones are dropped) and the /dev/vfio nodes."""
        if self._inventory is None:
            return self.full()
        todo = set(addresses)
        pfs: set[PciAddress] = set()
        for addr in sorted(todo):
            dev = self.sysfs.read_device(addr)
            if dev is None:
                old = self._devices.pop(addr, None)
                if old is not None and old.physfn is not None:
                    pfs.add(old.physfn)
                continue
            if dev.physfn is not None:
                pfs.add(dev.physfn)
            self._devices[addr] = dev
        for pf_addr in pfs - todo:
            pf = self.sysfs.read_device(pf_addr)
            if pf is not None:
                self._devices[pf_addr] = pf
        # read_device cannot see a VF's index from the VF side: take it from its PF's links.
        for pf_addr in pfs:
            pf = self._devices.get(pf_addr)
            if pf is None:
                continue
            for index, vf_addr in enumerate(pf.virtfns):
                vf = self._devices.get(vf_addr)
                if vf is not None and (vf.vf_index != index or vf.physfn != pf_addr):
                    self._devices[vf_addr] = replace(vf, physfn=pf_addr, vf_index=index)
        self._devices = dict(sorted(self._devices.items()))
        self._inventory = self._assemble()
        return self._inventory

    def _assemble(self) -> Inventory:
        assert self._node is not None
        nodes = self.sysfs.vfio_group_nodes()
        members: dict[int, list[PciDevice]] = {}
        for dev in self._devices.values():
            if dev.iommu_group is not None:
                members.setdefault(dev.iommu_group, []).append(dev)
        groups: dict[int, IommuGroup] = {}
        for num in sorted(members):
            devs = members[num]
            viable, reason = group_verdict(devs)
            groups[num] = IommuGroup(
                number=num,
                members=tuple(d.address for d in devs),
                viable=viable,
                reason=reason,
                vfio_node=num in nodes,
            )
        return Inventory(node=self._node, devices=self._devices, groups=groups)
