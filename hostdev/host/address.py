"""PCI addresses in the one form KubeVirt accepts: ``dddd:bb:dd.f``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# KubeVirt's launcher only accepts a 4-digit domain (^XXXX:XX:XX.[0-7]$); so do we.
_PATTERN = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


class PciAddressError(ValueError):
    """A string that is not a full PCI address."""


@dataclass(frozen=True, slots=True)
class PciAddress:
    """A PCI function address (domain, bus, device, function); ordered as that tuple."""

    domain: int
    bus: int
    device: int
    function: int

    def __post_init__(self) -> None:
        if not (
            0 <= self.domain <= 0xFFFF
            and 0 <= self.bus <= 0xFF
            and 0 <= self.device <= 0x1F
            and 0 <= self.function <= 7
        ):
            raise PciAddressError(f"PCI address out of range: {self!s}")

    @staticmethod
    def parse(text: str) -> PciAddress:
        """Parse ``dddd:bb:dd.f``; anything else (short forms, spaces) is rejected."""
        return _parse(text)

    # Written out rather than dataclass(order=True): its four generated methods cost every
    # process start ~5 ms, a noticeable part of the agent's start on a small node.
    def _key(self) -> tuple[int, int, int, int]:
        return (self.domain, self.bus, self.device, self.function)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, PciAddress):
            return NotImplemented
        return self._key() < other._key()

    def __le__(self, other: object) -> bool:
        if not isinstance(other, PciAddress):
            return NotImplemented
        return self._key() <= other._key()

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, PciAddress):
            return NotImplemented
        return self._key() > other._key()

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, PciAddress):
            return NotImplemented
        return self._key() >= other._key()

    def __str__(self) -> str:
        # Lower-case, as sysfs writes it: libvirt gets exactly what it would read there.
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function:x}"


def parse_or_none(text: object) -> PciAddress | None:
    """The address ``text`` names, or None for anything that is not one."""
    if not isinstance(text, str):
        return None
    try:
        return _parse(text)
    except PciAddressError:
        return None


@lru_cache(maxsize=16384)
def _parse(text: str) -> PciAddress:
    m = _PATTERN.match(text)
    if m is None:
        raise PciAddressError(
            f"invalid PCI address {text!r}: expected the full form dddd:bb:dd.f "
            "(e.g. 0000:3b:00.0) with a 4-digit hex domain"
        )
    dom, bus, dev, fn = m.groups()
    if int(dev, 16) > 0x1F:
        raise PciAddressError(f"invalid PCI address {text!r}: device number above 1f")
    return PciAddress(int(dom, 16), int(bus, 16), int(dev, 16), int(fn))
