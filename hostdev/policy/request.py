"""PassthroughRequest -> capacity verdict, VM spec change, request status. Pure.

Entries the operator adds to a VM are named ``<request>-<entry>-<n>`` and recorded in the VM
annotation ``hostdev.io/passthrough-requests`` (request -> field, entry names, pinned node), so it
finds exactly its own entries again and never touches anyone else's.

DRA: entries whose resource a DRA policy serves become claim requests instead of deviceName
entries (see :mod:`hostdev.policy.request_dra`): the VM gets one ``spec.template.spec.
resourceClaims`` entry per request, naming a ResourceClaimTemplate the operator makes, and each
hostDevices/gpus entry names that claim and its request (``claimName`` + ``requestName``, no
``deviceName``), as KubeVirt 1.9's admission requires. The claim entry is recorded with the
request's other entries and removed with them.

Eviction: a VM with assigned host devices cannot live-migrate, and KubeVirt refuses to evict a
VMI whose strategy is LiveMigrate but is not migratable, which blocks node drains. When the VM
leaves ``spec.template.spec.evictionStrategy`` unset (so the cluster default, often LiveMigrate,
would apply), the operator sets it to ``None`` (a drain stops the VM; its run strategy restarts
it elsewhere) and removes it again with the last request. An explicit choice is never
overwritten: an explicit ``LiveMigrate`` is reported as condition EvictionSafe=False.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hostdev.policy.conditions import Condition
from hostdev.policy.nodestate import NodePlan, Policy, order
from hostdev.policy.reported import Allocation, ReportedNode
from hostdev.policy.request_dra import (
    claim_entry_conflict,
    dra_request_name,
    pinned_unit_address,
    pod_claim_name,
    template_name,
)

OWNERS_ANNOTATION = "hostdev.io/passthrough-requests"
EVICTION_ANNOTATION = "hostdev.io/eviction-strategy-set"
HOSTNAME_LABEL = "kubernetes.io/hostname"
PLACEMENTS = ("hostDevices", "gpus")
Placement = Literal["hostDevices", "gpus"]


class RequestError(ValueError):
    """A request the API server let through but that cannot mean anything."""


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    name: str
    resource_name: str | None = None
    count: int = 1
    node: str | None = None
    pci_address: str | None = None

    @property
    def pinned(self) -> bool:
        return self.node is not None


@dataclass(frozen=True, slots=True)
class Request:
    namespace: str
    name: str
    vm_name: str
    entries: tuple[DeviceEntry, ...]
    placement: Placement = "hostDevices"
    apply_policy: str = "NextRestart"
    generation: int = 0

    @staticmethod
    def from_object(obj: Mapping[str, Any]) -> Request:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        name = str(meta.get("name", ""))
        vm = spec.get("vmName")
        if not isinstance(vm, str) or not vm:
            raise RequestError(f"request {name}: spec.vmName is required")
        placement: Placement = "gpus" if spec.get("placement") == "gpus" else "hostDevices"
        if spec.get("placement") not in (None, *PLACEMENTS):
            raise RequestError(f"request {name}: spec.placement must be hostDevices or gpus")
        entries: list[DeviceEntry] = []
        for i, raw in enumerate(spec.get("devices") or ()):
            where = f"request {name}: spec.devices[{i}]"
            if not isinstance(raw, Mapping) or not raw.get("name"):
                raise RequestError(f"{where}: needs a name")
            resource, node, addr = raw.get("resourceName"), raw.get("node"), raw.get("pciAddress")
            if bool(resource) == bool(node and addr):
                raise RequestError(f"{where}: give resourceName (+ count) or node + pciAddress")
            count = raw.get("count", 1)
            if not isinstance(count, int) or count < 1:
                raise RequestError(f"{where}: count must be >= 1")
            entries.append(
                DeviceEntry(
                    str(raw["name"]),
                    resource or None,
                    count,
                    node or None,
                    str(addr).lower() if addr else None,
                )
            )
        if not entries:
            raise RequestError(f"request {name}: spec.devices is empty")
        if len({e.name for e in entries}) != len(entries):
            raise RequestError(f"request {name}: device entry names must be unique")
        return Request(
            namespace=str(meta.get("namespace", "")),
            name=name,
            vm_name=vm,
            entries=tuple(entries),
            placement=placement,
            apply_policy=str(spec.get("applyPolicy") or "NextRestart"),
            generation=int(meta.get("generation") or 0),
        )


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the cluster can ever offer: resources from policies, devices from agent reports."""

    resource_nodes: Mapping[str, frozenset[str]]  # resource -> nodes a policy selects for it
    reported: Mapping[str, ReportedNode]
    planned_nodes: frozenset[str]
    # resource -> the DeviceClass (the DRA policy with precedence) for resources served by DRA
    device_classes: Mapping[str, str] = field(default_factory=dict)

    @staticmethod
    def build(
        policies: Iterable[Policy],
        plans: Mapping[str, NodePlan],
        reported: Mapping[str, ReportedNode],
    ) -> Capacity:
        by_name = {p.name: p for p in policies}
        nodes: dict[str, set[str]] = {p.resource_name: set() for p in by_name.values()}
        for node, plan in plans.items():
            for pname in plan.policies:
                if pname in by_name:
                    nodes[by_name[pname].resource_name].add(node)
        classes: dict[str, str] = {}
        for p in order(by_name.values()):
            if p.resource_name not in classes:
                classes[p.resource_name] = p.name if p.dra else ""
        return Capacity(
            {r: frozenset(n) for r, n in nodes.items()},
            {n: r for n, r in reported.items() if r.inventory is not None},
            frozenset(plans),
            {r: c for r, c in classes.items() if c},
        )


