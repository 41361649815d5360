"""One resource's allocation units and their health: the stage of the node agent's pipeline
between the host inventory and the kubelet front ends.

inventory -> :class:`ResourceUnits` (selected devices -> units -> verdicts) -> front ends: the
device-plugin server (:mod:`hostdev.deviceplugin.plugin`, a subclass) and the DRA driver
(:mod:`hostdev.deviceplugin.dra`, which reads these objects). Both hand out a unit only after
:func:`recheck_for_handout` has re-read its whole IOMMU group (the one shared re-check,
:mod:`hostdev.deviceplugin.recheck`).

A unit is one IOMMU group of the resource (see :mod:`hostdev.policy.allocation`); its ID is its
lowest PCI address. The object never rescans the host itself: the manager hands it each new
:class:`Inventory` through :meth:`ResourceUnits.update`, which recomputes units and health and
publishes only when something changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hostdev.deviceplugin.metrics import Metrics
from hostdev.deviceplugin.recheck import recheck
from hostdev.deviceplugin.resources import ResourceConfig
from hostdev.host.address import PciAddress, PciAddressError
from hostdev.host.mdevuuid import UUID_RE
from hostdev.host.model import Inventory, IommuGroup, PciDevice
from hostdev.host.sysfs import Sysfs
from hostdev.policy.allocation import AllocUnit, build_units
from hostdev.policy.health import Verdict, unit_health
from hostdev.policy.selector import select_devices

log = logging.getLogger(__name__)

# Called after every published change with the changed units (None: anything may have changed).
Listener = Callable[[Mapping[str, "Advertised"] | None], None]


class UnitRefusedError(Exception):
    """A unit that must not be handed out now; the message names the device and why.
    ``read``: the functions the re-check found different from the last scan (rescan them)."""

    def __init__(self, message: str, read: Collection[PciAddress] = ()) -> None:
        super().__init__(message)
        self.read = tuple(read)


@dataclass(frozen=True, slots=True)
class Advertised:
    """One unit as the kubelet sees it (also what is persisted across agent restarts)."""

    unit: AllocUnit
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class Rechecked:
    """What a re-read found for a unit about to be handed out: it is usable as advertised."""

    unit: AllocUnit
    group: int
    cdevs: tuple[str, ...]  # vfioN of functions with an iommufd cdev whose /dev node exists


def recheck_for_handout(
    sysfs: Sysfs, unit: AllocUnit, advertised: Collection[PciAddress] | None = None
) -> Rechecked:
    """The shared re-check (:func:`hostdev.deviceplugin.recheck.recheck`: the unit's whole
    IOMMU group re-read and judged as VFIO does) as the front ends use it: the usable unit with
    its iommufd cdevs, or :class:`UnitRefusedError` with the reason. ``advertised``: the group's
    members when the unit was last judged (None: unknown)."""
    verdict, fresh = recheck(sysfs, unit, advertised)
    if not verdict.healthy or fresh is None or unit.group is None:
        raise UnitRefusedError(
            f"device {unit.id} is not handed to a VM: {verdict.reason}",
            {*unit.addresses, *(fresh.devices if fresh else ())},
        )
    cdevs = []
    for a in unit.addresses:
        cdev = fresh.devices[a].vfio_cdev
        if cdev and os.path.exists(sysfs.path("dev/vfio/devices", cdev)):
            cdevs.append(cdev)
    return Rechecked(unit, unit.group, tuple(cdevs))


class ResourceUnits:
    """The units of one resource, their verdicts, and which of them are in use."""

    def __init__(
        self,
        config: ResourceConfig,
        sysfs: Sysfs,
        metrics: Metrics,
        *,
        on_change: Callable[[], None] | None = None,
        on_stale: Callable[[Iterable[PciAddress]], None] | None = None,
    ) -> None:
        self.config = config
        self._on_change = on_change
        # A re-check found the host differs from what was advertised: rescan these functions.
        self._on_stale = on_stale
        self.resource = config.resource_name
        self.sysfs = sysfs
        self.metrics = metrics
        self.devices: dict[str, Advertised] = {}
        self.allocated: set[str] = set()  # handed out (or held by pods): never dropped
        self._allocated_at: dict[str, float] = {}
        self._selected: tuple[PciDevice, ...] = ()
        self._units: tuple[AllocUnit, ...] = ()
        self._judged: dict[str, tuple[tuple[PciDevice | None, ...], IommuGroup | None]] = {}
        self._unit_of: dict[PciAddress, AllocUnit] = {}
        self._facts: dict[PciAddress, tuple[object, ...]] = {}
        self.units_version = 0  # bumped whenever the unit set is rebuilt
        self.shared_groups: dict[int, tuple[str, ...]] = {}  # group -> other resources in it
        # unit id -> why another front end holds it (e.g. a prepared DRA claim): never healthy
        self.held: dict[str, str] = {}
        self.generation = 0  # bumped on every published change (tests and benches wait on it)
        self._published = asyncio.Event()
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    # ---- device set -------------------------------------------------------------------
    def seed(self, devices: Iterable[Advertised], allocated: Iterable[str] = ()) -> None:
        """Start from a persisted list (before any host scan), so the kubelet sees the same
        devices right after an agent restart."""
        self.devices = {a.unit.id: a for a in devices}
        self.allocated = set(allocated) & set(self.devices)
        self._publish()

    def take_over(self, other: ResourceUnits) -> None:
        """Continue where ``other`` (the same resource under the other front end) left off:
        its units, verdicts and in-use set, so a unit a pod holds stays held."""
        self.devices = dict(other.devices)
        self.allocated = set(other.allocated)
        self._allocated_at = dict(other._allocated_at)
        self.shared_groups = dict(other.shared_groups)
        self.held = dict(other.held)
        self._publish()

    def update(self, inventory: Inventory, dirty: Collection[PciAddress] | None = None) -> bool:
        """Recompute units and health from ``inventory``; publish if anything changed.

        ``dirty``: the only addresses whose facts may have changed since the last update (a
        targeted rescan); None means anything may have changed.
        """
        if dirty is not None:
            fast = self._update_dirty(inventory, dirty)
            if fast is not None:
                return fast
        # Host views share unchanged PciDevice/IommuGroup objects between scans, so identity
        # checks let a rescan of a 4096-VF node skip regrouping and re-judging what did not
        # change (a targeted rescan then costs a few ms instead of tens).
        selected = select_devices(self.config.selector, inventory)
        if len(selected) == len(self._selected) and all(
            a is b or _unit_facts(a) == _unit_facts(b)
            for a, b in zip(selected, self._selected, strict=True)
        ):
            units = self._units
        else:
            units = build_units(selected)
            self._selected, self._units = selected, units
            self.units_version += 1
            self._unit_of = {a: u for u in units for a in u.addresses}
            self._facts = {d.address: _unit_facts(d) for d in selected}
        new: dict[str, Advertised] = {}
        devices, groups = inventory.devices, inventory.groups
        for u in units:
            key = (
                tuple(devices.get(a) for a in u.addresses),
                None if u.group is None else groups.get(u.group),
            )
            old = self.devices.get(u.id)
            cached = self._judged.get(u.id)
            if (
                cached is not None
                and old is not None
                and old.unit is u
                and cached[1] is key[1]
                and all(x is y for x, y in zip(cached[0], key[0], strict=True))
            ):
                new[u.id] = old
                continue
            v = self._judge(u, devices, groups)
            self._judged[u.id] = key
            new[u.id] = Advertised(u, v)
        for dev_id in self.allocated - new.keys():
            # In use by a pod: keep it, Unhealthy, so the kubelet does not lose track of it.
            old = self.devices.get(dev_id)
            if old is not None:
                why = old.verdict.reason if not old.verdict.healthy else None
                new[dev_id] = Advertised(
                    old.unit,
                    Verdict(
                        False,
                        why or f"{dev_id} left the PCI bus or this resource while a pod holds it",
                    ),
                )
        if new == self.devices:
            return False
        appeared = [k for k in new if k not in self.devices]
        if len(appeared) > 16:
            # A first scan of a big node: one line, not thousands.
            healthy = sum(new[k].verdict.healthy for k in appeared)
            log.info(
                "%s: %d devices appear (%d healthy), %s .. %s",
                self.resource,
                len(appeared),
                healthy,
                appeared[0],
                appeared[-1],
            )
        for dev_id, adv in new.items():
            old = self.devices.get(dev_id)
            if old is None:
                if len(appeared) <= 16:
                    log.info(
                        "%s: device %s appears (%s)", self.resource, dev_id, adv.verdict.kubelet
                    )
            elif old.verdict.healthy != adv.verdict.healthy:
                self._log_health(dev_id, adv.verdict)
        for dev_id in self.devices.keys() - new.keys():
            self._judged.pop(dev_id, None)
            log.info("%s: device %s is gone and not in use: dropped", self.resource, dev_id)
        self.devices = new
        self._publish()
        return True

    def set_in_use(self, in_use: Iterable[str], grace: float = 120.0) -> None:
        """Replace the in-use set with the kubelet's (PodResources), keeping allocations of the
        last ``grace`` seconds, which a List racing with Allocate may not show yet."""
        cutoff = time.monotonic() - grace
        recent = {k for k, t in self._allocated_at.items() if t >= cutoff}
        self._allocated_at = {k: t for k, t in self._allocated_at.items() if t >= cutoff}
        new = set(in_use) | recent
        if new != self.allocated:
            freed = self.allocated - new
            if freed:
                log.info("%s: no longer in use: %s", self.resource, ", ".join(sorted(freed)))
            self.allocated = new
            if self._on_change is not None:
                self._on_change()

    def mark_allocated(self, ids: Collection[str]) -> None:
        """``ids`` were just handed out: keep them (even when they vanish) until the kubelet's
        in-use list has had time to show them."""
        now = time.monotonic()
        for dev_id in ids:
            self._allocated_at[dev_id] = now
        if not self.allocated.issuperset(ids):
            self.allocated.update(ids)
            if self._on_change is not None:
                self._on_change()

    def _judge(
        self,
        u: AllocUnit,
        devices: Mapping[PciAddress, PciDevice],
        groups: Mapping[int, IommuGroup],
    ) -> Verdict:
        return self._shared_verdict(u, unit_health(u.addresses, u.group, devices, groups))

    def _shared_verdict(self, u: AllocUnit, v: Verdict) -> Verdict:
        """A healthy verdict made unhealthy by what this object knows beyond the host: the
        unit's group split across resources, or the unit held by another front end."""
        others = self.shared_groups.get(u.group) if u.group is not None else None
        if v.healthy and others:
            return Verdict(
                False,
                f"IOMMU group {u.group} of {u.id} also holds devices of {', '.join(others)}; "
                "a group can go to one VM only: select the whole group in one resource",
            )
        if v.healthy and u.id in self.held:
            return Verdict(False, f"{u.id} {self.held[u.id]}")
        return v

    def set_shared_groups(self, shared: Mapping[int, tuple[str, ...]]) -> bool:
        """Groups this resource shares with others (their units are never healthy)."""
        if dict(shared) == self.shared_groups:
            return False
        self.shared_groups = dict(shared)
        self._judged.clear()  # verdicts depend on it: re-judge everything on the next update
        return True

    def set_held(self, held: Mapping[str, str]) -> bool:
        """Units another front end holds (unit id -> why), e.g. by a prepared DRA claim after
        the resource moved to the device plugin: never healthy until released."""
        if dict(held) == self.held:
            return False
        self.held = dict(held)
        self._judged.clear()
        return True

    def _update_dirty(self, inventory: Inventory, dirty: Collection[PciAddress]) -> bool | None:
        """Re-judge only the units holding a dirty address; None when that is not enough
        (the device set or a unit's shape changed, or a PF changed: pfNames may follow it)."""
        devices, groups = inventory.devices, inventory.groups
        selector = self.config.selector
        touched: dict[str, AllocUnit] = {}
        for a in dirty:
            d = devices.get(a)
            unit = self._unit_of.get(a)
            if d is not None and d.is_pf:
                return None
            now = d is not None and selector.matches(d, inventory)
            if now != (unit is not None):
                return None
            if d is not None and unit is not None:
                if _unit_facts(d) != self._facts.get(a):
                    return None
                touched[unit.id] = unit
        changed: dict[str, Advertised] = {}
        for dev_id, u in touched.items():
            old = self.devices.get(dev_id)
            if old is None or old.unit is not u:
                return None
            v = self._judge(u, devices, groups)
            self._judged[dev_id] = (
                tuple(devices.get(a) for a in u.addresses),
                None if u.group is None else groups.get(u.group),
            )
            if v != old.verdict:
                changed[dev_id] = Advertised(u, v)
        if not changed:
            return False
        for dev_id, adv in changed.items():
            self._log_health(dev_id, adv.verdict)
        self.devices = {**self.devices, **changed}
        self._publish(changed)
        return True

    def _log_health(self, dev_id: str, verdict: Verdict) -> None:
        log.warning(
            "%s: device %s is now %s%s",
            self.resource,
            dev_id,
            verdict.kubelet,
            f": {verdict.reason}" if verdict.reason else "",
        )

    # ---- publishing ---------------------------------------------------------------------
    def _published_hook(self, changed: Mapping[str, Advertised] | None) -> None:
        """For subclasses: the device set changed (``changed`` only, or None: anything)."""

    def _publish(self, changed: Mapping[str, Advertised] | None = None) -> None:
        self._published_hook(changed)
        healthy = sum(a.verdict.healthy for a in self.devices.values())
        self.metrics.set_devices(self.resource, healthy, len(self.devices) - healthy)
        self.generation += 1
        for listener in list(self._listeners):
            listener(changed)
        if self._on_change is not None:
            self._on_change()
        self._published.set()
        self._published = asyncio.Event()

    async def wait_published(self, after: int) -> int:
        while self.generation <= after:
            await self._published.wait()
        return self.generation

    def recheck(self, dev_id: str) -> Rechecked:
        """Re-read a unit this resource advertises before handing it out (see
        :func:`recheck_for_handout`), then what only this object knows (split group, held by
        the other front end); unknown IDs are refused too. Functions found changed are
        rescanned soon (``on_stale``)."""
        adv = self.devices.get(dev_id)
        if adv is None:
            raise UnitRefusedError(f"unknown device {dev_id!r} for this resource")
        try:
            checked = recheck_for_handout(self.sysfs, adv.unit, self.advertised_members(adv.unit))
        except UnitRefusedError as e:
            if self._on_stale is not None:
                self._on_stale(e.read)
            raise
        why = self.blocked(adv.unit)
        if why is not None:
            raise UnitRefusedError(f"device {dev_id} is not handed to a VM: {why}")
        return checked

    def blocked(self, unit: AllocUnit) -> str | None:
        """Why ``unit`` must not be handed out whatever the host says (see
        :meth:`_shared_verdict`), or None. Asked for every unit at every DRA refresh: nothing
        is built when no group is shared and nothing is held."""
        if not self.shared_groups and not self.held:
            return None
        return self._shared_verdict(unit, Verdict(True)).reason

    def advertised_members(self, unit: AllocUnit) -> tuple[PciAddress, ...] | None:
        """The group's members when ``unit`` was last judged (None: not judged since start)."""
        judged = self._judged.get(unit.id)
        return None if judged is None or judged[1] is None else judged[1].members


