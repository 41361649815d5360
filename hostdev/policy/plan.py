"""The configuration planner: desired state + what the host has -> ordered steps or refusals.

Pure and state-based: the plan depends only on the desired state, the current inventory, the
guard facts and what hostdev remembers (original drivers, the PFs whose
``sriov_drivers_autoprobe`` it turned off), never on what a previous run did. So a node that
already matches plans nothing, and a run interrupted between two steps is finished by planning
again.

Order of a plan: restores first (free what is no longer wanted), then ``sriov_numvfs`` changes
(0 first when changing a non-zero count), then binds (a group's companions with it), then moves
to pinned host drivers. VFs that a numVfs change creates or destroys are planned in the next
round, once the kernel has made them (``pending`` says so).

Refusals hold back what depends on them: a PF whose numVfs change is refused keeps its VFs as
they are (no restores, no binds of them: they were planned for the new count), a refused group
keeps every member, and a device whose kernel state cannot be read now (``busy``) is not
touched. So a refusal leaves the refused PF or device, and everything that only served its
change, exactly as it was.

PF driver changes destroy the PF's VFs (the PF driver's remove disables SR-IOV). They are
refused while any VF is in use by a VM or the host, allocated to a pod or wanted in the desired
state, and otherwise only done with ``allowUnsafe``, saying how many VFs go.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from hostdev.host.address import PciAddress
from hostdev.host.model import VIABLE_HOST_DRIVERS, Inventory, PciDevice, is_vfio_driver
from hostdev.policy.guards import (
    GuardFacts,
    default_route,
    in_use_reasons,
    vf_users,
    vfio_in_use,
)
from hostdev.policy.nodeconfig import (
    DEFAULT_DRIVER,
    DeviceConfig,
    NodeConfig,
    PfConfig,
    contradiction,
    resolve_devices,
)

StepKind = Literal[
    "remember",
    "set-numvfs",
    "driver-override",
    "unbind",
    "probe",
    "forget",
    "remember-autoprobe",
    "set-autoprobe",
    "forget-autoprobe",
]

OVERRIDE_HINT = "set allowUnsafe: true on this entry to override"
_AUTOPROBE_WHY = "VFs for vfio-pci: no host driver may bind them before their driver_override"


@dataclass(frozen=True, slots=True)
class Step:
    """One write (or one state-file change). ``value``: the count for set-numvfs, the driver for
    driver-override ("" clears it), the driver being left for unbind, the original driver for
    remember ("" = none), "0"/"1" for the autoprobe kinds. ``expect``: the driver probe must end
    up on."""

    kind: StepKind
    address: PciAddress
    value: str = ""
    expect: str | None = None
    why: str = ""

    def describe(self) -> str:
        a = str(self.address)
        text = {
            "remember": f"remember original driver {self.value or '(none)'}",
            "set-numvfs": f"sriov_numvfs := {self.value}",
            "driver-override": (
                f"driver_override := {self.value}" if self.value else "driver_override := (clear)"
            ),
            "unbind": f"unbind from {self.value}",
            "probe": f"drivers_probe -> expect {self.expect}",
            "forget": "forget original driver",
            "remember-autoprobe": f"remember sriov_drivers_autoprobe {self.value}",
            "set-autoprobe": f"sriov_drivers_autoprobe := {self.value}",
            "forget-autoprobe": "forget sriov_drivers_autoprobe",
        }[self.kind]
        return f"{a}  {text}" + (f"  [{self.why}]" if self.why else "")

    def to_dict(self) -> dict[str, str | None]:
        return {
            "kind": self.kind,
            "address": str(self.address),
            "value": self.value,
            "expect": self.expect,
            "why": self.why,
        }


@dataclass(frozen=True, slots=True)
class Refusal:
    """An action the planner will not take, and every reason why. ``held``: steps held back with
    it (they only made sense together with the refused change)."""

    subject: str  # "0000:3b:00.0", "pf ens1f0", "group 7 (0000:17:00.0, 0000:17:00.1)"
    action: str  # "bind to vfio-pci", "set numVfs 4", "restore e1000e"
    reasons: tuple[str, ...]
    overridable: bool = False
    held: int = 0

    def describe(self) -> str:
        hint = f" ({OVERRIDE_HINT})" if self.overridable else ""
        kept = (
            f" [left as it is, with {self.held} dependent step(s) held back]" if self.held else ""
        )
        return f"{self.subject}: refused to {self.action}: {'; '.join(self.reasons)}{hint}{kept}"

    def to_dict(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "action": self.action,
            "reasons": list(self.reasons),
            "overridable": self.overridable,
            "held": self.held,
        }


@dataclass(frozen=True, slots=True)
class Plan:
    steps: tuple[Step, ...] = ()
    refusals: tuple[Refusal, ...] = ()
    pending: tuple[str, ...] = ()
    # resolved device -> resource name (what the device plugin should serve)
    resources: Mapping[PciAddress, str] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return not self.steps and not self.refusals and not self.pending

    def render(self) -> str:
        lines = [
            f"plan: {len(self.steps)} step(s), {len(self.refusals)} refusal(s), "
            f"{len(self.pending)} pending"
        ]
        lines += [f"  {i:3d}. {s.describe()}" for i, s in enumerate(self.steps, 1)]
        lines += [f"  REFUSED {r.describe()}" for r in self.refusals]
        lines += [f"  pending {p}" for p in self.pending]
        if self.converged:
            lines.append("  node is converged: nothing to do")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        return {
            "steps": [s.to_dict() for s in self.steps],
            "refusals": [r.to_dict() for r in self.refusals],
            "pending": list(self.pending),
            "converged": self.converged,
        }


def _find_pf(pfc: PfConfig, inv: Inventory) -> PciDevice | None:
    if pfc.address is not None:
        return inv.devices.get(pfc.address)
    for dev in inv.devices.values():
        if pfc.name in dev.netdevs:
            return dev
    return None


def _iommu_off_reason(inv: Inventory) -> str | None:
    if not inv.node.enabled:
        return (
            "the IOMMU is off on this node (no DMAR/IVRS units, no IOMMU groups): boot with "
            "intel_iommu=on or amd_iommu=on; without it a VM would get unrestricted DMA"
        )
    if not inv.node.vfio_modules.get("vfio_pci", False):
        return "the vfio-pci driver is not loaded: run `modprobe vfio-pci` (and load it at boot)"
    return None


def _future_vfs(pf: PciDevice, n: int) -> dict[PciAddress, PciDevice] | None:
    """The VFs ``sriov_numvfs := n`` will create, as discovery will see them (no driver yet);
    None when the PF does not say where they go."""
    out: dict[PciAddress, PciDevice] = {}
    for i in range(n):
        a = pf.vf_address(i)
        if a is None:
            return None
        out[a] = PciDevice(
            a,
            pf.vendor,
            pf.sriov_vf_device,
            None,
            None,
            pf.class_code,
            None,
            None,
            pf.numa_node,
            physfn=pf.address,
            vf_index=i,
        )
    return out


def _vf_range(pf: PciDevice) -> tuple[PciAddress, ...]:
    """Every address a VF of the PF has or can have: its VFs, and where the kernel puts VFs
    (a VF being removed has lost its links to the PF already, but not its address)."""
    predicted = (pf.vf_address(i) for i in range(pf.sriov_totalvfs or 0))
    return tuple(dict.fromkeys((*pf.virtfns, *(a for a in predicted if a is not None))))


def vfs_meant_for_vfio(config: NodeConfig, inv: Inventory, pf: PciDevice, n: int) -> bool:
    """Whether the desired state puts any of the ``n`` VFs the PF is about to get on a VFIO
    driver (resolved against the VFs as they will appear)."""
    future = _future_vfs(pf, n)
    if future is None:  # fall back to rules naming the PF in pfNames
        names = {str(pf.address), *pf.netdevs}
        return any(
            is_vfio_driver(r.driver) and any(p.pf in names for p in r.selector.pf_names)
            for r in config.rules
        )
    devices = {**inv.devices, pf.address: replace(pf, virtfns=tuple(future)), **future}
    wishes = resolve_devices(config, replace(inv, devices=devices)).devices
    return any(a in wishes and wishes[a].wants_vfio for a in future)


class _Planner:
    """One plan's working state; :func:`plan` is the pure entry point."""

    def __init__(
        self,
        config: NodeConfig,
        inv: Inventory,
        facts: GuardFacts,
        originals: Mapping[PciAddress, str | None],
        autoprobe: Mapping[PciAddress, bool],
    ) -> None:
        self.config = config
        self.inv = inv
        self.facts = facts
        self.originals = originals
        self.autoprobe = autoprobe  # PF -> its autoprobe before hostdev turned it off
        self.refusals: list[Refusal] = []
        self.pending: list[str] = []
        self.restore_steps: list[Step] = []
        self.pf_steps: list[Step] = []
        self.bind_steps: list[Step] = []
        self.pin_steps: list[Step] = []
        self.changing: set[PciAddress] = set()  # PFs whose numVfs changes
        self.vanishing: set[PciAddress] = set()  # VFs the plan destroys
        self.keep: set[PciAddress] = set()  # never restored this round
        # PFs whose numVfs change is refused, and their VFs -> index of that refusal: left as
        # they are (what was planned for them assumed the new count)
        self.frozen: dict[PciAddress, int] = {}
        self.autoprobe_kept: set[PciAddress] = set()  # PFs that turn (or keep) autoprobe off
        resolved = resolve_devices(config, inv)
        conflicted = {a for a, _ in resolved.conflicts}
        for a, why in resolved.conflicts:
            self.refuse(Refusal(str(a), "configure", (why,)))
        self.desired = {a: d for a, d in resolved.devices.items() if a not in conflicted}
        self.contradicted: set[PfConfig] = set()
        self.pinned: dict[PciAddress, DeviceConfig] = {}  # desired on a host driver (binds())

    # ---- helpers ----------------------------------------------------------------------------
    def refuse(self, r: Refusal, freeze: Iterable[PciAddress] = ()) -> None:
        self.refusals.append(r)
        for a in freeze:
            self.frozen.setdefault(a, len(self.refusals) - 1)

    def remembered_original(self, dev: PciDevice) -> str:
        """What a device's original driver is: the one it is on, or for a VF that came up
        driverless only because hostdev turned its PF's autoprobe off, the host VF driver the
        kernel would have bound."""
        if dev.driver is not None:
            return dev.driver
        if dev.physfn is not None and dev.physfn in self.autoprobe:
            return self.facts.would_bind.get(dev.address, "")
        return ""

    def move_steps(self, dev: PciDevice, target: str, why: str) -> list[Step]:
        """driver_override + unbind + drivers_probe, remembering the original driver first."""
        a = dev.address
        out: list[Step] = []
        if a not in self.originals:
            out.append(Step("remember", a, self.remembered_original(dev), why=why))
        if self.facts.driver_overrides.get(a) != target:
            out.append(Step("driver-override", a, target, why=why))
        if dev.driver is not None:
            out.append(Step("unbind", a, dev.driver, why=why))
        out.append(Step("probe", a, expect=target, why=why))
        return out

    def pf_move(
        self, dev: PciDevice, target: str
    ) -> tuple[list[str], list[str], tuple[PciAddress, ...]]:
        """A driver change of a PF that has VFs destroys them: (hard reasons, soft reasons, the
        VFs it destroys). Nothing to say for other devices, or VFs already being destroyed."""
        vfs = tuple(v for v in dev.virtfns if v not in self.vanishing)
        if not vfs:
            return [], [], ()
        held, host = vf_users(dev, self.inv, self.facts, set(self.desired))
        what = (
            f"moving PF {dev.address} from {dev.driver or 'no driver'} to {target} destroys its "
            f"{len(vfs)} VF(s) ({', '.join(str(v) for v in vfs)})"
        )
        return held + host, [what], vfs

    # ---- 0. contradictions ------------------------------------------------------------------
    def contradictions(self) -> None:
        for pfc in self.config.pfs:
            pf = _find_pf(pfc, self.inv)
            d = self.desired.get(pf.address) if pf is not None else None
            why = contradiction(pfc, d) if d is not None else None
            if pf is None or d is None or why is None:
                continue
            self.contradicted.add(pfc)
            del self.desired[pf.address]
            action = f"bind to {d.driver} with numVfs {pfc.num_vfs}"
            self.refuse(Refusal(str(pf.address), action, (why,)), (pf.address, *_vf_range(pf)))

    # ---- 1. SR-IOV: numVfs per PF -----------------------------------------------------------
    def numvfs(self) -> None:
        for pfc in self.config.pfs:
            if pfc not in self.contradicted:
                self.numvfs_of(pfc)
        if self.changing:
            self.pending.append(
                "VFs of "
                + ", ".join(str(a) for a in sorted(self.changing))
                + " are configured once the kernel has created them (next round)"
            )

    def numvfs_of(self, pfc: PfConfig) -> None:
        inv, facts = self.inv, self.facts
        pf = _find_pf(pfc, inv)
        action = f"set numVfs {pfc.num_vfs}"
        if pf is None:
            what = (
                f"PF {pfc.address} is not on this node"
                if pfc.address is not None
                else f"no PCI function has a netdev named {pfc.name}"
            )
            self.refuse(Refusal(pfc.label, action, (what,)))
            return
        if not pf.is_pf:
            self.refuse(
                Refusal(str(pf.address), action, ("not SR-IOV capable (no sriov_totalvfs)",))
            )
            return
        if pf.busy is not None:
            self.refuse(Refusal(str(pf.address), action, (pf.busy,)), (pf.address, *_vf_range(pf)))
            return
        cur = pf.sriov_numvfs or 0
        if cur == pfc.num_vfs:
            return
        original = self.originals.get(pf.address)
        if (pf.driver is None or pf.on_vfio) and original and pf.address not in self.desired:
            # hostdev moved the PF and this plan gives it back: its VFs once it is there
            self.pending.append(f"numVfs of {pf.address} once it is back on {original}")
            return
        hard: list[str] = []
        soft: list[str] = []
        total = pf.sriov_totalvfs or 0
        if pfc.num_vfs > total:
            hard.append(f"numVfs {pfc.num_vfs} is above sriov_totalvfs {total}")
        if pf.driver is None:
            hard.append(
                "the PF has no driver, so the kernel cannot change its VFs (ENOENT): "
                "bind the PF to its host driver first"
            )
        elif pf.on_vfio:
            hard.append(
                f"the PF is on {pf.driver}, which makes no VFs for the host (vfio-pci's own "
                "SR-IOV enable is off by default): give the PF back to its host driver"
                + (f" ({original})" if original else "")
                + " first"
            )
        r = default_route(pf, facts)
        if r is not None:
            soft.append(r + "; changing VFs resets the PF's link on many NICs")
        if cur:
            held, host = vf_users(pf, inv, facts)
            hard += held
            soft += host
        if hard or (soft and not pfc.allow_unsafe):
            self.refuse(
                Refusal(str(pf.address), action, tuple(hard + soft), overridable=not hard),
                (pf.address, *_vf_range(pf)),
            )
            return
        a = pf.address
        why = f"numVfs {cur} -> {pfc.num_vfs}"
        if pfc.num_vfs and vfs_meant_for_vfio(self.config, inv, pf, pfc.num_vfs):
            self.autoprobe_kept.add(a)
            if pf.sriov_autoprobe:
                if a not in self.autoprobe:
                    self.pf_steps.append(Step("remember-autoprobe", a, "1", why=_AUTOPROBE_WHY))
                self.pf_steps.append(Step("set-autoprobe", a, "0", why=_AUTOPROBE_WHY))
        if cur:
            self.pf_steps.append(
                Step("set-numvfs", a, "0", why=why + " (0 first)" if pfc.num_vfs else why)
            )
            # Destroyed VFs lose their remembered drivers: new ones are remembered afresh.
            self.vanishing.update(pf.virtfns)
            self.pf_steps += [
                Step("forget", v, why="VF removed") for v in pf.virtfns if v in self.originals
            ]
        if pfc.num_vfs:
            self.pf_steps.append(Step("set-numvfs", a, str(pfc.num_vfs), why=why))
        self.changing.add(a)

    # ---- 2. devices that must be on vfio-pci, group by group -----------------------------
    def binds(self) -> None:
        inv = self.inv
        self.pinned = {a: d for a, d in self.desired.items() if not d.wants_vfio}
        wants = {a: d for a, d in self.desired.items() if d.wants_vfio}
        units: dict[int, list[DeviceConfig]] = {}
        iommu_off = _iommu_off_reason(inv)
        for a, d in wants.items():
            self.keep.add(a)
            if a in self.vanishing:
                continue
            dev = inv.devices.get(a)
            if dev is None:
                if self.changing:
                    continue  # may be a VF the kernel is about to create
                self.refuse(Refusal(str(a), f"bind to {d.driver}", ("not present on this node",)))
                continue
            if iommu_off is not None:
                if dev.driver != d.driver:
                    self.refuse(Refusal(str(a), f"bind to {d.driver}", (iommu_off,)))
                continue
            if dev.iommu_group is None:
                self.refuse(
                    Refusal(str(a), f"bind to {d.driver}", ("the device has no IOMMU group",))
                )
                continue
            units.setdefault(dev.iommu_group, []).append(d)
        for number, wanted in sorted(units.items()):
            self.bind_group(number, wanted)

    def bind_group(self, number: int, wanted: list[DeviceConfig]) -> None:
        inv, facts = self.inv, self.facts
        pins = self.pinned
        group = inv.groups.get(number)
        members = group.members if group is not None else tuple(d.address for d in wanted)
        wanted_addrs = {d.address for d in wanted}
        companions = [
            m
            for m in members
            if m not in wanted_addrs
            and m in inv.devices
            and not inv.devices[m].is_bridge
            and m not in self.vanishing
        ]
        self.keep.update(companions)
        hard: list[str] = []
        soft: list[str] = []
        for c in companions:
            pin = pins.get(c)
            if pin is not None:
                hard.append(
                    f"group {number} also holds {c}, which must stay on host driver {pin.driver} "
                    "(pinned in the desired state): binding the rest would leave the group "
                    "not viable"
                )
        unsafe_ok = all(d.allow_unsafe for d in wanted)
        movers: list[tuple[PciDevice, str, str]] = []
        for d in wanted:
            dev = inv.devices[d.address]
            # a vfio-pci variant driver (mlx5_vfio_pci, ...) already satisfies "vfio-pci"
            if dev.driver != d.driver and not (d.driver == DEFAULT_DRIVER and dev.on_vfio):
                movers.append((dev, d.driver, f"bind to {d.driver}"))
        for c in companions:
            dev = inv.devices[c]
            if c in pins or is_vfio_driver(dev.driver):
                continue
            if dev.driver is None and c not in self.originals:
                continue  # driverless keeps the group viable; finish only what hostdev began
            if dev.driver in VIABLE_HOST_DRIVERS:
                continue  # pci-stub keeps the group viable: leave it
            movers.append((dev, "vfio-pci", f"group {number} companion"))
        if not movers:
            return
        destroyed: dict[PciAddress, tuple[PciAddress, ...]] = {}
        for dev, target, _ in movers:
            if dev.driver is not None and not is_vfio_driver(dev.driver):
                soft += in_use_reasons(dev, facts)
            h, s, vfs = self.pf_move(dev, target)
            hard += h
            soft += s
            if vfs:
                destroyed[dev.address] = vfs
        if hard or (soft and not unsafe_ok):
            subject = f"group {number} ({', '.join(str(m) for m in members)})"
            target = ", ".join(sorted({t for _, t, _ in movers}))
            self.refuse(
                Refusal(subject, f"bind to {target}", tuple(hard + soft), overridable=not hard)
            )
            return
        for dev, target, why in movers:
            self.bind_steps += self.move_steps(dev, target, self.destroys(dev, why, destroyed))

    def destroys(
        self, dev: PciDevice, why: str, destroyed: Mapping[PciAddress, tuple[PciAddress, ...]]
    ) -> str:
        """The step reason, plus the VFs a PF's move destroys (which then vanish from the plan)."""
        vfs = destroyed.get(dev.address, ())
        if not vfs:
            return why
        self.vanishing.update(vfs)
        self.pf_steps += [Step("forget", v, why="VF removed") for v in vfs if v in self.originals]
        self.pending.append(f"the VFs of {dev.address} go with its driver")
        return f"{why}; destroys its {len(vfs)} VF(s) (allowUnsafe)"

    # ---- 3. devices pinned to a host driver ---------------------------------------------
    def pins(self) -> None:
        inv, facts = self.inv, self.facts
        for a, d in self.desired.items():
            if d.wants_vfio:
                continue
            self.keep.add(a)
            dev = inv.devices.get(a)
            if dev is None or a in self.vanishing:
                if dev is None and not self.changing:
                    self.refuse(
                        Refusal(str(a), f"keep on {d.driver}", ("not present on this node",))
                    )
                continue
            if dev.driver == d.driver:
                continue
            hard: list[str] = []
            if dev.on_vfio:
                g = vfio_in_use(dev, facts)
                if g is not None:
                    hard.append(g)
            soft = in_use_reasons(dev, facts) if dev.driver is not None and not dev.on_vfio else []
            h, s, vfs = self.pf_move(dev, d.driver)
            hard += h
            soft += s
            if hard or (soft and not d.allow_unsafe):
                self.refuse(
                    Refusal(str(a), f"bind to {d.driver}", tuple(hard + soft), overridable=not hard)
                )
                continue
            why = self.destroys(dev, f"bind to {d.driver}", {a: vfs})
            self.pin_steps += self.move_steps(dev, d.driver, why)

    # ---- 4. restore what hostdev moved and nobody wants any more -------------------------
    def restores(self) -> None:
        inv, facts = self.inv, self.facts
        for a, original in sorted(self.originals.items()):
            if a in self.keep or a in self.vanishing:
                continue
            dev = inv.devices.get(a)
            if dev is None:
                self.restore_steps.append(Step("forget", a, why="device is gone"))
                continue
            override = facts.driver_overrides.get(a)
            if dev.driver == original and override is None:
                why = f"already on {original or 'no driver'}"
                self.restore_steps.append(Step("forget", a, why=why))
                continue
            action = f"restore {original or 'no driver'}"
            if dev.on_vfio:
                g = vfio_in_use(dev, facts)
                if g is not None:
                    self.refuse(Refusal(str(a), action, (g,)))
                    continue
            elif dev.driver is not None and dev.driver != original:
                # moved to another host driver (a pin that is gone): taking it away must be safe
                busy = in_use_reasons(dev, facts)
                if busy:
                    self.refuse(Refusal(str(a), action, tuple(busy)))
                    continue
            h, s, _ = self.pf_move(dev, original or "no driver")
            if h or s:
                fix = "list the PF in pfs with numVfs: 0 first, then remove it"
                self.refuse(Refusal(str(a), action, (*h, *s, fix)))
                continue
            self.restore_steps += self.restore_steps_of(dev, original, override, action)

    def restore_steps_of(
        self, dev: PciDevice, original: str | None, override: str | None, why: str
    ) -> list[Step]:
        a = dev.address
        # A VF whose PF does not probe by itself binds only to what its override names.
        pf = self.inv.devices.get(dev.physfn) if dev.physfn is not None else None
        pinned = pf is not None and pf.sriov_autoprobe is False and original is not None
        out: list[Step] = []
        if pinned and original not in (override, dev.driver):
            out.append(Step("driver-override", a, original or "", why=why))
        elif override is not None and not pinned:
            out.append(Step("driver-override", a, "", why=why))
        if dev.driver is not None and dev.driver != original:
            out.append(Step("unbind", a, dev.driver, why=why))
        if original is not None and dev.driver != original:
            out.append(Step("probe", a, expect=original, why=why))
        if pinned and (override is not None or dev.driver != original):
            out.append(Step("driver-override", a, "", why=why))
        out.append(Step("forget", a, why=why))
        return out

    # ---- held back: what depends on a refusal, and devices that are busy ------------------
    def hold_back(self, steps: list[Step]) -> list[Step]:
        inv = self.inv
        frozen = dict(self.frozen)
        busy: dict[PciAddress, str] = {}
        for dev in inv.devices.values():
            why = dev.busy or self.facts.busy.get(dev.address)
            if why is not None and dev.address not in frozen:
                busy[dev.address] = f"{dev.address}: {why}"
        # A busy PF's VFs go with it, by address: a VF being removed (a PF's unbind waiting for
        # its VFIO user) has lost its driver, physfn and virtfn links already.
        busy_roots = dict(busy)
        for a, why in busy.items():
            for vf in _vf_range(inv.devices[a]):
                busy_roots.setdefault(vf, why)

        def group_of(a: PciAddress) -> tuple[PciAddress, ...]:
            dev = inv.devices.get(a)
            g = inv.group_of(dev) if dev is not None else None
            return g.members if g is not None else (a,)

        held: dict[int, int] = {}
        busy_held: dict[str, set[PciAddress]] = {}
        out: list[Step] = []
        for s in steps:
            if s.address in self.vanishing and s.kind != "forget":
                continue  # destroyed by this plan: nothing to do on it
            hit = [m for m in group_of(s.address) if m in frozen]
            if hit:
                held[frozen[hit[0]]] = held.get(frozen[hit[0]], 0) + 1
                continue
            why = next((busy_roots[m] for m in group_of(s.address) if m in busy_roots), None)
            if why is not None:
                busy_held.setdefault(why, set()).add(s.address)
                continue
            out.append(s)
        for i, n in held.items():
            self.refusals[i] = replace(self.refusals[i], held=n)
        for why, addrs in busy_held.items():
            subject = ", ".join(str(a) for a in sorted(addrs))
            self.refusals.append(
                Refusal(subject, "change it now", (why + " (retried at the next sync)",))
            )
        return out

    # ---- 5. autoprobe back on, once the VFs it protected are bound ---------------------------
    def release_autoprobe(self, steps: list[Step]) -> list[Step]:
        """``sriov_drivers_autoprobe`` stays off only from VF creation until the VFs meant for
        vfio-pci have their driver_override and are bound. Then it gets its remembered value
        back (at the end of the plan, after those binds), and the PF's other new VFs are probed
        to the host VF driver the kernel would have bound them to."""
        out: list[Step] = []
        probing = {s.address for s in steps if s.kind == "probe" and is_vfio_driver(s.expect)}
        for a, old in sorted(self.autoprobe.items()):
            pf = self.inv.devices.get(a)
            if pf is None:
                out.append(Step("forget-autoprobe", a, why="PF is gone"))
                continue
            if a in self.autoprobe_kept or a in self.frozen:
                continue
            vfs = [self.inv.devices[v] for v in pf.virtfns if v in self.inv.devices]
            unbound = [
                v.address
                for v in vfs
                if v.address in self.desired
                and self.desired[v.address].wants_vfio
                and not v.on_vfio
                and v.address not in probing
            ]
            if unbound:
                continue  # a VF for vfio-pci is still without its driver (refused, held back)
            why = "the VFs for vfio-pci are bound"
            if pf.sriov_autoprobe is not old:
                out.append(Step("set-autoprobe", a, str(int(old)), why=why))
            out.append(Step("forget-autoprobe", a, why=why))
            for v in vfs:
                host = self.facts.would_bind.get(v.address)
                if (
                    old
                    and host is not None
                    and v.driver is None
                    and v.address not in self.desired
                    and v.address not in self.originals
                ):
                    why = "the host VF driver it would have had with autoprobe on"
                    out.append(Step("probe", v.address, expect=host, why=why))
        return out

    def run(self) -> Plan:
        self.contradictions()
        self.numvfs()
        self.binds()
        self.pins()
        self.restores()
        steps = self.hold_back(
            self.restore_steps + self.pf_steps + self.bind_steps + self.pin_steps
        )
        steps += self.release_autoprobe(steps)
        resources = {a: d.resource_name for a, d in self.desired.items() if d.resource_name}
        return Plan(
            steps=tuple(steps),
            refusals=tuple(self.refusals),
            pending=tuple(dict.fromkeys(self.pending)),
            resources=resources,
        )


def plan(
    config: NodeConfig,
    inv: Inventory,
    facts: GuardFacts,
    originals: Mapping[PciAddress, str | None],
    autoprobe: Mapping[PciAddress, bool] | None = None,
) -> Plan:
    """Compute the steps that take the node from ``inv`` to ``config``, or say why not.
    ``autoprobe``: the PFs whose ``sriov_drivers_autoprobe`` hostdev turned off, with the value
    to give back."""
    return _Planner(config, inv, facts, originals, autoprobe or {}).run()


def touched(steps: Iterable[Step]) -> tuple[PciAddress, ...]:
    """The devices a plan writes to, in first-touch order (for status and logs)."""
    seen: dict[PciAddress, None] = {}
    for s in steps:
        seen.setdefault(s.address, None)
    return tuple(seen)
