"""What the node agent writes in ``PassthroughNodeState.status``. Pure.

Inputs are the inventory after a sync, the outcome of that sync and the allocations read from
the kubelet; the output is the status body (camelCase, as in ``crds/``), plus the helpers the
agent needs around it: which resources to serve, which pod holds which device, and whether a
new status differs from the last one written (timestamps aside, so a recomputation alone never
causes a write). :mod:`hostdev.policy.reported` reads this shape back on the operator side.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hostdev.host.address import PciAddress, PciAddressError
from hostdev.host.model import Inventory, PciDevice
from hostdev.policy.allocation import AllocUnit, build_units, multi_function_note
from hostdev.policy.conditions import Condition, merge_conditions
from hostdev.policy.dra import DRIVER
from hostdev.policy.health import unit_health
from hostdev.policy.plan import Refusal
from hostdev.policy.readiness import node_problems
from hostdev.policy.runs import COUNT, compact

# Condition type: some resource has units of several functions (only the primary is attached).
MULTI_FUNCTION = "MultiFunctionUnits"

SyncState = Literal["Succeeded", "InProgress", "Failed"]
SUCCEEDED: SyncState = "Succeeded"
IN_PROGRESS: SyncState = "InProgress"
FAILED: SyncState = "Failed"

_ADDRESS_IN_TEXT = re.compile(r"\b[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]\b")
_PF_NAME = re.compile(r"^pf (\S+)$")


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    """How the last sync of one spec generation went."""

    state: SyncState
    generation: int | None
    error: str = ""  # why it failed; "" when it succeeded or is in progress
    # device -> resource it is served as (the desired state, resolved on this node)
    resources: Mapping[PciAddress, str] = field(default_factory=dict)
    refusals: tuple[Refusal, ...] = ()
    finished_at: str | None = None  # RFC 3339; None while in progress


@dataclass(frozen=True, slots=True)
class PodDevices:
    """One container's devices of one resource, as the kubelet PodResources API lists them."""

    namespace: str
    pod: str
    container: str
    resource_name: str
    device_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True, order=True)
class AllocationRow:
    """One PCI function held by one pod (and the KubeVirt VMI of that pod, when known)."""

    pci_address: PciAddress
    resource_name: str
    namespace: str
    pod: str
    container: str
    vmi: str | None = None

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pciAddress": str(self.pci_address),
            "resourceName": self.resource_name,
            "namespace": self.namespace,
            "pod": self.pod,
            "container": self.container,
        }
        if self.vmi:
            out["vmi"] = self.vmi
        return out


# ---- resources and allocations ----------------------------------------------------------
def served_resources(
    resources: Mapping[PciAddress, str],
) -> dict[str, tuple[PciAddress, ...]]:
    """device -> resource, turned into resource -> sorted devices (what the plugins serve)."""
    out: dict[str, list[PciAddress]] = {}
    for addr, name in resources.items():
        out.setdefault(name, []).append(addr)
    return {name: tuple(sorted(addrs)) for name, addrs in sorted(out.items())}


def _parse(addr: str) -> PciAddress | None:
    try:
        return PciAddress.parse(addr)
    except PciAddressError:
        return None


def units_of(
    served: Mapping[str, tuple[PciAddress, ...]], inventory: Inventory
) -> dict[str, tuple[AllocUnit, ...]]:
    """The allocation units each served resource makes of its devices (as its plugin does)."""
    return {
        name: build_units(inventory.devices[a] for a in addrs if a in inventory.devices)
        for name, addrs in served.items()
    }


def allocations_from(
    pods: Iterable[PodDevices],
    served: Mapping[str, tuple[PciAddress, ...]],
    inventory: Inventory,
    vmis: Mapping[tuple[str, str], str] | None = None,
) -> tuple[AllocationRow, ...]:
    """Rows for the devices of our resources that pods hold.

    A kubelet device ID stands for one allocation unit (the resource's functions in one IOMMU
    group, ID = lowest address), so an ID expands to every address of its unit. Device IDs of
    other resources, or that are not PCI addresses, are not ours and are skipped."""
    units = {
        (name, u.id): u.addresses for name, us in units_of(served, inventory).items() for u in us
    }
    resource_of = {a: name for name, addrs in served.items() for a in addrs}
    rows: set[AllocationRow] = set()
    for p in pods:
        dra = p.resource_name == DRIVER  # DRA devices: the resource follows from the unit
        if p.resource_name not in served and not dra:
            continue
        vmi = (vmis or {}).get((p.namespace, p.pod))
        for raw in p.device_ids:
            first = _parse(raw)
            if first is None:
                continue
            resource = resource_of.get(first) if dra else p.resource_name
            if resource is None:
                continue
            for a in units.get((resource, str(first)), (first,)):
                rows.add(AllocationRow(a, resource, p.namespace, p.pod, p.container, vmi))
    return tuple(sorted(rows))


