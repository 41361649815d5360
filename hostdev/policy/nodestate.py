"""PassthroughPolicies + node labels -> PassthroughNodeState specs and policy status. Pure.

Precedence between policies: higher ``priority`` first, then the older policy (creation
timestamp), then the lexically first name. The spec shape is :mod:`hostdev.policy.nodeconfig`'s,
so the node agent parses exactly what is rendered here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hostdev.host.address import PciAddress, PciAddressError
from hostdev.host.model import Inventory, PciDevice, is_vfio_driver
from hostdev.policy.allocation import AllocUnit, build_units, multi_function_note
from hostdev.policy.frontends import ALLOCATIONS, DEVICE_PLUGIN, DRA, Allocation
from hostdev.policy.labels import LabelSelector, LabelSelectorError
from hostdev.policy.mdev import MdevSpec, MdevSpecError
from hostdev.policy.naming import env_collisions
from hostdev.policy.reported import ReportedNode
from hostdev.policy.selector import DeviceSelector, PfRange, SelectorError

DEFAULT_DRIVER = "vfio-pci"
ENV_COLLISION = "EnvVarCollision"  # Conflict.reason: the policy renders nothing on that node
# Conflict.reason: the policy puts a PF on vfio-pci that another gives VFs (the agent refuses both)
CONTRADICTION = "Contradiction"


class PolicyError(ValueError):
    """A policy the operator cannot use; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    resource_name: str
    node_selector: LabelSelector
    selector: DeviceSelector
    selector_spec: Mapping[str, Any]  # the camelCase form, rendered into NodeState specs
    num_vfs: int | None
    driver: str
    priority: int
    created: str  # RFC 3339 creationTimestamp: sorts chronologically as a string
    generation: int = 0
    allocation: Allocation = DEVICE_PLUGIN
    uid: str = ""
    mdev: MdevSpec | None = None  # mediated-device instances instead of PCI functions
    mdev_spec: Mapping[str, Any] | None = None  # its camelCase form, for NodeState specs

    @property
    def dra(self) -> bool:
        return self.allocation == DRA

    @property
    def precedence(self) -> tuple[int, str, str]:
        return (-self.priority, self.created, self.name)

    @staticmethod
    def from_object(obj: Mapping[str, Any]) -> Policy:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        name = str(meta.get("name", ""))
        resource = spec.get("resourceName")
        if not isinstance(resource, str) or "/" not in resource:
            raise PolicyError(f"policy {name}: spec.resourceName must be domain/name")
        raw_selector = spec.get("selector") or {}
        raw_mdev = spec.get("mdev")
        try:
            selector = DeviceSelector.from_dict(raw_selector)
            node_selector = LabelSelector.from_dict(spec.get("nodeSelector"))
            mdev = None if raw_mdev is None else MdevSpec.from_dict(raw_mdev)
        except (SelectorError, LabelSelectorError, MdevSpecError) as e:
            raise PolicyError(f"policy {name}: {e}") from None
        if mdev is not None:
            if not selector.empty or spec.get("sriov") is not None:
                raise PolicyError(
                    f"policy {name}: set exactly one of selector (PCI functions) or mdev "
                    "(mediated-device instances); sriov does not go with mdev"
                )
        elif selector.empty:
            raise PolicyError(f"policy {name}: spec.selector is empty and would claim nothing")
        sriov = spec.get("sriov")
        num_vfs = None if not isinstance(sriov, Mapping) else sriov.get("numVfs")
        if num_vfs is not None and (not isinstance(num_vfs, int) or num_vfs < 0):
            raise PolicyError(f"policy {name}: spec.sriov.numVfs must be an integer >= 0")
        if num_vfs is not None and not selector.pf_names:
            raise PolicyError(f"policy {name}: spec.sriov needs selector.pfNames naming the PFs")
        allocation = spec.get("allocation") or DEVICE_PLUGIN
        if allocation not in ALLOCATIONS:
            raise PolicyError(f"policy {name}: spec.allocation must be DevicePlugin or DRA")
        return Policy(
            name=name,
            resource_name=resource,
            node_selector=node_selector,
            selector=selector,
            selector_spec=dict(raw_selector),
            num_vfs=num_vfs,
            driver=str(spec.get("driver") or DEFAULT_DRIVER),
            priority=int(spec.get("priority") or 0),
            created=str(meta.get("creationTimestamp") or ""),
            generation=int(meta.get("generation") or 0),
            allocation=DRA if allocation == DRA else DEVICE_PLUGIN,
            uid=str(meta.get("uid") or ""),
            mdev=mdev,
            mdev_spec=None if raw_mdev is None else dict(raw_mdev),
        )


