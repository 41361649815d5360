"""Day-2 reconfiguration: which VMs stand in the way of which policy's change, and which of
them to evict now. Pure.

The node agents report ``status.blockers`` (device, holding pod and VMI). Each holder is
attributed to the policy whose change it blocks: the policy that serves (or served) the device
as the resource the pod was given, else the policy holding the device now. A policy with
``reconfigure: EvictVMs`` gets its holders evicted, at most ``maxUnavailable`` evicted and not
yet released at a time; ``Wait`` (the default, and for holders no policy claims) only reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from hostdev.policy.blockers import Blocker
from hostdev.policy.nodestate import NodePlan, Policy, PolicyError

WAIT, EVICT = "Wait", "EvictVMs"
MODES = (WAIT, EVICT)

State = Literal["Waiting", "Queued", "Evicting", "EvictionRefused", "NotEvictable"]


@dataclass(frozen=True, slots=True)
class Reconfigure:
    """A policy's ``reconfigure``, ``maxUnavailable`` and ``cordonNodes``."""

    mode: str = WAIT
    max_unavailable: int = 1
    cordon: bool = False

    @property
    def evicts(self) -> bool:
        return self.mode == EVICT

    @staticmethod
    def from_object(obj: Mapping[str, Any]) -> Reconfigure:
        """Raises PolicyError naming the field to fix (for objects the CRD did not check)."""
        name = str((obj.get("metadata") or {}).get("name", ""))
        spec = obj.get("spec") or {}
        mode = spec.get("reconfigure", WAIT)
        if mode not in MODES:
            raise PolicyError(f"policy {name}: spec.reconfigure must be Wait or EvictVMs")
        n = spec.get("maxUnavailable", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PolicyError(
                f"policy {name}: spec.maxUnavailable must be at least 1 (the VMs evicted at a "
                "time); to evict none, set reconfigure: Wait"
            )
        cordon = spec.get("cordonNodes", False)
        if not isinstance(cordon, bool):
            raise PolicyError(f"policy {name}: spec.cordonNodes must be true or false")
        return Reconfigure(mode, n, cordon)


@dataclass(frozen=True, slots=True, order=True)
class Holder:
    """A pod on a node holding devices that a change needs (a VM's virt-launcher pod, when
    ``vmi`` is known; ``pod`` empty: held outside Kubernetes)."""

    node: str
    namespace: str
    pod: str
    vmi: str | None
    devices: tuple[str, ...]
    policy: str | None  # whose change it blocks; None: no policy claims it (then: wait)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.pod)

    @property
    def label(self) -> str:
        if self.vmi:
            return f"VM {self.namespace}/{self.vmi}"
        if self.pod:
            return f"pod {self.namespace}/{self.pod}"
        return "a process outside Kubernetes"


def _attribute(plan: NodePlan, by_name: Mapping[str, Policy], blocker: Blocker) -> str | None:
    ordered = [by_name[p] for p in plan.policies if p in by_name]
    for p in ordered:
        if blocker.resource_name and p.resource_name == blocker.resource_name:
            return p.name
    for p in ordered:
        if str(blocker.pci_address) in plan.holdings.get(p.name, ()):
            return p.name
    return None


def holders(
    policies: Iterable[Policy],
    plans: Mapping[str, NodePlan],
    blockers: Mapping[str, Sequence[Blocker]],
) -> tuple[Holder, ...]:
    """One Holder per (node, pod), attributed to the first policy (in precedence order) whose
    change one of its devices blocks."""
    by_name = {p.name: p for p in policies}
    out: list[Holder] = []
    for node, found in sorted(blockers.items()):
        plan = plans.get(node)
        groups: dict[tuple[str, str], list[Blocker]] = {}
        for b in found:
            groups.setdefault((b.namespace or "", b.pod or ""), []).append(b)
        for (ns, pod), bs in sorted(groups.items()):
            owners = [_attribute(plan, by_name, b) for b in bs] if plan is not None else []
            named = [o for o in owners if o is not None]
            policy = min(named, key=lambda n: by_name[n].precedence) if named else None
            vmi = next((b.vmi for b in bs if b.vmi), None)
            devices = tuple(sorted({str(b.pci_address) for b in bs}))
            out.append(Holder(node, ns, pod, vmi, devices, policy))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class VmiFacts:
    """What decides whether KubeVirt lets a VMI be evicted."""

    eviction_strategy: str | None  # spec.evictionStrategy (None: the cluster default)
    migratable: bool  # condition LiveMigratable is True


def not_evictable(holder: Holder, vmi: VmiFacts | None, cluster_default: str | None) -> str | None:
    """Why the operator must not evict this holder (None: it may). KubeVirt's own rule: a VMI
    whose effective evictionStrategy is LiveMigrate is only evicted by migrating it; one that
    cannot migrate (host devices) is refused, so asking would only fail."""
    if not holder.pod:
        return "held by a process outside Kubernetes (no pod): stop it on the node"
    if not holder.vmi:
        return (
            f"pod {holder.namespace}/{holder.pod} is not a KubeVirt VM's launcher pod: "
            "hostdev evicts only VMs; stop the pod yourself"
        )
    if vmi is None:
        return f"VirtualMachineInstance {holder.namespace}/{holder.vmi} not found yet"
    strategy = vmi.eviction_strategy or cluster_default or "None"
    if strategy == "LiveMigrate" and not vmi.migratable:
        return (
            f"VMI {holder.namespace}/{holder.vmi} has evictionStrategy LiveMigrate but cannot "
            "live-migrate (it holds host devices), so KubeVirt refuses to evict it: stop the VM, "
            "or set its evictionStrategy to None or LiveMigrateIfPossible"
        )
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    """For one policy: the holders to try to evict now, in order, and how many may go."""

    policy: str
    candidates: tuple[Holder, ...]
    slots: int


def decide(
    found: Iterable[Holder],
    settings: Mapping[str, Reconfigure],
    evicting: Iterable[tuple[str, str]],
    blocked: Mapping[tuple[str, str], str],
) -> tuple[Decision, ...]:
    """Per EvictVMs policy: its holders not evicting already and not ``blocked`` (not
    evictable), and the free slots: maxUnavailable minus the holders evicted and still holding.
    Evictions the API refuses (a PodDisruptionBudget) take no slot: the caller tries the next."""
    in_flight = set(evicting)
    by_policy: dict[str, list[Holder]] = {}
    for h in found:
        if h.policy is not None and settings.get(h.policy, Reconfigure()).evicts:
            by_policy.setdefault(h.policy, []).append(h)
    out = []
    for name, hs in sorted(by_policy.items()):
        busy = sum(1 for h in hs if h.key in in_flight)
        todo = tuple(sorted(h for h in hs if h.key not in in_flight and h.key not in blocked))
        out.append(Decision(name, todo, max(0, settings[name].max_unavailable - busy)))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class HolderState:
    holder: Holder
    state: State
    message: str

    def to_status(self) -> dict[str, Any]:
        h = self.holder
        out: dict[str, Any] = {"node": h.node, "namespace": h.namespace}
        if h.vmi:
            out["vmi"] = h.vmi
        if h.pod:
            out["pod"] = h.pod
        out.update(devices=list(h.devices), state=self.state, message=self.message)
        return out


MAX_ROWS = 1000  # the policy status is one etcd object; blockedVMCount has the full count


def status_fields(states: Iterable[HolderState]) -> dict[str, Any]:
    rows = [s.to_status() for s in states]
    return {"blockedVMs": rows[:MAX_ROWS], "blockedVMCount": len(rows)}