# ---- per-device state ---------------------------------------------------------------------
def refused_devices(refusals: Iterable[Refusal], inventory: Inventory) -> dict[PciAddress, str]:
    """Each refusal attached to the devices its subject names (an address, a group's members,
    or a PF by netdev name), as the text shown on those devices."""
    out: dict[PciAddress, list[str]] = {}
    for r in refusals:
        addrs = [a for a in (_parse(m) for m in _ADDRESS_IN_TEXT.findall(r.subject)) if a]
        m = _PF_NAME.match(r.subject)
        if m:
            addrs += [d.address for d in inventory.devices.values() if m.group(1) in d.netdevs]
        text = f"refused to {r.action}: {'; '.join(r.reasons)}"
        for a in addrs:
            out.setdefault(a, []).append(text)
    return {a: " / ".join(texts) for a, texts in out.items()}


def _device_entry(
    dev: PciDevice,
    inventory: Inventory,
    resource: str | None,
    refused: str | None,
    companion_of: PciAddress | None = None,
) -> dict[str, Any]:
    e: dict[str, Any] = {"pciAddress": str(dev.address)}
    for key, value in (
        ("vendor", dev.vendor),
        ("device", dev.device),
        ("class", dev.class_code),
        ("iommuGroup", dev.iommu_group),
        ("numaNode", dev.numa_node),
        ("physfn", str(dev.physfn) if dev.physfn is not None else None),
        ("vfIndex", dev.vf_index),
        ("totalVfs", dev.sriov_totalvfs),
        ("numVfs", dev.sriov_numvfs if dev.is_pf else None),
    ):
        if value is not None:
            e[key] = value
    e["driver"] = dev.driver or ""
    if dev.netdevs:
        e["netdevs"] = list(dev.netdevs)
    messages: list[str] = []
    if resource:
        e["resourceName"] = resource
        verdict = unit_health((dev.address,), dev.iommu_group, inventory.devices, inventory.groups)
        e["health"] = verdict.kubelet
        if verdict.reason:
            messages.append(verdict.reason)
        if companion_of is not None:
            messages.append(
                f"goes along with {companion_of} (same IOMMU group, one unit of {resource}) "
                f"but a VM attaches {companion_of} only: see condition {MULTI_FUNCTION}"
            )
    if refused:
        messages.append(refused)
    if dev.problems:
        messages.append("; ".join(dev.problems))
    if messages:
        e["message"] = " / ".join(messages)
    return e


def _iommu(inventory: Inventory) -> dict[str, Any]:
    node = inventory.node
    out: dict[str, Any] = {
        "enabled": node.enabled,
        "vfioReady": node.vfio_ready,
        "iommufd": node.iommufd,
        "groupCount": node.group_count,
    }
    if node.vendor is not None:
        out["vendor"] = node.vendor
    if node.interrupt_remapping is not None:
        out["interruptRemapping"] = node.interrupt_remapping
    return out


def multi_function_condition(notes: Sequence[str]) -> Condition:
    """Condition MultiFunctionUnits: True when some unit holds several functions (``notes``,
    one :func:`multi_function_note` each), whose companions no VM entry attaches."""
    if not notes:
        return Condition(
            MULTI_FUNCTION, "False", "OneFunctionPerUnit", "every unit is one function"
        )
    more = f" ({len(notes) - 1} more such unit(s))" if len(notes) > 1 else ""
    return Condition(MULTI_FUNCTION, "True", "SeveralFunctionsPerUnit", notes[0] + more)


def _conditions(
    inventory: Inventory,
    outcome: SyncOutcome,
    listed: int,
    total: int,
    max_bytes: int,
    *,
    multi: list[tuple[str, AllocUnit]],
) -> list[Condition]:
    problems = node_problems(inventory.node)
    iommu = (
        Condition("IommuReady", "True", "VfioReady", "IOMMU on and vfio-pci ready")
        if inventory.node.vfio_ready
        else Condition("IommuReady", "False", "NotReady", "; ".join(problems) or "VFIO not ready")
    )
    synced = {
        SUCCEEDED: Condition("Synced", "True", "Succeeded", "the node matches its spec"),
        IN_PROGRESS: Condition("Synced", "Unknown", "InProgress", "applying the spec"),
        FAILED: Condition("Synced", "False", "Failed", outcome.error or "the sync failed"),
    }[outcome.state]
    complete = (
        Condition("InventoryComplete", "True", "AllListed", f"all {total} devices are listed")
        if listed == total
        else Condition(
            "InventoryComplete",
            "False",
            "Truncated",
            f"{listed} of {total} devices are listed (served, refused and unhealthy ones and "
            f"PFs first): the full list would make the status larger than {max_bytes} bytes",
        )
    )
    notes = [multi_function_note(name, u) for name, u in multi]
    return [iommu, synced, complete, multi_function_condition(notes)]


