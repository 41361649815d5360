"""KubeVirt CR configuration for policy resources: permittedHostDevices (pciHostDevices, and
mediatedDevices for mdev policies) + HostDevices gate for device-plugin policies, the
GPUsWithDRA/HostDevicesWithDRA gates for DRA policies. Pure.

Ownership: the entries (and the feature gates) this operator added are listed in an annotation
on the KubeVirt CR, so it removes only what it added and never takes over what someone else
wrote, even when that is identical to what it wants. A gate the admin lists in
``disabledFeatureGates`` is never added (explicit enables win over disables in KubeVirt): it is
reported instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hostdev.policy.nodestate import NodePlan, Policy

OWNED_ANNOTATION = "hostdev.io/owned-permitted-host-devices"
FEATURE_GATE = "HostDevices"
# VMs whose gpus/hostDevices entries name a DRA claim need these (beta, on by default in
# KubeVirt 1.9; alpha before): set explicitly so admission never depends on the default.
DRA_GATES = ("GPUsWithDRA", "HostDevicesWithDRA")


@dataclass(frozen=True, slots=True, order=True)
class PciHostDevice:
    pci_vendor_selector: str  # "VVVV:DDDD", upper-case as in KubeVirt's docs
    resource_name: str

    @property
    def key(self) -> str:
        return f"{self.pci_vendor_selector}={self.resource_name}"

    list_name = "pciHostDevices"

    def as_entry(self) -> dict[str, Any]:
        return {
            "pciVendorSelector": self.pci_vendor_selector,
            "resourceName": self.resource_name,
            "externalResourceProvider": True,
        }


@dataclass(frozen=True, slots=True, order=True)
class MediatedDevice:
    """A ``mediatedDevices`` entry: the mdev type's name as the policy gives it (KubeVirt matches
    ``mdevNameSelector`` against the type's ``name`` file; with ``externalResourceProvider``
    it only permits the resource, hostdev's agent serves it)."""

    mdev_name_selector: str
    resource_name: str
    list_name = "mediatedDevices"

    @property
    def key(self) -> str:
        return f"{self.mdev_name_selector}={self.resource_name}"

    def as_entry(self) -> dict[str, Any]:
        return {
            "mdevNameSelector": self.mdev_name_selector,
            "resourceName": self.resource_name,
            "externalResourceProvider": True,
        }


Permitted = PciHostDevice | MediatedDevice
_LISTS = ("pciHostDevices", "mediatedDevices")


def _selector(vendor: str, device: str) -> str:
    return f"{vendor.upper()}:{device.upper()}"


def desired_entries(
    policies: Iterable[Policy], plans: Mapping[str, NodePlan]
) -> tuple[Permitted, ...]:
    """One entry per (vendor:device, resource): ids seen in the agents' inventories for devices
    the policy holds, plus every vendor x device pair a policy names outright (so VMs can be
    admitted before any agent has reported)."""
    wanted: set[Permitted] = set()
    # DRA policies' devices reach VMs through claims, not permittedHostDevices.
    by_name = {p.name: p for p in policies if not p.dra}
    mdevs = {
        MediatedDevice(p.mdev.type, p.resource_name) for p in by_name.values() if p.mdev is not None
    }
    for p in by_name.values():
        for v in p.selector.vendors:
            for d in p.selector.devices:
                wanted.add(PciHostDevice(_selector(v, d), p.resource_name))
    for plan in plans.values():
        # holdings are only filled when the node reported an inventory
        for policy_name, addresses in plan.holdings.items():
            holder = by_name.get(policy_name)
            if holder is None:
                continue
            for a in addresses:
                if a in plan.ids:
                    wanted.add(PciHostDevice(_selector(*plan.ids[a]), holder.resource_name))
    pci = sorted(w for w in wanted if isinstance(w, PciHostDevice))
    return (*pci, *sorted(mdevs))


def desired_gates(policies: Iterable[Policy]) -> tuple[str, ...]:
    """Feature gates besides HostDevices the policies need: the DRA ones for DRA policies."""
    return DRA_GATES if any(p.dra for p in policies) else ()


@dataclass(frozen=True, slots=True)
class KubeVirtChange:
    """A JSON merge patch for the KubeVirt CR, or None when it is already right."""

    patch: dict[str, Any] | None
    added: tuple[str, ...]
    removed: tuple[str, ...]
    blocked: tuple[str, ...] = ()  # wanted gates the admin disabled (not added)


def _owned(kubevirt: Mapping[str, Any]) -> tuple[dict[str, set[str]], set[str]]:
    """Owned keys per permittedHostDevices list, and owned feature gates."""
    none: dict[str, set[str]] = {n: set() for n in _LISTS}
    ann = ((kubevirt.get("metadata") or {}).get("annotations") or {}).get(OWNED_ANNOTATION)
    if not ann:
        return none, set()
    try:
        data = json.loads(ann)
    except ValueError:
        return none, set()
    if not isinstance(data, Mapping):
        return none, set()
    gates = {str(g) for g in data.get("featureGates") or ()}
    if data.get("featureGate"):
        gates.add(FEATURE_GATE)
    return {n: {str(k) for k in data.get(n) or ()} for n in _LISTS}, gates


