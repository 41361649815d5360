"""Which VMs stand in the way of a node's desired state. Pure.

The planner refuses to take a device from a running VM (its VFIO group or cdev is held open).
Such a refusal, matched with the kubelet's allocations (pod, and the pod's VMI), names exactly
the VMs that block which devices: the agent reports them in ``PassthroughNodeState.status
.blockers``, and the operator evicts them when the policy says ``reconfigure: EvictVMs``.

Only refusals whose every reason is "a VM holds it" count: when something else is in the way
too (numVfs above the PF's total, the host's own network), evicting VMs would not help.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hostdev.host.address import PciAddress, PciAddressError
from hostdev.policy.conditions import Condition, merge_conditions
from hostdev.policy.nodestatus import AllocationRow
from hostdev.policy.plan import Refusal

# What the guards say when a VM holds a device: hostdev.policy.guards.vfio_in_use (a VFIO user,
# a VM's QEMU, has it open), and a device the kubelet allocated to a pod ("... is allocated to
# pod ns/name (resource)"), which that pod's going releases just the same.
VM_HELD = (
    "(a running VM owns the group)",
    "(a running VM owns the device)",
    " is allocated to pod ",
)
_ADDRESS = re.compile(r"\b[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]\b")


@dataclass(frozen=True, slots=True, order=True)
class Blocker:
    """One device a change needs and who holds it (pod/VMI unknown: held outside Kubernetes,
    or the kubelet could not be asked)."""

    pci_address: PciAddress
    action: str  # what waits: "restore iavf", "set numVfs 8 (0000:3b:00.0)"
    reason: str
    namespace: str | None = None
    pod: str | None = None
    vmi: str | None = None
    resource_name: str | None = None

    @property
    def pod_key(self) -> tuple[str, str] | None:
        return (self.namespace, self.pod) if self.namespace and self.pod else None

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pciAddress": str(self.pci_address),
            "action": self.action,
            "reason": self.reason,
        }
        for key, value in (
            ("namespace", self.namespace),
            ("pod", self.pod),
            ("vmi", self.vmi),
            ("resourceName", self.resource_name),
        ):
            if value:
                out[key] = value
        return out


def _addresses(text: str) -> list[PciAddress]:
    out = []
    for raw in _ADDRESS.findall(text):
        try:
            out.append(PciAddress.parse(raw))
        except PciAddressError:
            continue
    return out


def vm_held(reason: str) -> bool:
    return any(marker in reason for marker in VM_HELD)


def find_blockers(
    refusals: Iterable[Refusal], allocations: Iterable[AllocationRow] | None
) -> tuple[Blocker, ...]:
    """The blockers of the refusals that only VMs cause. A device held by a pod the kubelet
    knows gets one entry per pod; one held by an unknown process gets an entry without pod."""
    rows: dict[PciAddress, list[AllocationRow | None]] = {}
    for alloc in allocations or ():
        rows.setdefault(alloc.pci_address, []).append(alloc)
    # (device, action, holder) -> the reasons that name it: one entry each, reasons joined
    found: dict[tuple[PciAddress, str, AllocationRow | None], list[str]] = {}
    for r in refusals:
        if not r.reasons or not all(vm_held(x) for x in r.reasons):
            continue
        subject = _addresses(r.subject)
        for reason in r.reasons:
            # A PF's numVfs refusal names each held VF in its reasons; others name the subject.
            named = _addresses(reason)
            act = r.action if not named and len(subject) == 1 else f"{r.action} ({r.subject})"
            for a in named or subject:
                for holder in rows.get(a) or [None]:  # None: no pod known
                    found.setdefault((a, act, holder), []).append(reason)
    out = []
    for (a, act, row), reasons in found.items():
        why = "; ".join(dict.fromkeys(reasons))
        if row is None:
            out.append(Blocker(a, act, why))
        else:
            out.append(Blocker(a, act, why, row.namespace, row.pod, row.vmi, row.resource_name))
    return tuple(sorted(out, key=lambda b: (b.pci_address, b.namespace or "", b.pod or "")))


def blocking_pods(blockers: Iterable[Blocker]) -> frozenset[tuple[str, str]]:
    return frozenset(b.pod_key for b in blockers if b.pod_key is not None)


# The status is one etcd object: a change that hits thousands of held VFs lists the first ones
# (the condition says how many there are); the summary names the first holders.
MAX_LISTED = 512
MAX_NAMED = 10


def summary(blockers: Iterable[Blocker]) -> str:
    """ "the spec waits for VM ns/a (0000:3b:02.0); VM ns/b (...) to release ..." """
    by_holder: dict[str, list[str]] = {}
    for b in blockers:
        if b.vmi and b.namespace:
            who = f"VM {b.namespace}/{b.vmi}"
        elif b.pod and b.namespace:
            who = f"pod {b.namespace}/{b.pod}"
        else:
            who = "a process outside Kubernetes"
        by_holder.setdefault(who, []).append(str(b.pci_address))
    parts = [f"{who} ({', '.join(sorted(set(a)))})" for who, a in sorted(by_holder.items())]
    more = len(parts) - MAX_NAMED
    named = "; ".join(parts[:MAX_NAMED]) + (f"; and {more} more holders" if more > 0 else "")
    return f"the spec waits for {named} to release the devices: it applies by itself once they do"


def read_blockers(status: Mapping[str, Any] | None) -> tuple[Blocker, ...]:
    """``status.blockers`` back into Blockers (the operator's side); bad entries are skipped."""
    out = []
    for raw in (status or {}).get("blockers") or ():
        if not isinstance(raw, Mapping):
            continue
        try:
            address = PciAddress.parse(str(raw.get("pciAddress", "")))
        except PciAddressError:
            continue
        out.append(
            Blocker(
                address,
                str(raw.get("action") or ""),
                str(raw.get("reason") or ""),
                raw.get("namespace") or None,
                raw.get("pod") or None,
                raw.get("vmi") or None,
                raw.get("resourceName") or None,
            )
        )
    return tuple(out)


def with_blockers(
    status: dict[str, Any],
    blockers: Iterable[Blocker],
    *,
    previous: Mapping[str, Any] | None,
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    """``status`` (as rendered by :func:`hostdev.policy.nodestatus.render_status`) plus the
    blockers and condition ``Blocked``. Both appear once something blocked, then stay (empty,
    False) so that a merge patch clears them."""
    found = list(blockers)
    prev = previous or {}
    had = any(
        isinstance(c, Mapping) and c.get("type") == "Blocked" for c in prev.get("conditions") or ()
    )
    if found or prev.get("blockers"):
        status["blockers"] = [b.to_status() for b in found[:MAX_LISTED]]
    if found or had:
        cond = (
            Condition("Blocked", "True", "HeldByVMs", summary(found))
            if found
            else Condition(
                "Blocked", "False", "NotBlocked", "no VM holds a device the spec changes"
            )
        )
        status["conditions"] = merge_conditions(
            status.get("conditions"), [cond], generation=generation, now=now
        )
    return status