# etcd refuses objects above 1.5 MiB (its default --max-request-bytes); the whole NodeState is
# one object, so the status stays well below that, leaving room for spec and metadata.
MAX_STATUS_BYTES = 1_000_000


def _size(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":")))


def _fit(entries: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """All entries if they fit in ``budget`` bytes, else the most telling ones that do:
    served, refused or unhealthy devices and PFs before idle functions; address order kept."""
    if _size(entries) <= budget:
        return entries

    def rank(e: dict[str, Any]) -> int:
        return 0 if ("resourceName" in e or "message" in e or "totalVfs" in e) else 1

    kept: list[tuple[int, dict[str, Any]]] = []
    used = 2
    for i, e in sorted(enumerate(entries), key=lambda ie: rank(ie[1])):
        size = _size(e) + 1
        if used + size > budget:
            break
        kept.append((i, e))
        used += size
    return [e for _, e in sorted(kept, key=lambda ie: ie[0])]


def render_status(
    inventory: Inventory,
    outcome: SyncOutcome,
    allocations: Iterable[AllocationRow] | None,
    *,
    previous: Mapping[str, Any] | None = None,
    now: str,
    max_bytes: int = MAX_STATUS_BYTES,
) -> dict[str, Any]:
    """The full status body. ``allocations`` None: unknown (the kubelet could not be asked), so
    the allocation fields are left out and the last reported ones stay. ``previous``: the
    status as last written, to keep condition transition times. A device list that would
    take the status past ``max_bytes`` is cut (condition InventoryComplete False says so)."""
    refused = refused_devices(outcome.refusals, inventory)
    multi = [
        (name, u)
        for name, units in units_of(served_resources(outcome.resources), inventory).items()
        for u in units
        if u.companions
    ]
    primary_of = {a: u.primary for _, u in multi for a in u.companions}
    devices = [
        _device_entry(dev, inventory, outcome.resources.get(a), refused.get(a), primary_of.get(a))
        for a, dev in sorted(inventory.devices.items())
        if not dev.is_bridge
    ]
    status: dict[str, Any] = {
        "syncStatus": outcome.state,
        "lastError": outcome.error if outcome.state == FAILED else "",
        "iommu": _iommu(inventory),
        "deviceCount": len(devices),
    }
    if outcome.generation is not None:
        status["observedGeneration"] = outcome.generation
    if outcome.finished_at is not None:
        status["lastSyncTime"] = outcome.finished_at
    if allocations is not None:
        rows = [r.to_status() for r in allocations]
        status["allocations"] = compact(rows)  # a VM holding consecutive VFs: one entry
        status["allocationCount"] = len(rows)

    def conditions(listed: int) -> list[dict[str, Any]]:
        return merge_conditions(
            (previous or {}).get("conditions"),
            _conditions(inventory, outcome, listed, len(devices), max_bytes, multi=multi),
            generation=outcome.generation,
            now=now,
        )

    # What the rest takes, with the longer (truncated) wording of the conditions.
    rest = _size({**status, "conditions": conditions(0), "devices": []})
    # Runs of alike VFs as one entry each (hostdev.policy.runs): thousands of VFs take a few KiB.
    listed = _fit(compact(devices), max_bytes - rest - 16)  # 16: the count may grow
    status["devices"] = listed
    status["conditions"] = conditions(sum(e.get(COUNT, 1) for e in listed))
    return status


_VOLATILE = ("lastSyncTime",)


def comparable(status: Mapping[str, Any] | None) -> dict[str, Any]:
    """The status without its timestamps: two statuses that compare equal here need no write."""
    out = {k: v for k, v in (status or {}).items() if k not in _VOLATILE}
    if "conditions" in out:
        out["conditions"] = sorted(
            (
                {k: v for k, v in c.items() if k != "lastTransitionTime"}
                for c in out["conditions"] or ()
                if isinstance(c, Mapping)
            ),
            key=lambda c: str(c.get("type")),
        )
    return out


def status_patch(written: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level keys of ``new`` that differ from ``written`` (the status as last sent): a
    merge patch of just those keeps every write small (keys ``new`` leaves out stay)."""
    if written is None:
        return dict(new)
    return {k: v for k, v in new.items() if written.get(k) != v}


def status_changed(written: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether ``new`` says anything that ``written`` (the last status sent) does not."""
    if written is None:
        return True
    old = comparable(written)
    return any(old.get(k) != v for k, v in comparable(new).items())