@dataclass(frozen=True, slots=True)
class VmDevice:
    """One VM entry: a device-plugin resource (``device_name``), or with ``device_class`` one
    request of the request's DRA claim (``pci_address``: a pinned unit's first function)."""

    name: str
    device_name: str
    device_class: str | None = None
    request_name: str | None = None
    pci_address: str | None = None

    @property
    def dra(self) -> bool:
        return self.device_class is not None

    def as_entry(self, claim: str) -> dict[str, Any]:
        if self.dra:
            return {"name": self.name, "claimName": claim, "requestName": self.request_name}
        return {"name": self.name, "deviceName": self.device_name}


# The keys of a VM entry that say where its device comes from (replaced as a whole).
ENTRY_SOURCE_KEYS = ("deviceName", "claimName", "requestName")


@dataclass(frozen=True, slots=True)
class Verdict:
    """``accepted`` with the VM entries to add, or refused (``final``) / waiting (not final)."""

    accepted: bool
    final: bool
    reason: str
    message: str
    devices: tuple[VmDevice, ...] = ()
    pin_node: str | None = None


def _refuse(reason: str, message: str) -> Verdict:
    return Verdict(False, True, reason, message)


def _wait(reason: str, message: str) -> Verdict:
    return Verdict(False, False, reason, message)


def vm_entry_name(request: str, entry: str, index: int) -> str:
    return f"{request}-{entry}-{index}"


