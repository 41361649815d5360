"""Host model: typed, frozen views of PCI devices, IOMMU groups and the node's IOMMU state.

Everything here only reads the host (through :class:`~hostdev.host.sysfs.Sysfs`, rooted at a
configurable ``--host-root``); nothing here decides policy.
"""

from hostdev.host.address import PciAddress, PciAddressError
from hostdev.host.model import Inventory, IommuGroup, NodeIommu, PciDevice
from hostdev.host.sysfs import HostRootError, Sysfs

__all__ = [
    "HostRootError",
    "Inventory",
    "IommuGroup",
    "NodeIommu",
    "PciAddress",
    "PciAddressError",
    "PciDevice",
    "Sysfs",
]