@dataclass(frozen=True, slots=True)
class Conflict:
    """``loser`` wanted ``target`` on ``node`` but ``winner`` has precedence."""

    node: str
    target: str  # PCI address, PF name/address for numVfs, or the env var two names share
    loser: str
    winner: str
    message: str
    reason: str = "LostToPrecedence"  # the policy status condition's reason

    def as_status(self) -> dict[str, str]:
        return {
            "node": self.node,
            "target": self.target,
            "winner": self.winner,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class NodePlan:
    """The rendered ``spec`` of one node's PassthroughNodeState, and who contributed what."""

    node: str
    spec: Mapping[str, Any]
    policies: tuple[str, ...]  # in precedence order
    conflicts: tuple[Conflict, ...] = ()
    holdings: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # policy -> addrs
    # policy -> its units here that hold several functions of one IOMMU group
    multi_function: Mapping[str, tuple[AllocUnit, ...]] = field(default_factory=dict)
    ids: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # held addr -> (ven, dev)
    reported: bool = False

    def attribution(self) -> dict[str, Any]:
        """The ``hostdev.io/policies`` annotation: contributing policies and lost PF settings."""
        return {
            "policies": list(self.policies),
            "conflicts": [
                {"target": c.target, "policy": c.loser, "winner": c.winner, "message": c.message}
                for c in self.conflicts
                if c.target in _pf_targets(self.spec)
            ],
        }


def _pf_targets(spec: Mapping[str, Any]) -> set[str]:
    return {str(p.get("pciAddress") or p.get("pfName")) for p in spec.get("pfs", ())}


def order(policies: Iterable[Policy]) -> list[Policy]:
    return sorted(policies, key=lambda p: p.precedence)


def _why(winner: Policy) -> str:
    return f"policy {winner.name} has precedence (priority {winner.priority}, then age, then name)"


def _pf_key(pf: PfRange) -> tuple[str, dict[str, Any]]:
    """A pfNames entry names a PF by netdev or by PCI address; nodeconfig wants which one."""
    try:
        address = str(PciAddress.parse(pf.pf))
    except PciAddressError:
        return pf.pf, {"pfName": pf.pf}
    return address, {"pciAddress": address}


def _without_env_collisions(
    node: str, ordered: Sequence[Policy]
) -> tuple[list[Policy], list[Conflict]]:
    """Drop the policies whose resource name maps to the KubeVirt env var of a name with
    precedence (``a.io/x.y`` vs ``a.io/x_y``): on this node they render nothing."""
    losers: list[Conflict] = []
    refused: set[str] = set()
    for c in env_collisions(p.resource_name for p in ordered):
        winner = next(p for p in ordered if p.resource_name == c.first)
        refused.add(c.second)
        losers += [
            Conflict(
                node,
                c.env_var,
                p.name,
                winner.name,
                f"{c.message}; {_why(winner)}",
                ENV_COLLISION,
            )
            for p in ordered
            if p.resource_name == c.second
        ]
    return [p for p in ordered if p.resource_name not in refused], losers


def render_node(
    node: str, policies: Sequence[Policy], reported: ReportedNode | None = None
) -> NodePlan:
    """The spec for ``node`` from the policies selecting it (given in any order).

    Without ``reported`` the spec is pure selector rules. With the agent's inventory, every
    device several policies claim with different wishes gets an explicit pciAddress entry for
    the policy with precedence (explicit entries win over selector rules in nodeconfig).
    """
    matched = order(policies)
    with_mdev, conflicts = _without_env_collisions(node, matched)
    # A resource is PCI functions or mdev instances on a node, and one policy's mdev wish: the
    # policy with precedence decides.
    decides: dict[str, Policy] = {}
    for p in with_mdev:
        decides.setdefault(p.resource_name, p)
    mdevs: list[dict[str, Any]] = []
    ordered: list[Policy] = []
    for p in with_mdev:
        winner = decides[p.resource_name]
        if (p.mdev is None) != (winner.mdev is None) or (p.mdev is not None and winner is not p):
            what = "mediated-device instances" if winner.mdev is not None else "PCI functions"
            conflicts.append(
                Conflict(
                    node,
                    p.resource_name,
                    p.name,
                    winner.name,
                    f"resource {p.resource_name} is {what} of policy {winner.name} on this node: "
                    f"{_why(winner)}",
                )
            )
        elif p.mdev_spec is not None:
            entry = {"resourceName": p.resource_name, **p.mdev_spec}
            if p.dra:
                entry["allocation"] = DRA
            mdevs.append(entry)
        else:
            ordered.append(p)
    pfs: dict[str, dict[str, Any]] = {}
    pf_owner: dict[str, Policy] = {}
    for p in ordered:
        if p.num_vfs is None:
            continue
        for pf in p.selector.pf_names:
            key, ident = _pf_key(pf)
            owner = pf_owner.get(key)
            if owner is None:
                pf_owner[key] = p
                pfs[key] = {**ident, "numVfs": p.num_vfs}
            elif owner.name != p.name and pfs[key]["numVfs"] != p.num_vfs:
                conflicts.append(
                    Conflict(
                        node,
                        key,
                        p.name,
                        owner.name,
                        f"numVfs {p.num_vfs} on PF {key} overridden by {owner.num_vfs} "
                        f"from policy {owner.name}: {_why(owner)}",
                    )
                )
    # One resource is served one way on a node: the policy with precedence decides how.
    mode: dict[str, Policy] = {}
    for p in ordered:
        first = mode.setdefault(p.resource_name, p)
        if first.allocation != p.allocation:
            conflicts.append(
                Conflict(
                    node,
                    p.resource_name,
                    p.name,
                    first.name,
                    f"resource {p.resource_name} is allocated by {first.allocation} (policy "
                    f"{first.name}), not {p.allocation}: {_why(first)}; a resource is served "
                    "one way on a node",
                )
            )
    rules = [
        _rule(p, {"selector": dict(p.selector_spec)}, mode[p.resource_name].allocation)
        for p in ordered
    ]
    explicit: list[dict[str, Any]] = []
    holdings: dict[str, list[str]] = {p.name: [] for p in ordered}
    held: dict[str, list[PciDevice]] = {p.name: [] for p in ordered}
    ids: dict[str, tuple[str, str]] = {}
    inventory = reported.inventory if reported is not None else None
    if inventory is not None:
        for address, dev in inventory.devices.items():
            if dev.is_bridge:
                continue
            claimants = [p for p in ordered if p.selector.matches(dev, inventory)]
            if not claimants:
                continue
            winner = claimants[0]
            holdings[winner.name].append(str(address))
            held[winner.name].append(dev)
            if dev.vendor and dev.device:
                ids[str(address)] = (dev.vendor, dev.device)
            losers = [p for p in claimants[1:] if p.name != winner.name]
            for p in losers:
                conflicts.append(
                    Conflict(
                        node,
                        str(address),
                        p.name,
                        winner.name,
                        f"device {address} goes to {winner.resource_name}: {_why(winner)}",
                    )
                )
            if any(
                (p.driver, p.resource_name) != (winner.driver, winner.resource_name) for p in losers
            ):
                explicit.append(
                    _rule(
                        winner,
                        {"pciAddress": str(address)},
                        mode[winner.resource_name].allocation,
                    )
                )
    if inventory is not None:
        conflicts += _contradictions(node, ordered, pfs, pf_owner, inventory)
    spec: dict[str, Any] = {"pfs": [pfs[k] for k in sorted(pfs)], "devices": explicit + rules}
    if mdevs:
        spec["mdevs"] = mdevs
    multi = {
        name: tuple(u for u in build_units(devs) if u.companions) for name, devs in held.items()
    }
    return NodePlan(
        node=node,
        spec=spec,
        policies=tuple(p.name for p in matched),
        conflicts=tuple(conflicts),
        holdings={k: tuple(v) for k, v in holdings.items()},
        multi_function={k: v for k, v in multi.items() if v},
        ids=ids,
        reported=inventory is not None,
    )


def _reported_pf(key: str, inventory: Inventory) -> PciDevice | None:
    try:
        return inventory.devices.get(PciAddress.parse(key))
    except PciAddressError:
        return next((d for d in inventory.devices.values() if key in d.netdevs), None)


def _contradictions(
    node: str,
    ordered: Sequence[Policy],
    pfs: Mapping[str, Mapping[str, Any]],
    pf_owner: Mapping[str, Policy],
    inventory: Inventory,
) -> list[Conflict]:
    """A policy that puts a PF on vfio-pci while another gives it VFs: the node agent refuses
    both (a PF on vfio-pci makes no VFs; moving it there destroys them), so say it here too."""
    out = []
    for key, entry in sorted(pfs.items()):
        pf = _reported_pf(key, inventory)
        if not entry["numVfs"] or pf is None:
            continue
        owner = pf_owner[key]
        for p in ordered:
            if is_vfio_driver(p.driver) and p.selector.matches(pf, inventory):
                out.append(
                    Conflict(
                        node,
                        key,
                        p.name,
                        owner.name,
                        f"contradiction: policy {p.name} puts PF {pf.address} on {p.driver} "
                        f"while policy {owner.name} gives it numVfs {entry['numVfs']}; the node "
                        "agent refuses both (a PF on vfio-pci makes no VFs, and moving it there "
                        "destroys its VFs): select its VFs instead (pfNames with a range)",
                        CONTRADICTION,
                    )
                )
    return out


def _rule(p: Policy, target: dict[str, Any], allocation: Allocation) -> dict[str, Any]:
    """A NodeState devices entry for ``p``: the target, driver, resource (and allocation when
    it is DRA: specs of device-plugin resources stay as they were before DRA existed)."""
    out = {**target, "driver": p.driver, "resourceName": p.resource_name}
    if allocation == DRA:
        out["allocation"] = DRA
    return out


def select_nodes(policy: Policy, nodes: Mapping[str, Mapping[str, str]]) -> list[str]:
    return sorted(n for n, labels in nodes.items() if policy.node_selector.matches(labels))


def render_cluster(
    policies: Iterable[Policy],
    nodes: Mapping[str, Mapping[str, str]],
    reported: Mapping[str, ReportedNode],
) -> dict[str, NodePlan]:
    """One plan per node that at least one policy selects (nodes no policy selects get none:
    their PassthroughNodeState is deleted)."""
    return {n: r.plan for n, r in rerender(policies, nodes, reported, {}).items()}


def assign(
    policies: Iterable[Policy], nodes: Mapping[str, Mapping[str, str]]
) -> dict[str, tuple[Policy, ...]]:
    """node -> the policies selecting it, sorted by node (nodes no policy selects: absent)."""
    by_node: dict[str, list[Policy]] = {}
    for p in policies:
        for n in select_nodes(p, nodes):
            by_node.setdefault(n, []).append(p)
    return {n: tuple(ps) for n, ps in sorted(by_node.items())}


@dataclass(frozen=True, slots=True)
class Rendered:
    """A node's plan with the inputs it was rendered from (all render_node reads)."""

    policies: tuple[Policy, ...]
    inventory: Inventory | None
    plan: NodePlan


def rerender(
    policies: Iterable[Policy],
    nodes: Mapping[str, Mapping[str, str]],
    reported: Mapping[str, ReportedNode],
    previous: Mapping[str, Rendered],
) -> dict[str, Rendered]:
    """render_cluster's plans, each reused from ``previous`` when that node's inputs (the
    policies selecting it, its reported inventory) are unchanged. A policy edit re-renders the
    nodes it selects, a label change that node, an agent's report its node only when the
    devices changed (allocations and blockers feed no spec); the rest costs a comparison."""
    out: dict[str, Rendered] = {}
    for n, ps in assign(policies, nodes).items():
        seen = reported.get(n)
        inventory = seen.inventory if seen is not None else None
        was = previous.get(n)
        if was is not None and was.policies == ps and _same(was.inventory, inventory):
            out[n] = was
        else:
            out[n] = Rendered(ps, inventory, render_node(n, ps, seen))
    return out


def _same(a: Inventory | None, b: Inventory | None) -> bool:
    return a is b or a == b


@dataclass(frozen=True, slots=True)
class PolicyOutcome:
    """What a policy got across the cluster: the basis of its status."""

    nodes: tuple[str, ...]
    devices: Mapping[str, tuple[str, ...]]  # node -> addresses held (reported nodes only)
    unreported: tuple[str, ...]
    conflicts: tuple[Conflict, ...]
    multi_function: tuple[str, ...] = ()  # notes on units of several functions, per node

    @property
    def device_count(self) -> int:
        return sum(len(v) for v in self.devices.values())

    def status(self) -> dict[str, Any]:
        """The status fields besides conditions and observedGeneration."""
        return {
            "matchedNodes": list(self.nodes),
            "matchedNodeCount": len(self.nodes),
            "deviceCount": self.device_count,
            "conflictCount": len(self.conflicts),
            "nodes": [
                {
                    "node": n,
                    "devices": list(self.devices.get(n, ())),
                    "reported": n not in self.unreported,
                }
                for n in self.nodes
            ],
            "conflicts": [c.as_status() for c in self.conflicts],
        }


def policy_outcomes(
    policies: Iterable[Policy], plans: Mapping[str, NodePlan]
) -> dict[str, PolicyOutcome]:
    out: dict[str, PolicyOutcome] = {}
    for p in policies:
        nodes = tuple(n for n, plan in plans.items() if p.name in plan.policies)
        out[p.name] = PolicyOutcome(
            nodes=nodes,
            devices={n: plans[n].holdings.get(p.name, ()) for n in nodes if plans[n].reported},
            unreported=tuple(n for n in nodes if not plans[n].reported),
            conflicts=tuple(c for n in nodes for c in plans[n].conflicts if c.loser == p.name),
            multi_function=tuple(
                f"node {n}: {multi_function_note(p.resource_name, u)}"
                for n in nodes
                for u in plans[n].multi_function.get(p.name, ())
            ),
        )
    return out
