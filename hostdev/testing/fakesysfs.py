"""Builds realistic fake host roots: sysfs PCI trees, IOMMU groups, /dev/vfio, /proc bits.

Files have the kernel's formats (``0x10de\\n``) and links are relative, as the kernel makes
them (``driver -> ../../../bus/pci/drivers/vfio-pci``), so the reader is exercised the same way
as on a node. Point :class:`hostdev.host.Sysfs` (``--host-root``) at ``FakeHost.root``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hostdev.host.address import PciAddress

IommuKind = Literal["intel", "amd"]

_PCIEPORT = "pcieport"


def _addr(a: PciAddress | str) -> PciAddress:
    return a if isinstance(a, PciAddress) else PciAddress.parse(a)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _modalias(vendor: str, device: str, sub_v: str, sub_d: str, class_code: str) -> str:
    """The kernel's form (drivers/pci/pci-driver.c: pci_uevent)."""
    v, d, sv, sd, c = (x.upper() for x in (vendor, device, sub_v, sub_d, class_code))
    return f"pci:v0000{v}d0000{d}sv0000{sv}sd0000{sd}bc{c[0:2]}sc{c[2:4]}i{c[4:6]}"


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


@dataclass
class FakeHost:
    """A fake host root. ``iommu=None`` builds a node with the IOMMU off (no groups)."""

    root: Path
    iommu: IommuKind | None = "intel"
    interrupt_remapping: bool = True
    vfio_loaded: bool = True
    iommufd: bool = False  # /dev/iommu and vfio-dev/vfioN cdevs (CONFIG_VFIO_DEVICE_CDEV)
    cmdline: str = "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro intel_iommu=on iommu=pt"
    release: str = "6.12.0-hostdev"  # kernel release: where lib/modules/<release> lives
    _next_group: int = field(default=0, init=False)
    _cdevs: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        sys = self.root / "sys"
        (sys / "bus/pci/devices").mkdir(parents=True, exist_ok=True)
        (sys / "kernel/iommu_groups").mkdir(parents=True, exist_ok=True)
        (sys / "class/iommu").mkdir(parents=True, exist_ok=True)
        (self.root / "dev").mkdir(exist_ok=True)
        if self.iommu == "intel":
            (sys / "class/iommu/dmar0").mkdir(exist_ok=True)
            (sys / "class/iommu/dmar1").mkdir(exist_ok=True)
        elif self.iommu == "amd":
            (sys / "class/iommu/ivhd0").mkdir(exist_ok=True)
            self.cmdline = self.cmdline.replace("intel_iommu=on", "amd_iommu=on")
        else:
            self.cmdline = self.cmdline.replace(" intel_iommu=on iommu=pt", "")
        if self.vfio_loaded and self.iommu:
            for m in ("vfio", "vfio_pci", "vfio_iommu_type1", "vfio_pci_core"):
                (sys / "module" / m / "parameters").mkdir(parents=True, exist_ok=True)
            (sys / "bus/pci/drivers/vfio-pci").mkdir(parents=True, exist_ok=True)
            _write(self.root / "dev/vfio/vfio", "")
        if self.iommufd and self.iommu:
            _write(self.root / "dev/iommu", "")
        _write(self.root / "proc/cmdline", self.cmdline + "\n")
        _write(self.root / "proc/sys/kernel/osrelease", self.release + "\n")
        chip = "IR-PCI-MSIX" if (self.iommu and self.interrupt_remapping) else "PCI-MSIX"
        apic = "IR-IO-APIC" if (self.iommu and self.interrupt_remapping) else "IO-APIC"
        _write(
            self.root / "proc/interrupts",
            "            CPU0       CPU1\n"
            f"   1:          0          9   {apic}    1-edge      i8042\n"
            f" 120:         12          0   {chip}-0000:3b:00.0    0-edge      ice-0000:3b:00.0\n",
        )

    # ---- paths ----------------------------------------------------------------------
    @property
    def sys(self) -> Path:
        return self.root / "sys"

    def device_dir(self, addr: PciAddress | str) -> Path:
        """The device's real directory (what /sys/bus/pci/devices/<addr> links to)."""
        a = _addr(addr)
        return self.sys / "devices" / f"pci{a.domain:04x}:{a.bus:02x}" / str(a)

    def add_module_alias(self, vendor: str, device: str, module: str) -> None:
        """A ``modules.alias`` line: ``module`` drives ``vendor:device`` (as depmod writes it)."""
        path = self.root / "lib/modules" / self.release / "modules.alias"
        path.parent.mkdir(parents=True, exist_ok=True)
        line = f"alias pci:v0000{vendor.upper()}d0000{device.upper()}sv*sd*bc*sc*i* {module}\n"
        if path.exists() and line in path.read_text():
            return
        with path.open("a") as f:
            f.write(line)

    def new_group(self) -> int:
        self._next_group += 1
        return self._next_group

    # ---- building ---------------------------------------------------------------------
    def add_device(
        self,
        address: PciAddress | str,
        *,
        vendor: str,
        device: str,
        class_code: str,
        driver: str | None = None,
        group: int | None = None,
        numa: int = -1,
        subsystem: tuple[str, str] | None = None,
        netdev: str | None = None,
    ) -> PciAddress:
        """Add one function. ``group=None`` gives it a group of its own (when the IOMMU is on)."""
        a = _addr(address)
        d = self.device_dir(a)
        d.mkdir(parents=True, exist_ok=True)
        sub_v, sub_d = subsystem or (vendor, device)
        for name, value in (
            ("vendor", f"0x{vendor}"),
            ("device", f"0x{device}"),
            ("subsystem_vendor", f"0x{sub_v}"),
            ("subsystem_device", f"0x{sub_d}"),
            ("class", f"0x{class_code}"),
            ("numa_node", str(numa)),
            ("driver_override", "(null)"),
            ("enable", "1"),
            ("modalias", _modalias(vendor, device, sub_v, sub_d, class_code)),
        ):
            _write(d / name, value + "\n")
        _write(
            d / "uevent",
            (f"DRIVER={driver}\n" if driver else "")
            + f"PCI_CLASS={class_code.upper()}\nPCI_ID={vendor.upper()}:{device.upper()}\n"
            f"PCI_SLOT_NAME={a}\n",
        )
        _link(self.sys / "bus/pci/devices" / str(a), d)
        if netdev:
            self.add_netdev(a, netdev)
        if self.iommu:
            g = self.new_group() if group is None else group
            self._next_group = max(self._next_group, g)
            gdir = self.sys / "kernel/iommu_groups" / str(g)
            _link(gdir / "devices" / str(a), d)
            _write(gdir / "type", "DMA\n")
            _link(d / "iommu_group", gdir)
        self.bind(a, driver)
        return a

    def add_netdev(self, address: PciAddress | str, name: str) -> None:
        """A network interface on the function (what its host driver registers)."""
        _write(self.device_dir(address) / "net" / name / "ifindex", "2\n")

    def bind(self, address: PciAddress | str, driver: str | None) -> None:
        """Point the device's ``driver`` link at ``driver`` (None: unbound); keep /dev/vfio real."""
        a = _addr(address)
        d = self.device_dir(a)
        old = d / "driver"
        if old.is_symlink():
            prev = os.path.basename(os.readlink(old))
            (self.sys / "bus/pci/drivers" / prev / str(a)).unlink(missing_ok=True)
            old.unlink()
        for cdev in (d / "vfio-dev").glob("vfio*") if (d / "vfio-dev").exists() else ():
            cdev.rmdir()
        if driver is not None:
            ddir = self.sys / "bus/pci/drivers" / driver
            for f in ("bind", "unbind", "new_id", "remove_id"):
                if not (ddir / f).exists():
                    _write(ddir / f, "")
            _link(old, ddir)
            _link(ddir / str(a), d)
            if driver == "vfio-pci" and self.iommufd:
                (d / "vfio-dev" / f"vfio{self._cdevs}").mkdir(parents=True)
                self._cdevs += 1
        gdir = self._group_dir(a)
        if gdir is not None:
            self.sync_vfio_nodes(gdir)

    def sync_vfio_nodes(self, group: Path | None = None) -> None:
        """/dev/vfio/<g> exists while any member of group g is bound to vfio-pci (as VFIO does).

        ``group``: only that group's directory (cheap; what a single bind can change)."""
        if not (self.iommu and self.vfio_loaded):
            return
        gdirs = [group] if group is not None else list((self.sys / "kernel/iommu_groups").iterdir())
        for gdir in gdirs:
            node = self.root / "dev/vfio" / gdir.name
            members = gdir / "devices"
            on_vfio = members.is_dir() and any(
                (m / "driver").is_symlink()
                and os.path.basename(os.readlink(m / "driver")) == "vfio-pci"
                for m in members.iterdir()
            )
            if on_vfio and not node.exists():
                _write(node, "")
            elif not on_vfio and node.exists():
                node.unlink()

    def make_cdev_nodes(self) -> list[str]:
        """Create /dev/vfio/devices/vfioN for every vfio cdev in sysfs, as the kernel does (not
        done by default: some tests need a cdev whose node is missing). Returns the names."""
        names = sorted(c.name for c in self.sys.glob("devices/pci*/*/vfio-dev/vfio*") if c.is_dir())
        for name in names:
            _write(self.root / "dev/vfio/devices" / name, "")
        return names

    def _group_dir(self, addr: PciAddress) -> Path | None:
        link = self.device_dir(addr) / "iommu_group"
        return (link.parent / os.readlink(link)).resolve() if link.is_symlink() else None

    def add_pf(
        self,
        address: PciAddress | str,
        *,
        vendor: str,
        device: str,
        vf_device: str,
        class_code: str = "020000",
        driver: str | None = "ice",
        totalvfs: int = 64,
        numvfs: int = 0,
        vf_driver: str | None = "vfio-pci",
        numa: int = -1,
        netdev: str | None = None,
        vf_offset: int = 0x10,
        group: int | None = None,
    ) -> PciAddress:
        """An SR-IOV PF with ``numvfs`` VFs enabled, each VF in its own group (ACS, as on NICs)."""
        pf = self.add_device(
            address,
            vendor=vendor,
            device=device,
            class_code=class_code,
            driver=driver,
            numa=numa,
            netdev=netdev,
            group=group,
        )
        d = self.device_dir(pf)
        _write(d / "sriov_totalvfs", f"{totalvfs}\n")
        _write(d / "sriov_offset", f"{vf_offset}\n")
        _write(d / "sriov_stride", "1\n")
        _write(d / "sriov_vf_device", f"{vf_device}\n")
        _write(d / "sriov_drivers_autoprobe", "1\n")
        _write(d / "sriov_numvfs", "0\n")
        if vf_driver is not None and vf_driver != "vfio-pci":
            self.add_module_alias(vendor, vf_device, vf_driver)  # what udev's modprobe matches
        self.set_numvfs(pf, numvfs, vf_driver=vf_driver)
        return pf

    def vf_address(self, pf: PciAddress | str, index: int) -> PciAddress:
        p = _addr(pf)
        offset = int((self.device_dir(p) / "sriov_offset").read_text())
        rid = (p.bus << 8 | p.device << 3 | p.function) + offset + index
        return PciAddress(p.domain, rid >> 8, (rid >> 3) & 0x1F, rid & 7)

    def set_numvfs(
        self, pf: PciAddress | str, n: int, *, vf_driver: str | None = "vfio-pci"
    ) -> None:
        """Create or remove VFs the way the kernel does (links both ways, groups, drivers)."""
        p = _addr(pf)
        d = self.device_dir(p)
        cur = int((d / "sriov_numvfs").read_text())
        vendor = (d / "vendor").read_text().strip()[2:]
        vf_dev = (d / "sriov_vf_device").read_text().strip()
        numa = int((d / "numa_node").read_text())
        for i in range(n, cur):
            self.remove_device(self.vf_address(p, i))
            (d / f"virtfn{i}").unlink()
        for i in range(cur, n):
            vf = self.add_device(
                self.vf_address(p, i),
                vendor=vendor,
                device=vf_dev,
                class_code="020000",
                driver=vf_driver,
                numa=numa,
            )
            _link(d / f"virtfn{i}", self.device_dir(vf))
            _link(self.device_dir(vf) / "physfn", d)
        _write(d / "sriov_numvfs", f"{n}\n")

    def remove_device(self, address: PciAddress | str) -> None:
        """Hot-remove: the device, its bus link, its group membership (and empty group) go."""
        a = _addr(address)
        self.bind(a, None)
        d = self.device_dir(a)
        gdir = self._group_dir(a)
        if gdir is not None:
            (gdir / "devices" / str(a)).unlink(missing_ok=True)
            if not any((gdir / "devices").iterdir()):
                for f in gdir.rglob("*"):
                    if f.is_file():
                        f.unlink()
                (gdir / "devices").rmdir()
                gdir.rmdir()
                (self.root / "dev/vfio" / gdir.name).unlink(missing_ok=True)
        (self.sys / "bus/pci/devices" / str(a)).unlink(missing_ok=True)
        for f in sorted(d.rglob("*"), reverse=True):
            if f.is_dir() and not f.is_symlink():
                f.rmdir()
            else:
                f.unlink()
        d.rmdir()

    def add_bridge(
        self, address: PciAddress | str, *, group: int | None = None, numa: int = -1
    ) -> PciAddress:
        """A PCIe root/switch port (class 0604, pcieport)."""
        return self.add_device(
            address,
            vendor="8086",
            device="2030",
            class_code="060400",
            driver=_PCIEPORT,
            group=group,
            numa=numa,
        )
