"""Human names for PCI ids from the system's pci.ids (hwdata / pciutils)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

# Where distributions put pci.ids (hwdata, pciutils, Debian's pci.ids package).
SEARCH_PATHS = ("usr/share/hwdata/pci.ids", "usr/share/misc/pci.ids", "usr/share/pci.ids")

# Enough to describe a node when no pci.ids is installed (base class / subclass).
_CLASS_FALLBACK = {
    "01": "Mass storage controller",
    "0108": "Non-Volatile memory controller",
    "02": "Network controller",
    "0200": "Ethernet controller",
    "0207": "Infiniband controller",
    "03": "Display controller",
    "0300": "VGA compatible controller",
    "0302": "3D controller",
    "04": "Multimedia controller",
    "0403": "Audio device",
    "06": "Bridge",
    "0600": "Host bridge",
    "0604": "PCI bridge",
    "0c": "Serial bus controller",
    "0c03": "USB controller",
    "12": "Processing accelerators",
    "ff": "Unassigned class",
}


@dataclass(frozen=True)
class PciIds:
    """Parsed pci.ids; ``source`` is the file used (None: none found, fallbacks only)."""

    source: str | None = None
    vendors: dict[str, str] = field(default_factory=dict)
    devices: dict[tuple[str, str], str] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def find(host_root: str = "/", explicit: str | None = None) -> PciIds:
        """The host's own pci.ids first (it names what the host sees), then this system's."""
        candidates: Iterable[str] = (
            [explicit]
            if explicit
            else [os.path.join(host_root, p) for p in SEARCH_PATHS]
            + [os.path.join("/", p) for p in SEARCH_PATHS]
        )
        for path in candidates:
            if os.path.isfile(path):
                return _load(os.path.abspath(path))
        return PciIds()

    def vendor_name(self, vendor: str | None) -> str | None:
        return None if vendor is None else self.vendors.get(vendor)

    def device_name(self, vendor: str | None, device: str | None) -> str:
        if vendor is None or device is None:
            return "unknown device (unreadable ids)"
        name = self.devices.get((vendor, device))
        if name is None:
            return f"unknown device {vendor}:{device}"
        return f"{self.vendors.get(vendor, vendor)} {name}"

    def class_name(self, class_code: str | None) -> str:
        if class_code is None:
            return "unknown class"
        for key in (class_code[:4], class_code[:2]):
            name = self.classes.get(key) or _CLASS_FALLBACK.get(key)
            if name:
                return name
        return f"class {class_code}"


@lru_cache(maxsize=4)
def _load(path: str) -> PciIds:
    vendors: dict[str, str] = {}
    devices: dict[tuple[str, str], str] = {}
    classes: dict[str, str] = {}
    vendor = cls = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            if line.startswith("C "):
                cls, _, name = line[2:].strip().partition("  ")
                classes[cls] = name
                vendor = None
            elif line[0] != "\t":
                vendor, _, name = line.strip().partition("  ")
                vendors[vendor] = name
                cls = None
            elif line[1] != "\t":
                key, _, name = line.strip().partition("  ")
                if vendor is not None:
                    devices[(vendor, key)] = name
                elif cls is not None:
                    classes[cls + key] = name
    return PciIds(path, vendors, devices, classes)
