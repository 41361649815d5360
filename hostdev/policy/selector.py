"""Device selectors: which host functions a resource (or policy) claims. Pure."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hostdev.host.address import PciAddress, PciAddressError
from hostdev.host.model import Inventory, PciDevice

_HEX4 = re.compile(r"^[0-9a-f]{4}$")
_CLASS = re.compile(r"^[0-9a-f]{2}([0-9a-f]{2}([0-9a-f]{2})?)?$")
_PF = re.compile(r"^(?P<pf>[^#\s]+)(#(?P<lo>\d+)(-(?P<hi>\d+))?)?$")

_FIELDS = {
    "vendors": "vendors",
    "devices": "devices",
    "classes": "classes",
    "pciAddresses": "pci_addresses",
    "pfNames": "pf_names",
    "numaNodes": "numa_nodes",
}


class SelectorError(ValueError):
    """A selector that cannot mean anything; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class PfRange:
    """``ens1f0#0-7``: VFs 0..7 of the PF whose netdev (or PCI address) is ``pf``."""

    pf: str
    first: int | None = None
    last: int | None = None

    @staticmethod
    def parse(text: str) -> PfRange:
        m = _PF.match(text)
        if m is None:
            raise SelectorError(f"pfNames entry {text!r}: expected NAME or NAME#FIRST-LAST")
        lo, hi = m.group("lo"), m.group("hi")
        first = None if lo is None else int(lo)
        last = first if hi is None else int(hi)
        if first is not None and last is not None and last < first:
            raise SelectorError(f"pfNames entry {text!r}: range end {last} is below start {first}")
        return PfRange(m.group("pf"), first, last)

    def covers(self, index: int | None) -> bool:
        if self.first is None or self.last is None:
            return True
        return index is not None and self.first <= index <= self.last


@dataclass(frozen=True, slots=True)
class DeviceSelector:
    """Every non-empty field must match (AND); any value within a field may match (OR).

    An empty selector matches nothing: claiming every device on a node must be explicit.
    """

    vendors: frozenset[str] = frozenset()
    devices: frozenset[str] = frozenset()
    classes: tuple[str, ...] = ()  # hex prefixes: "02", "0200", "020000"
    pci_addresses: frozenset[PciAddress] = frozenset()
    pf_names: tuple[PfRange, ...] = ()
    numa_nodes: frozenset[int] = frozenset()

    @property
    def empty(self) -> bool:
        return not (
            self.vendors
            or self.devices
            or self.classes
            or self.pci_addresses
            or self.pf_names
            or self.numa_nodes
        )

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> DeviceSelector:
        """From the CRD/config form (camelCase keys); unknown keys and bad values are errors."""
        unknown = set(data) - set(_FIELDS)
        if unknown:
            raise SelectorError(
                f"unknown selector field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}"
            )

        def strings(key: str) -> list[str]:
            value = data.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SelectorError(f"selector.{key} must be a list of strings")
            return [v.strip().lower() for v in value]

        vendors = _ids(strings("vendors"), "vendors")
        devices = _ids(strings("devices"), "devices")
        classes = strings("classes")
        for c in classes:
            if not _CLASS.match(c.removeprefix("0x")):
                raise SelectorError(
                    f"selector.classes entry {c!r}: expected 2, 4 or 6 hex digits (e.g. 0200)"
                )
        try:
            addrs = frozenset(PciAddress.parse(a) for a in strings("pciAddresses"))
        except PciAddressError as e:
            raise SelectorError(f"selector.pciAddresses: {e}") from None
        pfs = tuple(PfRange.parse(p) for p in (data.get("pfNames") or []))
        numa = data.get("numaNodes") or []
        if not isinstance(numa, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numa
        ):
            raise SelectorError("selector.numaNodes must be a list of non-negative integers")
        return DeviceSelector(
            vendors=frozenset(vendors),
            devices=frozenset(devices),
            classes=tuple(c.removeprefix("0x") for c in classes),
            pci_addresses=addrs,
            pf_names=pfs,
            numa_nodes=frozenset(numa),
        )

    def matches(self, dev: PciDevice, inventory: Inventory) -> bool:
        if self.empty:
            return False
        if self.vendors and dev.vendor not in self.vendors:
            return False
        if self.devices and dev.device not in self.devices:
            return False
        if self.classes and not (
            dev.class_code is not None and any(dev.class_code.startswith(c) for c in self.classes)
        ):
            return False
        if self.pci_addresses and dev.address not in self.pci_addresses:
            return False
        if self.numa_nodes and dev.numa_node not in self.numa_nodes:
            return False
        return not self.pf_names or self._pf_match(dev, inventory)

    def _pf_match(self, dev: PciDevice, inventory: Inventory) -> bool:
        if dev.physfn is None:
            return False
        pf = inventory.devices.get(dev.physfn)
        names = {str(dev.physfn), *(pf.netdevs if pf is not None else ())}
        return any(r.pf in names and r.covers(dev.vf_index) for r in self.pf_names)


def _ids(values: Iterable[str], key: str) -> list[str]:
    out = []
    for raw in values:
        v = raw.removeprefix("0x")
        if not _HEX4.match(v):
            raise SelectorError(f"selector.{key} entry {raw!r}: expected 4 hex digits (e.g. 8086)")
        out.append(v)
    return out


def select_devices(selector: DeviceSelector, inventory: Inventory) -> tuple[PciDevice, ...]:
    """The inventory's devices the selector claims, in address order."""
    return tuple(d for d in inventory.devices.values() if selector.matches(d, inventory))