def _key(list_name: str, entry: Mapping[str, Any]) -> str:
    if list_name == "mediatedDevices":
        return f"{entry.get('mdevNameSelector', '')}={entry.get('resourceName', '')}"
    return f"{str(entry.get('pciVendorSelector', '')).upper()}={entry.get('resourceName', '')}"


def merge_kubevirt(
    kubevirt: Mapping[str, Any],
    wanted: Iterable[Permitted],
    extra_gates: Iterable[str] = (),
) -> KubeVirtChange:
    """Merge ``wanted`` into the CR's permittedHostDevices.pciHostDevices and feature gates.

    Keeps every entry not owned by hostdev (in place), drops owned entries no longer wanted,
    appends wanted ones that are missing. The HostDevices gate is added (and owned) when
    anything is wanted and it is missing, ``extra_gates`` likewise (unless disabled by the
    admin); a gate is removed only when owned and no longer wanted.
    """
    spec = kubevirt.get("spec") or {}
    config = spec.get("configuration") or {}
    permitted = config.get("permittedHostDevices") or {}
    dev_config = config.get("developerConfiguration") or {}
    gates = [str(g) for g in dev_config.get("featureGates") or ()]
    disabled = {str(g) for g in dev_config.get("disabledFeatureGates") or ()}
    owned_lists, owned_gates = _owned(kubevirt)
    wanted = tuple(wanted)
    any_wanted = bool(wanted)
    list_patch: dict[str, list[dict[str, Any]]] = {}
    new_owned_lists: dict[str, list[str]] = {}
    all_added: list[str] = []
    all_removed: list[str] = []
    for list_name in _LISTS:
        current = [dict(e) for e in permitted.get(list_name) or () if isinstance(e, Mapping)]
        owned = owned_lists[list_name]
        wanted_by_key = {w.key: w for w in wanted if w.list_name == list_name}
        keys = [_key(list_name, e) for e in current]
        present = set(keys)
        kept = [
            e for e, k in zip(current, keys, strict=True) if k not in owned or k in wanted_by_key
        ]
        all_removed += sorted(k for k in keys if k in owned and k not in wanted_by_key)
        added_entries = [w for k, w in sorted(wanted_by_key.items()) if k not in present]
        all_added += [w.key for w in added_entries]
        new_list = kept + [w.as_entry() for w in added_entries]
        if new_list != current:
            # Atomic lists in KubeVirt's schema: a merge patch replaces them.
            list_patch[list_name] = new_list
        # Ownership: what we owned and still want, plus what we add now. A foreign identical
        # entry stays foreign.
        new_owned_lists[list_name] = sorted(
            (owned & set(wanted_by_key)) | {w.key for w in added_entries}
        )
    removed = tuple(all_removed)
    new_owned = new_owned_lists["pciHostDevices"]
    new_mdev_owned = new_owned_lists["mediatedDevices"]

    extra = sorted(set(extra_gates) - {FEATURE_GATE})
    wanted_gates = ([FEATURE_GATE] if any_wanted else []) + extra
    blocked = tuple(g for g in extra if g in disabled and g not in gates)
    new_gates = [g for g in gates if not (g in owned_gates and g not in wanted_gates)]
    new_owned_gates = {g for g in owned_gates if g in wanted_gates and g in new_gates}
    for g in wanted_gates:
        if g not in new_gates and g not in blocked:
            new_gates.append(g)
            new_owned_gates.add(g)

    owned_doc: dict[str, Any] = {}
    if new_owned or new_mdev_owned or new_owned_gates:
        owned_doc = {
            "pciHostDevices": new_owned,
            "featureGate": FEATURE_GATE in new_owned_gates,
        }
        if new_mdev_owned:  # absent otherwise: annotations of PCI-only clusters stay as they were
            owned_doc["mediatedDevices"] = new_mdev_owned
        others = sorted(new_owned_gates - {FEATURE_GATE})
        if others:
            owned_doc["featureGates"] = others
    annotation = json.dumps(owned_doc, sort_keys=True) if owned_doc else None
    old_annotation = ((kubevirt.get("metadata") or {}).get("annotations") or {}).get(
        OWNED_ANNOTATION
    )
    if not list_patch and new_gates == gates and annotation == old_annotation:
        return KubeVirtChange(None, (), (), blocked)
    patch: dict[str, Any] = {
        "metadata": {"annotations": {OWNED_ANNOTATION: annotation}},
        "spec": {"configuration": {}},
    }
    if list_patch:
        patch["spec"]["configuration"]["permittedHostDevices"] = list_patch
    if new_gates != gates:
        patch["spec"]["configuration"]["developerConfiguration"] = {"featureGates": new_gates}
    rv = (kubevirt.get("metadata") or {}).get("resourceVersion")
    if rv:
        patch["metadata"]["resourceVersion"] = rv  # optimistic lock: 409 if someone raced us
    added = tuple(all_added) + tuple(g for g in new_gates if g not in gates and g != FEATURE_GATE)
    return KubeVirtChange(patch, added, removed, blocked)