def check_request(req: Request, cap: Capacity) -> Verdict:
    """Can any node ever satisfy the request (all entries on one node: one VM, one node)?"""
    need: dict[str, int] = {}
    devices: list[VmDevice] = []
    pin_nodes = sorted({e.node for e in req.entries if e.node is not None})
    if len(pin_nodes) > 1:
        return _refuse(
            "PinnedToSeveralNodes",
            f"pinned devices are on nodes {', '.join(pin_nodes)}; one VM runs on one node",
        )
    pin = pin_nodes[0] if pin_nodes else None
    for e in req.entries:
        if e.pinned:
            assert e.node is not None and e.pci_address is not None
            if e.node not in cap.planned_nodes:
                return _refuse(
                    "NodeNotSelected",
                    f"entry {e.name}: node {e.node} is not selected by any PassthroughPolicy",
                )
            rep = cap.reported.get(e.node)
            if rep is None or rep.inventory is None:
                return _wait(
                    "WaitingForInventory",
                    f"entry {e.name}: waiting for the node agent on {e.node} to report devices",
                )
            resource = next(
                (r for r, addrs in sorted(rep.resources.items()) if e.pci_address in addrs), None
            )
            if resource is None:
                known = any(str(a) == e.pci_address for a in rep.inventory.devices)
                return _refuse(
                    "UnknownDevice",
                    f"entry {e.name}: device {e.pci_address} on node {e.node} "
                    + (
                        "is not advertised under any PassthroughPolicy resource"
                        if known
                        else "does not exist there"
                    ),
                )
            need[resource] = need.get(resource, 0) + 1
            cls = cap.device_classes.get(resource)
            devices.append(
                VmDevice(
                    vm_entry_name(req.name, e.name, 0),
                    resource,
                    cls,
                    dra_request_name(e.name, 0) if cls else None,
                    pinned_unit_address(rep, resource, e.pci_address) if cls else None,
                )
            )
            continue
        assert e.resource_name is not None
        if e.resource_name not in cap.resource_nodes:
            names = ", ".join(sorted(cap.resource_nodes)) or "none"
            return _refuse(
                "UnknownResource",
                f"entry {e.name}: resource {e.resource_name} is not provided by any "
                f"PassthroughPolicy (known resources: {names})",
            )
        need[e.resource_name] = need.get(e.resource_name, 0) + e.count
        cls = cap.device_classes.get(e.resource_name)
        devices.extend(
            VmDevice(
                vm_entry_name(req.name, e.name, i),
                e.resource_name,
                cls,
                dra_request_name(e.name, i) if cls else None,
            )
            for i in range(e.count)
        )
    if req.placement == "gpus" and len({d.dra for d in devices}) > 1:
        return _refuse(
            "MixedGpuAllocation",
            "KubeVirt refuses a VM whose gpus mix DRA and device-plugin GPUs: put the DRA "
            "resources and the device-plugin resources in separate requests with placement "
            "hostDevices, or use one allocation for all GPU policies",
        )

    candidates: frozenset[str] = cap.planned_nodes if pin is None else frozenset({pin})
    for r in need:
        candidates &= cap.resource_nodes.get(r, frozenset())
    wanted = ", ".join(f"{n} x {r}" for r, n in sorted(need.items()))
    if not candidates:
        return _refuse(
            "NoNodeCanSatisfy",
            f"no node is selected by policies for all of: {', '.join(sorted(need))}"
            + (f" on node {pin}" if pin else ""),
        )
    unreported = sorted(n for n in candidates if n not in cap.reported)
    fits = sorted(
        n
        for n in candidates
        if n in cap.reported and all(cap.reported[n].count(r) >= k for r, k in need.items())
    )
    if fits:
        return Verdict(
            True,
            False,
            "CapacityAvailable",
            f"{wanted} fit on {', '.join(fits[:5])}",
            tuple(devices),
            pin,
        )
    if unreported:
        return _wait(
            "WaitingForInventory",
            f"no reported node has {wanted}; waiting for node agents on "
            + ", ".join(unreported[:5]),
        )
    best = []
    for r, k in sorted(need.items()):
        most, where = max(
            ((cap.reported[n].count(r), n) for n in sorted(candidates)), key=lambda t: t[0]
        )
        best.append(f"{r}: needs {k}, at most {most} on one node ({where})")
    return _refuse("NoNodeCanSatisfy", "no node can ever satisfy the request: " + "; ".join(best))


# ---------------------------------------------------------------------------- VM changes


@dataclass(frozen=True, slots=True)
class VmChange:
    """A JSON merge patch for the VirtualMachine (None: nothing to do), or a refusal."""

    patch: dict[str, Any] | None
    refusal: str | None = None
    entries: tuple[str, ...] = ()
    eviction: Condition | None = None


@dataclass
class _Vm:
    """Mutable working copy of the parts of a VM this module edits."""

    lists: dict[str, list[dict[str, Any]] | None]
    owners: dict[str, dict[str, Any]]
    eviction: str | None
    eviction_ours: bool
    node_selector: dict[str, str] | None
    claims: list[dict[str, Any]] | None = None  # spec.template.spec.resourceClaims
    extra: dict[str, Any] = field(default_factory=dict)


