"""Frozen dataclasses describing what the host has. Built by :mod:`hostdev.host.sysfs`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from hostdev.host.address import PciAddress

IommuVendor = Literal["intel", "amd", "other"]

# Drivers that leave a group usable by VFIO (besides "no driver"). vfio-pci variant drivers
# (mlx5_vfio_pci, nvgrace_gpu_vfio_pci, ...) are VFIO drivers too.
VFIO_DRIVERS = frozenset({"vfio-pci"})
VIABLE_HOST_DRIVERS = frozenset({"pci-stub"})


def is_vfio_driver(driver: str | None) -> bool:
    return driver is not None and (driver in VFIO_DRIVERS or driver.endswith("vfio_pci"))


@dataclass(frozen=True, slots=True)
class PciDevice:
    """One PCI function as sysfs shows it. ``None`` means the host did not say (or said garbage:
    see ``problems``)."""

    address: PciAddress
    vendor: str | None  # "10de" (lower-case hex, no 0x)
    device: str | None
    subsystem_vendor: str | None
    subsystem_device: str | None
    class_code: str | None  # "030000": class, subclass, prog-if
    driver: str | None
    iommu_group: int | None
    numa_node: int | None  # sysfs -1 -> None (unknown)
    physfn: PciAddress | None = None  # set on VFs
    vf_index: int | None = None  # N of the PF's virtfnN link pointing here
    virtfns: tuple[PciAddress, ...] = ()  # on PFs, ordered by VF index
    sriov_totalvfs: int | None = None
    sriov_numvfs: int | None = None  # None on a PF: unreadable, or ``busy``
    netdevs: tuple[str, ...] = ()
    vfio_cdev: str | None = None  # "vfio3" -> /dev/vfio/devices/vfio3 (iommufd cdev)
    problems: tuple[str, ...] = ()
    # The PCIe root complex above the device, "pci<domain>:<bus>" (the first directory under
    # /sys/devices on the way to it), as DRA's standard pcieRoot attribute names it.
    pcie_root: str | None = None
    # PF only: the VFs' device id, where the kernel puts them (routing-ID offset and stride),
    # and whether new VFs are probed to a driver at once (sriov_drivers_autoprobe)
    sriov_vf_device: str | None = None
    sriov_offset: int | None = None
    sriov_stride: int | None = None
    sriov_autoprobe: bool | None = None
    # why the kernel would not answer for this device right now (a read timed out: the device
    # lock is held, e.g. by an unbind waiting for a VF's VFIO user); None when it answered
    busy: str | None = None

    @classmethod
    def unknown(cls, address: PciAddress, problem: str) -> PciDevice:
        return cls(address, None, None, None, None, None, None, None, None, problems=(problem,))

    @property
    def ids(self) -> str:
        return f"{self.vendor or '????'}:{self.device or '????'}"

    @property
    def is_vf(self) -> bool:
        return self.physfn is not None

    @property
    def is_pf(self) -> bool:
        return bool(self.sriov_totalvfs)

    @property
    def is_bridge(self) -> bool:
        # Class 06/04 (PCI-PCI bridge, PCIe root/downstream ports) and 06/09 (semi-transparent):
        # their header type is not "normal", which the kernel's VFIO viability check skips.
        return self.class_code is not None and self.class_code[:4] in {"0604", "0609"}

    @property
    def on_vfio(self) -> bool:
        return is_vfio_driver(self.driver)

    def vf_address(self, index: int) -> PciAddress | None:
        """Where the kernel puts VF ``index`` of this PF (SR-IOV: routing ID of the PF + First
        VF Offset + index * VF Stride), before it exists; None when the PF does not say."""
        if self.sriov_offset is None or self.sriov_stride is None:
            return None
        a = self.address
        rid = (a.bus << 8 | a.device << 3 | a.function) + self.sriov_offset
        rid += index * self.sriov_stride
        if rid > 0xFFFF:
            return None
        return PciAddress(a.domain, rid >> 8, (rid >> 3) & 0x1F, rid & 7)


@dataclass(frozen=True, slots=True)
class IommuGroup:
    """An IOMMU group: the smallest set of functions the IOMMU can isolate from each other."""

    number: int
    members: tuple[PciAddress, ...]
    viable: bool
    reason: str | None  # why not viable; None when viable
    vfio_node: bool  # /dev/vfio/<number> exists


@dataclass(frozen=True, slots=True)
class NodeIommu:
    """Node-wide passthrough readiness facts."""

    enabled: bool
    vendor: IommuVendor | None
    units: tuple[str, ...]  # dmar0, ivhd0, ...
    interrupt_remapping: bool | None  # None: the kernel did not tell us
    vfio_modules: Mapping[str, bool]  # vfio, vfio_pci, vfio_iommu_type1 -> loaded
    vfio_container: bool  # /dev/vfio/vfio
    iommufd: bool  # /dev/iommu
    cmdline: tuple[str, ...]  # IOMMU-related kernel parameters seen in /proc/cmdline
    group_count: int

    @property
    def vfio_ready(self) -> bool:
        return self.enabled and self.vfio_modules.get("vfio_pci", False) and self.vfio_container


@dataclass(frozen=True, slots=True)
class Inventory:
    """Everything discovery found in one pass."""

    node: NodeIommu
    devices: Mapping[PciAddress, PciDevice]
    groups: Mapping[int, IommuGroup]
    warnings: tuple[str, ...] = field(default=())

    def group_of(self, dev: PciDevice) -> IommuGroup | None:
        return None if dev.iommu_group is None else self.groups.get(dev.iommu_group)