def _unit_facts(d: PciDevice) -> tuple[object, ...]:
    """What :func:`build_units` looks at: equal facts, equal units."""
    return (d.address, d.iommu_group, d.numa_node, d.physfn)


def advertised_to_json(adv: Advertised) -> dict[str, Any]:
    u = adv.unit
    return {
        "id": u.id,
        "addresses": [str(a) for a in u.addresses],
        "group": u.group,
        "numa": u.numa_node,
        "pf": None if u.pf is None else str(u.pf),
        "healthy": adv.verdict.healthy,
        "reason": adv.verdict.reason,
    }


def advertised_from_json(data: Mapping[str, Any]) -> Advertised:
    """Raises ValueError/KeyError/TypeError on malformed input (the caller drops the entry)."""
    try:
        addrs = tuple(PciAddress.parse(a) for a in data["addresses"])
        pf = None if data.get("pf") is None else PciAddress.parse(data["pf"])
    except PciAddressError as e:
        raise ValueError(str(e)) from None
    if not addrs and isinstance(data["id"], str) and UUID_RE.match(data["id"]):
        pass  # a mediated device instance: its UUID is its ID (hostdev.deviceplugin.mdev)
    elif not addrs or str(addrs[0]) != data["id"]:
        raise ValueError(f"entry {data.get('id')!r}: id must be its first address")
    group, numa = data.get("group"), data.get("numa")
    if not (group is None or isinstance(group, int)) or not (numa is None or isinstance(numa, int)):
        raise TypeError(f"entry {data['id']}: group and numa must be integers or null")
    unit = AllocUnit(id=data["id"], addresses=addrs, group=group, numa_node=numa, pf=pf)
    return Advertised(unit, Verdict(bool(data.get("healthy")), data.get("reason")))
