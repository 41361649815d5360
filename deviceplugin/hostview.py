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
from hostdev.host.sysfs import Sysfs, make_group

log = logging.getLogger(__name__)


class HostView:
    def __init__(self, sysfs: Sysfs) -> None:
        self.sysfs = sysfs
        self._devices: dict[PciAddress, PciDevice] = {}
        self._groups: dict[int, IommuGroup] = {}
        self._nodes: frozenset[int] = frozenset()
        self._node: NodeIommu | None = None
        self._inventory: Inventory | None = None
        # What the last refresh() may have changed (None after a full scan: anything).
        self.last_dirty: frozenset[PciAddress] | None = None

    @property
    def inventory(self) -> Inventory:
        if self._inventory is None:
            return self.full()
        return self._inventory

    def full(self) -> Inventory:
        """Re-read everything (start-up, periodic resync, events we cannot attribute)."""
        inv = self.sysfs.discover()
        self._devices = dict(inv.devices)
        self._groups = dict(inv.groups)
        self._nodes = frozenset(g for g, grp in inv.groups.items() if grp.vfio_node)
        self._node = inv.node
        self._inventory = inv
        self.last_dirty = None
        return inv

    def refresh(self, addresses: Iterable[PciAddress]) -> Inventory:
        """Re-read ``addresses`` (gone ones are dropped) and the /dev/vfio nodes; recompute
        only the IOMMU groups those touch."""
        if self._inventory is None:
            return self.full()
        todo = set(addresses)
        touched: set[int] = set()
        pfs: set[PciAddress] = set()
        added = False
        for addr in sorted(todo):
            old = self._devices.get(addr)
            dev = self.sysfs.read_device(addr)
            if old is not None and old.iommu_group is not None:
                touched.add(old.iommu_group)
            if dev is None:
                if old is not None:
                    del self._devices[addr]
                continue
            if dev.iommu_group is not None:
                touched.add(dev.iommu_group)
            physfn = dev.physfn
            if physfn is not None:
                if old is not None and old.physfn == physfn and old.vf_index is not None:
                    dev = replace(dev, vf_index=old.vf_index)
                else:
                    pfs.add(physfn)  # a new VF: its index is on the PF side
            added = added or old is None
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
        if added:
            self._devices = dict(sorted(self._devices.items()))
        nodes = self.sysfs.vfio_group_nodes()
        touched |= nodes ^ self._nodes
        self._nodes = nodes
        self._regroup(touched)
        dirty = set(todo) | pfs
        for num in touched:
            grp = self._groups.get(num)
            if grp is not None:
                dirty.update(grp.members)
        for pf_addr in pfs:
            pf = self._devices.get(pf_addr)
            if pf is not None:
                dirty.update(pf.virtfns)
        self.last_dirty = frozenset(dirty)
        self._inventory = Inventory(
            node=self._node or self.sysfs.node_iommu(),
            devices=dict(self._devices),
            groups=dict(self._groups),
        )
        return self._inventory

    def _regroup(self, numbers: set[int]) -> None:
        if not numbers:
            return
        new_keys = any(n not in self._groups for n in numbers)
        members: dict[int, list[PciDevice]] = {n: [] for n in numbers}
        for dev in self._devices.values():
            if dev.iommu_group in members:
                members[dev.iommu_group].append(dev)
        for num, devs in members.items():
            if not devs:
                self._groups.pop(num, None)
                continue
            self._groups[num] = make_group(num, devs, self._nodes)
        if new_keys:
            self._groups = dict(sorted(self._groups.items()))
