"""Safety guards: facts about what the host is using, and pure checks over them.

The facts are gathered once per plan by an I/O function
(:func:`hostdev.deviceplugin.config.facts.gather_facts`); every check here is pure and returns a
human reason (or ``None``) so a refusal always says exactly what is in the way.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from hostdev.host.address import PciAddress
from hostdev.host.model import Inventory, PciDevice


@dataclass(frozen=True, slots=True)
class GuardFacts:
    """What the host is using right now (all keyed so the checks are lookups)."""

    # netdevs the default route (IPv4 or IPv6) leaves through
    default_route_ifaces: frozenset[str] = frozenset()
    # up netdevs with an address -> the addresses ("203.0.113.5/32", "2001:db8::1/64")
    addressed_ifaces: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # up netdevs whose IPv4 addresses could not be read (the kernel's address list is out of
    # reach: not in the host's network namespace), so they may have one
    unverified_ifaces: frozenset[str] = frozenset()
    # PCI function -> mounted filesystems / swap on its block devices ("nvme0n1p2 on /")
    mounts: Mapping[PciAddress, tuple[str, ...]] = field(default_factory=dict)
    # PCI function -> /dev nodes its current driver exposes (/dev/nvme0, /dev/nvme0n1, ...)
    device_nodes: Mapping[PciAddress, tuple[str, ...]] = field(default_factory=dict)
    # /dev path -> who holds it open ("pid 812 (qemu-kvm)")
    open_nodes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # PCI function -> its driver_override, where one is set
    driver_overrides: Mapping[PciAddress, str] = field(default_factory=dict)
    # PCI function -> who it is allocated to ("pod vms/virt-launcher-a-x (example.com/vf)")
    allocated: Mapping[PciAddress, str] = field(default_factory=dict)
    # driverless VF -> the host driver the kernel would bind it to (its modalias match)
    would_bind: Mapping[PciAddress, str] = field(default_factory=dict)
    # PCI function -> why its state cannot be read now (a read timed out on the device lock)
    busy: Mapping[PciAddress, str] = field(default_factory=dict)


def default_route(dev: PciDevice, facts: GuardFacts) -> str | None:
    hit = sorted(set(dev.netdevs) & facts.default_route_ifaces)
    if hit:
        return f"{dev.address} carries the default route (via {', '.join(hit)})"
    return None


def addressed(dev: PciDevice, facts: GuardFacts) -> str | None:
    hits = [
        f"{n}: {', '.join(facts.addressed_ifaces[n])}"
        for n in dev.netdevs
        if n in facts.addressed_ifaces
    ]
    if hits:
        return f"{dev.address} has an address on an up interface ({'; '.join(hits)})"
    unknown = [n for n in dev.netdevs if n in facts.unverified_ifaces]
    if unknown:
        return (
            f"{dev.address}'s interface {', '.join(unknown)} is up and its IPv4 addresses cannot "
            "be read from this network namespace (run the agent with hostNetwork: see "
            "docs/security.md)"
        )
    return None


def mounted(dev: PciDevice, facts: GuardFacts) -> str | None:
    m = facts.mounts.get(dev.address)
    if m:
        return f"{dev.address} hosts a mounted filesystem ({', '.join(m)})"
    return None


def host_nodes_open(dev: PciDevice, facts: GuardFacts) -> str | None:
    held = [
        f"{node} by {', '.join(facts.open_nodes[node])}"
        for node in facts.device_nodes.get(dev.address, ())
        if node in facts.open_nodes
    ]
    if held:
        return f"{dev.address}'s device nodes are held open ({'; '.join(held)})"
    return None


def vfio_group_open(group: int | None, facts: GuardFacts) -> str | None:
    if group is None:
        return None
    node = f"/dev/vfio/{group}"
    who = facts.open_nodes.get(node)
    if who:
        return f"{node} is held open by {', '.join(who)} (a running VM owns the group)"
    return None


def vfio_in_use(dev: PciDevice, facts: GuardFacts) -> str | None:
    """A VFIO user holds the device: its group node, or its iommufd cdev, is open."""
    g = vfio_group_open(dev.iommu_group, facts)
    if g is not None:
        return g
    held = [
        f"{node} is held open by {', '.join(facts.open_nodes[node])}"
        for node in facts.device_nodes.get(dev.address, ())
        if node.startswith("/dev/vfio/") and node in facts.open_nodes
    ]
    return "; ".join(held) + " (a running VM owns the device)" if held else None


def in_use_reasons(dev: PciDevice, facts: GuardFacts) -> list[str]:
    """Everything that makes taking ``dev`` away from its current host driver unsafe
    (overridable per device with ``allowUnsafe``)."""
    return [
        r
        for r in (
            default_route(dev, facts),
            addressed(dev, facts),
            mounted(dev, facts),
            host_nodes_open(dev, facts),
        )
        if r is not None
    ]


def allocated(dev: PciDevice, facts: GuardFacts) -> str | None:
    who = facts.allocated.get(dev.address)
    return f"{dev.address} is allocated to {who}" if who else None


def vf_users(
    pf: PciDevice, inv: Inventory, facts: GuardFacts, wanted: Set[PciAddress] = frozenset()
) -> tuple[list[str], list[str]]:
    """Who uses the PF's current VFs, which a numVfs change or a PF driver change destroys:
    (a VM holds it through VFIO, it is allocated to a pod, or the desired state wants it;
    the host uses it: address, route, mount, open device node)."""
    held: list[str] = []
    host: list[str] = []
    for a in pf.virtfns:
        vf = inv.devices.get(a)
        if vf is None:
            continue
        g = vfio_in_use(vf, facts)
        if g is not None:
            held.append(f"VF {a} is in use: {g}")
        who = facts.allocated.get(a)
        if who:
            held.append(f"VF {a} is allocated to {who}")
        if a in wanted:
            held.append(f"VF {a} is wanted in the desired state")
        if not vf.on_vfio:
            host += [f"VF {r}" for r in in_use_reasons(vf, facts)]
    return held, host
