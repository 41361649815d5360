"""Runs of consecutive PCI functions in status lists: one entry for many alike. Pure.

A node with thousands of VFs lists them in ``PassthroughNodeState.status`` (devices and
allocations). VFs of one PF sit at consecutive routing IDs and are alike in everything but
their address, VF index and IOMMU group, which count up together. So an entry may stand for a
run: ``count`` functions from ``pciAddress`` to ``lastPciAddress``, each at the next routing ID
(function, then device, then bus), with ``vfIndex`` and ``iommuGroup`` (when present) one
higher each, every other field the same. At 4,096 VFs the device list shrinks from ~870 KiB to
a few KiB. :func:`compact` makes runs, :func:`expand` undoes them (readers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hostdev.host.address import PciAddress, PciAddressError

COUNT = "count"
LAST = "lastPciAddress"
ADDRESS = "pciAddress"
_STEPPED = ("vfIndex", "iommuGroup")  # one higher per function of a run, when present
_NOT_IN_RUNS = ("netdevs",)  # per-function names: entries that have them stay alone


def next_address(a: PciAddress) -> PciAddress | None:
    """The function at the next routing ID on the same domain (None past bus ff)."""
    if a.function < 7:
        return PciAddress(a.domain, a.bus, a.device, a.function + 1)
    if a.device < 0x1F:
        return PciAddress(a.domain, a.bus, a.device + 1, 0)
    if a.bus < 0xFF:
        return PciAddress(a.domain, a.bus + 1, 0, 0)
    return None


def _parse(value: Any) -> PciAddress | None:
    if not isinstance(value, str):
        return None
    try:
        return PciAddress.parse(value)
    except PciAddressError:
        return None


def _rest(entry: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in entry.items() if k != ADDRESS and k not in _STEPPED)


def compact(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``entries`` (address order, one function each) with runs of alike consecutive functions
    merged into one entry each (``count`` > 1 and ``lastPciAddress``)."""
    out: list[dict[str, Any]] = []
    run: dict[str, Any] | None = None
    last: PciAddress | None = None
    rest: tuple[tuple[str, Any], ...] = ()
    stepped: dict[str, Any] = {}
    for e in entries:
        addr = _parse(e.get(ADDRESS))
        here = dict(e)
        if (
            run is not None
            and addr is not None
            and last is not None
            and next_address(last) == addr
            and not any(k in e for k in _NOT_IN_RUNS)
            and all(
                (k in e) == (k in stepped)
                and (k not in e or (isinstance(e[k], int) and e[k] == stepped[k] + 1))
                for k in _STEPPED
            )
            and _rest(e) == rest
        ):
            run[COUNT] = run.get(COUNT, 1) + 1
            run[LAST] = str(addr)
            last = addr
            stepped = {k: e[k] for k in _STEPPED if k in e}
            continue
        out.append(here)
        run, last = here, addr
        if addr is None or any(k in e for k in _NOT_IN_RUNS):
            run = None  # stands alone
            continue
        rest = _rest(e)
        stepped = {k: e[k] for k in _STEPPED if k in e}
    # Keys in a stable order for readers: the run's size right after its first address.
    return [_ordered(e) for e in out]


def _ordered(e: dict[str, Any]) -> dict[str, Any]:
    if COUNT not in e:
        return e
    head = {ADDRESS: e[ADDRESS], LAST: e[LAST], COUNT: e[COUNT]}
    return {**head, **{k: v for k, v in e.items() if k not in head}}


def expand(entries: Sequence[Any]) -> list[Mapping[str, Any]]:
    """One entry per function again (entries that are not runs pass as they are; a run whose
    ``count`` or address is unusable stands for its first function only)."""
    out: list[Mapping[str, Any]] = []
    for e in entries:
        if not isinstance(e, Mapping):
            continue
        count = e.get(COUNT)
        addr = _parse(e.get(ADDRESS))
        if not isinstance(count, int) or isinstance(count, bool) or count <= 1 or addr is None:
            out.append({k: v for k, v in e.items() if k not in (COUNT, LAST)})
            continue
        base = {k: v for k, v in e.items() if k not in (COUNT, LAST)}
        here: PciAddress | None = addr
        for i in range(count):
            if here is None:
                break
            one = dict(base)
            one[ADDRESS] = str(here)
            for k in _STEPPED:
                if isinstance(base.get(k), int):
                    one[k] = base[k] + i
            out.append(one)
            here = next_address(here)
    return out
