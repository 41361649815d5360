"""The configuration planner: desired state + what the host has -> ordered steps or refusals.

Pure and state-based: the plan depends only on the desired state, the current inventory, the
guard facts and the remembered original drivers, never on what a previous run did. So a node
that already matches plans nothing, and a run interrupted between two steps is finished by
planning again.

Order of a plan: restores first (free what is no longer wanted), then ``sriov_numvfs`` changes
(0 first when changing a non-zero count), then binds (a group's companions with it), then moves
to pinned host drivers. VFs that a numVfs change creates or destroys are planned in the next
round, once the kernel has made them (``pending`` says so).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from hostdev.host.address import PciAddress
from hostdev.host.model import VIABLE_HOST_DRIVERS, Inventory, PciDevice, is_vfio_driver
from hostdev.policy.guards import (
    GuardFacts,
    default_route,
    in_use_reasons,
    vfio_in_use,
)
from hostdev.policy.nodeconfig import (
    DEFAULT_DRIVER,
    DeviceConfig,
    NodeConfig,
    PfConfig,
    resolve_devices,
)

StepKind = Literal["remember", "set-numvfs", "driver-override", "unbind", "probe", "forget"]

OVERRIDE_HINT = "set allowUnsafe: true on this entry to override"


@dataclass(frozen=True, slots=True)
class Step:
    """One write (or one state-file change). ``value``: the count for set-numvfs, the driver for
    driver-override ("" clears it), the driver being left for unbind, the original driver for
    remember ("" = none). ``expect``: the driver probe must end up on."""

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
    """An action the planner will not take, and every reason why."""

    subject: str  # "0000:3b:00.0", "pf ens1f0", "group 7 (0000:17:00.0, 0000:17:00.1)"
    action: str  # "bind to vfio-pci", "set numVfs 4", "restore e1000e"
    reasons: tuple[str, ...]
    overridable: bool = False

    def describe(self) -> str:
        hint = f" ({OVERRIDE_HINT})" if self.overridable else ""
        return f"{self.subject}: refused to {self.action}: {'; '.join(self.reasons)}{hint}"

    def to_dict(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "action": self.action,
            "reasons": list(self.reasons),
            "overridable": self.overridable,
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


def _move_steps(
    dev: PciDevice,
    target: str,
    override: str | None,
    originals: Mapping[PciAddress, str | None],
    why: str,
) -> list[Step]:
    """driver_override + unbind + drivers_probe, remembering the original driver first."""
    a = dev.address
    out: list[Step] = []
    if a not in originals:
        out.append(Step("remember", a, dev.driver or "", why=why))
    if override != target:
        out.append(Step("driver-override", a, target, why=why))
    if dev.driver is not None:
        out.append(Step("unbind", a, dev.driver, why=why))
    out.append(Step("probe", a, expect=target, why=why))
    return out


def _restore_steps(
    dev: PciDevice, original: str | None, override: str | None, why: str
) -> list[Step]:
    a = dev.address
    out: list[Step] = []
    if override is not None:
        out.append(Step("driver-override", a, "", why=why))
    if dev.driver is not None and dev.driver != original:
        out.append(Step("unbind", a, dev.driver, why=why))
    if original is not None and dev.driver != original:
        out.append(Step("probe", a, expect=original, why=why))
    out.append(Step("forget", a, why=why))
    return out


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


def plan(
    config: NodeConfig,
    inv: Inventory,
    facts: GuardFacts,
    originals: Mapping[PciAddress, str | None],
) -> Plan:
    """Compute the steps that take the node from ``inv`` to ``config``, or say why not."""
    refusals: list[Refusal] = []
    pending: list[str] = []
    restore_steps: list[Step] = []
    pf_steps: list[Step] = []
    bind_steps: list[Step] = []
    pin_steps: list[Step] = []
    ov = facts.driver_overrides

    resolved = resolve_devices(config, inv)
    conflicted = {a for a, _ in resolved.conflicts}
    for a, why in resolved.conflicts:
        refusals.append(Refusal(str(a), "configure", (why,)))
    desired = {a: d for a, d in resolved.devices.items() if a not in conflicted}

    # ---- 1. SR-IOV: numVfs per PF -----------------------------------------------------------
    changing: set[PciAddress] = set()
    vanishing: set[PciAddress] = set()  # VFs the change destroys
    for pfc in config.pfs:
        pf = _find_pf(pfc, inv)
        action = f"set numVfs {pfc.num_vfs}"
        if pf is None:
            what = (
                f"PF {pfc.address} is not on this node"
                if pfc.address is not None
                else f"no PCI function has a netdev named {pfc.name}"
            )
            refusals.append(Refusal(pfc.label, action, (what,)))
            continue
        if not pf.is_pf:
            refusals.append(
                Refusal(str(pf.address), action, ("not SR-IOV capable (no sriov_totalvfs)",))
            )
            continue
        cur = pf.sriov_numvfs or 0
        if cur == pfc.num_vfs:
            continue
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
        r = default_route(pf, facts)
        if r is not None:
            soft.append(r + "; changing VFs resets the PF's link on many NICs")
        for vf_addr in pf.virtfns if cur else ():
            vf = inv.devices.get(vf_addr)
            if vf is None:
                continue
            g = vfio_in_use(vf, facts)
            if g is not None:
                hard.append(f"VF {vf_addr} is in use: {g}")
            soft += [f"VF {r}" for r in in_use_reasons(vf, facts)]
        if hard or (soft and not pfc.allow_unsafe):
            refusals.append(
                Refusal(str(pf.address), action, tuple(hard + soft), overridable=not hard)
            )
            continue
        a = pf.address
        why = f"numVfs {cur} -> {pfc.num_vfs}"
        if cur:
            pf_steps.append(
                Step("set-numvfs", a, "0", why=why + " (0 first)" if pfc.num_vfs else why)
            )
            # Destroyed VFs lose their remembered drivers: new ones are remembered afresh.
            vanishing.update(pf.virtfns)
            pf_steps += [Step("forget", v, why="VF removed") for v in pf.virtfns if v in originals]
        if pfc.num_vfs:
            pf_steps.append(Step("set-numvfs", a, str(pfc.num_vfs), why=why))
        changing.add(a)
    if changing:
        pending.append(
            "VFs of "
            + ", ".join(str(a) for a in sorted(changing))
            + " are configured once the kernel has created them (next round)"
        )

    # ---- 2. devices that must be on vfio-pci, group by group -----------------------------
    wants = {a: d for a, d in desired.items() if d.wants_vfio}
    pins = {a: d for a, d in desired.items() if not d.wants_vfio}
    keep: set[PciAddress] = set()  # never restored this round
    units: dict[int, list[DeviceConfig]] = {}
    iommu_off = _iommu_off_reason(inv)
    for a, d in wants.items():
        keep.add(a)
        if a in vanishing:
            continue
        dev = inv.devices.get(a)
        if dev is None:
            if changing:
                continue  # may be a VF the kernel is about to create
            refusals.append(Refusal(str(a), f"bind to {d.driver}", ("not present on this node",)))
            continue
        if iommu_off is not None:
            if dev.driver != d.driver:
                refusals.append(Refusal(str(a), f"bind to {d.driver}", (iommu_off,)))
            continue
        if dev.iommu_group is None:
            refusals.append(
                Refusal(str(a), f"bind to {d.driver}", ("the device has no IOMMU group",))
            )
            continue
        units.setdefault(dev.iommu_group, []).append(d)

    for number, wanted in sorted(units.items()):
        group = inv.groups.get(number)
        members = group.members if group is not None else tuple(d.address for d in wanted)
        wanted_addrs = {d.address for d in wanted}
        companions = [
            m
            for m in members
            if m not in wanted_addrs
            and m in inv.devices
            and not inv.devices[m].is_bridge
            and m not in vanishing
        ]
        keep.update(companions)
        hard = []
        soft = []
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
            if dev.driver is None and c not in originals:
                continue  # driverless keeps the group viable; finish only what hostdev began
            if dev.driver in VIABLE_HOST_DRIVERS:
                continue  # pci-stub keeps the group viable: leave it
            movers.append((dev, "vfio-pci", f"group {number} companion"))
        if not movers:
            continue
        for dev, _, _ in movers:
            if dev.driver is not None and not is_vfio_driver(dev.driver):
                soft += in_use_reasons(dev, facts)
        if hard or (soft and not unsafe_ok):
            subject = f"group {number} ({', '.join(str(m) for m in members)})"
            target = ", ".join(sorted({t for _, t, _ in movers}))
            refusals.append(
                Refusal(subject, f"bind to {target}", tuple(hard + soft), overridable=not hard)
            )
            continue
        for dev, target, why in movers:
            bind_steps += _move_steps(dev, target, ov.get(dev.address), originals, why)

    # ---- 3. devices pinned to a host driver ---------------------------------------------
    for a, d in pins.items():
        keep.add(a)
        dev = inv.devices.get(a)
        if dev is None or a in vanishing:
            if dev is None and not changing:
                refusals.append(
                    Refusal(str(a), f"keep on {d.driver}", ("not present on this node",))
                )
            continue
        if dev.driver == d.driver:
            continue
        hard = []
        if dev.on_vfio:
            g = vfio_in_use(dev, facts)
            if g is not None:
                hard.append(g)
        soft = in_use_reasons(dev, facts) if dev.driver is not None and not dev.on_vfio else []
        if hard or (soft and not d.allow_unsafe):
            refusals.append(
                Refusal(str(a), f"bind to {d.driver}", tuple(hard + soft), overridable=not hard)
            )
            continue
        pin_steps += _move_steps(dev, d.driver, ov.get(a), originals, f"bind to {d.driver}")

    # ---- 4. restore what hostdev moved and nobody wants any more -------------------------
    for a, original in sorted(originals.items()):
        if a in keep or a in vanishing:
            continue
        dev = inv.devices.get(a)
        if dev is None:
            restore_steps.append(Step("forget", a, why="device is gone"))
            continue
        override = ov.get(a)
        if dev.driver == original and override is None:
            restore_steps.append(Step("forget", a, why=f"already on {original or 'no driver'}"))
            continue
        action = f"restore {original or 'no driver'}"
        if dev.on_vfio:
            g = vfio_in_use(dev, facts)
            if g is not None:
                refusals.append(Refusal(str(a), action, (g,)))
                continue
        elif dev.driver is not None and dev.driver != original:
            # moved to another host driver (a pin that is gone): taking it away must be safe
            busy = in_use_reasons(dev, facts)
            if busy:
                refusals.append(Refusal(str(a), action, tuple(busy)))
                continue
        restore_steps += _restore_steps(dev, original, override, action)

    resources = {a: d.resource_name for a, d in desired.items() if d.resource_name}
    return Plan(
        steps=tuple(restore_steps + pf_steps + bind_steps + pin_steps),
        refusals=tuple(refusals),
        pending=tuple(pending),
        resources=resources,
    )


def touched(steps: Iterable[Step]) -> tuple[PciAddress, ...]:
    """The devices a plan writes to, in first-touch order (for status and logs)."""
    seen: dict[PciAddress, None] = {}
    for s in steps:
        seen.setdefault(s.address, None)
    return tuple(seen)
