"""Which host driver the kernel would bind a device to: its ``modalias`` against the module
aliases of the running kernel (``lib/modules/<release>/modules.alias`` and
``modules.builtin.alias`` under the host root), the match modprobe makes when udev loads a
driver for a new device.

Used for VFs that hostdev creates with ``sriov_drivers_autoprobe`` off: they come up without a
driver, yet the driver to give them back to later is the host VF driver the kernel would have
bound (igbvf, iavf, ...), not "none".
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass

from hostdev.host.bounded import read_attr

# Drivers that match almost anything or are not a device's own host driver.
_NOT_HOST = re.compile(r"^(vfio|pci_stub|pci-stub)")


@dataclass(frozen=True, slots=True)
class ModAliases:
    """``pci:`` aliases of one kernel, indexed by vendor (``*`` for vendor wildcards)."""

    by_vendor: dict[str, tuple[tuple[str, str], ...]]  # "00008086" -> ((pattern, module), ...)
    modules_dir: str

    @staticmethod
    def load(host_root: str) -> ModAliases | None:
        """The running kernel's aliases under ``host_root``; None when they cannot be read
        (no ``lib/modules`` mounted, or an unknown release)."""
        release = read_attr(os.path.join(host_root, "proc/sys/kernel/osrelease"))
        if not release and os.path.abspath(host_root) == "/":
            release = os.uname().release
        if not release:
            return None
        mdir = os.path.join(host_root, "lib/modules", release)
        by_vendor: dict[str, list[tuple[str, str]]] = {}
        found = False
        for name in ("modules.alias", "modules.builtin.alias"):
            try:
                with open(os.path.join(mdir, name), encoding="ascii", errors="replace") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            found = True
            for line in lines:
                parts = line.split()
                if len(parts) != 3 or parts[0] != "alias" or not parts[1].startswith("pci:v"):
                    continue
                vendor = parts[1][5:13]
                key = vendor if "*" not in vendor and "?" not in vendor else "*"
                by_vendor.setdefault(key, []).append((parts[1], parts[2]))
        if not found:
            return None
        return ModAliases({k: tuple(v) for k, v in by_vendor.items()}, mdir)

    def modules_for(self, modalias: str) -> tuple[str, ...]:
        """Matching modules, most specific pattern first (fewest wildcards, then longest)."""
        vendor = modalias[5:13] if modalias.startswith("pci:v") else ""
        hits = [
            (pattern, module)
            for pattern, module in (*self.by_vendor.get(vendor, ()), *self.by_vendor.get("*", ()))
            if fnmatch.fnmatchcase(modalias, pattern) and not _NOT_HOST.match(module)
        ]
        hits.sort(key=lambda pm: (pm[0].count("*"), -len(pm[0])))
        return tuple(dict.fromkeys(m for _, m in hits))


def driver_of_module(host_root: str, module: str) -> str:
    """The PCI driver name a module registers (``/sys/module/<m>/drivers/pci:<name>`` once
    loaded); the module name otherwise, which is the driver name for nearly all of them."""
    try:
        names = os.listdir(os.path.join(host_root, "sys/module", module, "drivers"))
    except OSError:
        return module
    pci = sorted(n[4:] for n in names if n.startswith("pci:"))
    return pci[0] if pci else module


def would_bind(host_root: str, aliases: ModAliases, device_dir: str) -> str | None:
    """The host driver the kernel would bind the device in ``device_dir`` to, if any."""
    modalias = read_attr(os.path.join(device_dir, "modalias"))
    if not modalias:
        return None
    modules = aliases.modules_for(modalias)
    return driver_of_module(host_root, modules[0]) if modules else None