def _owners(vm: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    raw = ((vm.get("metadata") or {}).get("annotations") or {}).get(OWNERS_ANNOTATION)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return (
        {str(k): dict(v) for k, v in data.items() if isinstance(v, Mapping)}
        if isinstance(data, Mapping)
        else {}
    )


def _template_spec(vm: Mapping[str, Any]) -> Mapping[str, Any]:
    return ((vm.get("spec") or {}).get("template") or {}).get("spec") or {}


def _read(vm: Mapping[str, Any]) -> _Vm:
    tspec = _template_spec(vm)
    devs = (tspec.get("domain") or {}).get("devices") or {}
    ann = (vm.get("metadata") or {}).get("annotations") or {}
    lists: dict[str, list[dict[str, Any]] | None] = {}
    for f in PLACEMENTS:
        value = devs.get(f)
        lists[f] = None if value is None else [dict(e) for e in value]
    sel = tspec.get("nodeSelector")
    claims = tspec.get("resourceClaims")
    return _Vm(
        lists=lists,
        owners=_owners(vm),
        eviction=tspec.get("evictionStrategy"),
        eviction_ours=ann.get(EVICTION_ANNOTATION) == "true",
        node_selector=None if sel is None else dict(sel),
        claims=None if claims is None else [dict(c) for c in claims],
    )


def _eviction_condition(strategy: str | None) -> Condition:
    if strategy == "LiveMigrate":
        return Condition(
            "EvictionSafe",
            "False",
            "LiveMigrateBlocksDrain",
            "the VM asks evictionStrategy LiveMigrate, but a VM with host devices cannot "
            "live-migrate: node drains will hang on it; set None or LiveMigrateIfPossible",
        )
    return Condition(
        "EvictionSafe", "True", "NotLiveMigrate", f"evictionStrategy is {strategy or 'unset'}"
    )


def _diff(vm: Mapping[str, Any], before: _Vm, after: _Vm) -> dict[str, Any] | None:
    patch: dict[str, Any] = {}
    tspec: dict[str, Any] = {}
    devs: dict[str, Any] = {}
    for f in PLACEMENTS:
        if after.lists[f] != before.lists[f]:
            # hostDevices/gpus are atomic lists in KubeVirt's schema: replace the whole list.
            devs[f] = after.lists[f] or None
    if devs:
        tspec["domain"] = {"devices": devs}
    if after.claims != before.claims:
        # A list: a merge patch replaces it whole (our entry added or removed, others kept).
        tspec["resourceClaims"] = after.claims or None
    if after.eviction != before.eviction:
        tspec["evictionStrategy"] = after.eviction
    if after.node_selector != before.node_selector:
        old = before.node_selector or {}
        new = after.node_selector or {}
        tspec["nodeSelector"] = (
            None
            if after.node_selector is None
            else {k: new.get(k) for k in sorted(set(old) | set(new))}
        )
    annotations: dict[str, Any] = {}
    if after.owners != before.owners:
        annotations[OWNERS_ANNOTATION] = (
            json.dumps(after.owners, sort_keys=True, separators=(",", ":"))
            if after.owners
            else None
        )
    if after.eviction_ours != before.eviction_ours:
        annotations[EVICTION_ANNOTATION] = "true" if after.eviction_ours else None
    if not tspec and not annotations:
        return None
    if tspec:
        patch["spec"] = {"template": {"spec": tspec}}
    meta: dict[str, Any] = {}
    if annotations:
        meta["annotations"] = annotations
    rv = (vm.get("metadata") or {}).get("resourceVersion")
    if rv:
        meta["resourceVersion"] = rv  # optimistic lock: a concurrent writer gets a 409, we retry
    patch["metadata"] = meta
    return patch


def _copy(v: _Vm) -> _Vm:
    return _Vm(
        lists={
            f: None if v.lists[f] is None else [dict(e) for e in v.lists[f] or ()]
            for f in PLACEMENTS
        },
        owners={k: dict(o) for k, o in v.owners.items()},
        eviction=v.eviction,
        eviction_ours=v.eviction_ours,
        node_selector=None if v.node_selector is None else dict(v.node_selector),
        claims=None if v.claims is None else [dict(c) for c in v.claims],
    )


def _set_claim(v: _Vm, mine: Mapping[str, Any], claim: Mapping[str, Any] | None) -> None:
    """Our resourceClaims entry: the old one (recorded in ``mine``) out, ``claim`` in."""
    old = mine.get("claim")
    kept = [c for c in v.claims or () if not (old and c.get("name") == old)]
    if claim is not None:
        kept.append(dict(claim))
    v.claims = kept if (kept or v.claims is not None) else None


def _release_pin(v: _Vm, request: str) -> None:
    mine = v.owners.get(request, {})
    node = mine.get("pinnedNode")
    if not node:
        return
    others = any(o.get("pinnedNode") == node for k, o in v.owners.items() if k != request)
    if not others and v.node_selector and v.node_selector.get(HOSTNAME_LABEL) == node:
        del v.node_selector[HOSTNAME_LABEL]
        if not v.node_selector:
            v.node_selector = None


def _settle_eviction(v: _Vm) -> None:
    if v.owners and v.eviction is None:
        v.eviction, v.eviction_ours = "None", True
    elif not v.owners and v.eviction_ours:
        if v.eviction == "None":
            v.eviction = None
        v.eviction_ours = False


def apply_to_vm(
    vm: Mapping[str, Any], req: Request, devices: Sequence[VmDevice], pin_node: str | None
) -> VmChange:
    """Make the VM carry exactly ``devices`` for ``req`` (idempotent, order-stable)."""
    before = _read(vm)
    v = _copy(before)
    mine = v.owners.get(req.name, {})
    old_field, old_names = mine.get("field"), set(mine.get("entries") or ())
    other_names = {n for k, o in v.owners.items() if k != req.name for n in o.get("entries") or ()}
    wanted = {d.name: d for d in devices}
    dra = any(d.dra for d in devices)
    claim = pod_claim_name(req.name) if dra else ""
    if dra:
        clash = claim_entry_conflict(v.claims, claim, mine.get("claim"))
        if clash:
            return VmChange(None, f"VM {req.vm_name} {clash}")
    for f in PLACEMENTS:
        cur = v.lists[f]
        ours = old_names if f == old_field else set()
        target = wanted if f == req.placement else {}
        out: list[dict[str, Any]] = []
        placed: set[str] = set()
        for e in cur or ():
            n = str(e.get("name", ""))
            if n in ours:
                if n in target:
                    rest = {k: x for k, x in e.items() if k not in ENTRY_SOURCE_KEYS}
                    out.append({**rest, **target[n].as_entry(claim)})
                    placed.add(n)
                continue
            if n in target:
                who = "another PassthroughRequest" if n in other_names else "someone else"
                return VmChange(
                    None,
                    f"VM {req.vm_name} already has a {f} entry named {n} added by {who}; "
                    "rename the request or its device entry",
                )
            out.append(e)
        out.extend(
            d.as_entry(claim) for n, d in wanted.items() if f == req.placement and n not in placed
        )
        v.lists[f] = out if (out or cur is not None) else None
    gpus = v.lists["gpus"] or []
    if len({"deviceName" not in e and "claimName" in e for e in gpus}) > 1:
        return VmChange(
            None,
            f"VM {req.vm_name} would have both DRA and device-plugin gpus, which KubeVirt "
            "refuses: use one allocation for its GPUs (or placement hostDevices)",
        )
    twice = _listed_twice(v.lists)
    if twice:
        return VmChange(None, f"VM {req.vm_name} {twice}")
    _set_claim(
        v,
        mine,
        {"name": claim, "resourceClaimTemplateName": template_name(req.name)} if dra else None,
    )
    # pinning: the VM must run on the node holding the pinned device
    _release_pin(v, req.name)
    record: dict[str, Any] = {"field": req.placement, "entries": [d.name for d in devices]}
    if dra:
        record["claim"] = claim
    if pin_node is not None:
        current = (v.node_selector or {}).get(HOSTNAME_LABEL)
        if current is None:
            v.node_selector = {**(v.node_selector or {}), HOSTNAME_LABEL: pin_node}
            record["pinnedNode"] = pin_node
        elif current != pin_node:
            return VmChange(
                None,
                f"VM {req.vm_name} is pinned to node {current} by its nodeSelector, "
                f"but the pinned device is on node {pin_node}",
            )
        elif mine.get("pinnedNode") == pin_node:
            record["pinnedNode"] = pin_node
    v.owners[req.name] = record
    _settle_eviction(v)
    return VmChange(
        _diff(vm, before, v),
        None,
        tuple(d.name for d in devices),
        _eviction_condition(v.eviction),
    )


def _source(entry: Mapping[str, Any]) -> str | None:
    """What a hostDevices/gpus entry takes its devices from: a device-plugin resource, or a
    DRA claim's request."""
    if entry.get("deviceName"):
        return f"resource {entry['deviceName']}"
    if entry.get("claimName"):
        return f"claim {entry['claimName']} request {entry.get('requestName', '')}"
    return None


def _listed_twice(lists: Mapping[str, list[dict[str, Any]] | None]) -> str | None:
    """The same resource (or claim request) in both ``gpus`` and ``hostDevices``: KubeVirt
    takes each list's devices from it separately (the same ``PCI_RESOURCE_*`` variable, or the
    same claim), so both lists would get the same devices and the VM would not start."""
    seen: dict[str, dict[str, list[str]]] = {}
    for f in PLACEMENTS:
        for e in lists.get(f) or ():
            src = _source(e)
            if src is not None:
                seen.setdefault(src, {}).setdefault(f, []).append(str(e.get("name", "")))
    for src, where in seen.items():
        if len(where) > 1:
            names = "; ".join(f"{f}: {', '.join(n)}" for f, n in where.items())
            return (
                f"would take {src} in both gpus and hostDevices ({names}): KubeVirt hands "
                "each list its own devices from it, so the same device would be attached "
                "twice; use one placement for every entry of it"
            )
    return None


def remove_from_vm(vm: Mapping[str, Any], request: str) -> VmChange:
    """Take out exactly the entries ``request`` added (and what it set only for them)."""
    before = _read(vm)
    v = _copy(before)
    mine = v.owners.get(request)
    if mine is None:
        return VmChange(None)
    names, f = set(mine.get("entries") or ()), mine.get("field")
    if f in PLACEMENTS and v.lists[f] is not None:
        kept = [e for e in v.lists[f] or () if e.get("name") not in names]
        v.lists[f] = kept or None
    _set_claim(v, mine, None)
    _release_pin(v, request)
    del v.owners[request]
    _settle_eviction(v)
    return VmChange(_diff(vm, before, v))


# ---------------------------------------------------------------------------- status


def vmi_has_entries(vmi: Mapping[str, Any] | None, placement: str, names: Iterable[str]) -> bool:
    if not vmi:
        return False
    devs = ((vmi.get("spec") or {}).get("domain") or {}).get("devices") or {}
    present = {e.get("name") for e in devs.get(placement) or ()}
    return set(names) <= present


def needs_restart(
    req: Request, vmi: Mapping[str, Any] | None, names: Sequence[str], restarted_uid: str | None
) -> bool:
    """RestartNow: delete the running VMI once so KubeVirt recreates it with the devices."""
    if req.apply_policy != "RestartNow" or not vmi or not names:
        return False
    uid = (vmi.get("metadata") or {}).get("uid")
    return uid != restarted_uid and not vmi_has_entries(vmi, req.placement, names)


@dataclass(frozen=True, slots=True)
class RequestStatus:
    phase: str
    message: str
    conditions: tuple[Condition, ...]
    node: str | None = None
    allocated: tuple[Allocation, ...] = ()

    def fields(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "message": self.message,
            "node": self.node,
            "pciAddresses": ",".join(a.pci_address for a in self.allocated) or None,
            "allocated": [
                {"node": a.node, "pciAddress": a.pci_address, "resourceName": a.resource_name}
                for a in self.allocated
            ],
        }


def running_status(
    req: Request,
    names: Sequence[str],
    vmi: Mapping[str, Any] | None,
    allocations: Iterable[Allocation],
    eviction: Condition | None,
) -> RequestStatus:
    """Status of an applied request from the VMI and the node agents' allocation reports."""
    wanted = {d.resource_name for d in req.entries if d.resource_name}
    mine = tuple(
        sorted(
            (
                a
                for a in allocations
                if a.held_by_vm(req.namespace, req.vm_name)
                and (
                    a.resource_name in wanted
                    or any(e.pci_address == a.pci_address for e in req.entries)
                )
            ),
            key=lambda a: (a.node, a.pci_address),
        )
    )
    running = (
        vmi is not None
        and (vmi.get("status") or {}).get("phase") == "Running"
        and vmi_has_entries(vmi, req.placement, names)
    )
    conds = [
        Condition("Accepted", "True", "CapacityAvailable", "a node can satisfy the request"),
        Condition(
            "Applied",
            "True",
            "VmSpecUpdated",
            f"VM {req.vm_name} has {len(names)} {req.placement} entries",
        ),
        Condition(
            "Running",
            "True" if running else "False",
            "VmiRunning" if running else ("VmiNotRunning" if vmi else "NoVmi"),
            "the VMI runs with the devices"
            if running
            else (
                "the VMI does not run with the devices yet"
                + (
                    " (restart the VM: applyPolicy NextRestart)"
                    if vmi and req.apply_policy == "NextRestart"
                    else ""
                )
            ),
        ),
        Condition(
            "Allocated",
            "True" if len(mine) >= len(names) else "False",
            "DevicesAllocated" if len(mine) >= len(names) else "NotAllocated",
            f"{len(mine)} of {len(names)} devices reported held by the VM",
        ),
    ]
    if eviction is not None:
        conds.append(eviction)
    nodes = sorted({a.node for a in mine})
    phase = "Allocated" if len(mine) >= len(names) else ("Running" if running else "Applied")
    return RequestStatus(
        phase=phase,
        message={
            "Allocated": f"VM {req.vm_name} holds {', '.join(a.pci_address for a in mine)}",
            "Running": f"VM {req.vm_name} runs with the devices",
            "Applied": f"VM {req.vm_name} spec has the devices",
        }[phase],
        conditions=tuple(conds),
        node=",".join(nodes) or None,
        allocated=mine,
    )
