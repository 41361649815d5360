"""Mediated-device policy: which instances a node should have, their health, and what Allocate
hands over. Pure.

A resource asks for ``count`` instances of one mdev type (by type id or by the type's name) on
the parents its patterns match, spread over those parents (fewest of this resource's instances
first) or packed (fill the first parent, by name, before the next). The node agent creates and
removes only instances it made itself (recorded by UUID, see
:mod:`hostdev.deviceplugin.mdev`), never one in use. A resource whose wish cannot be met
completely (unknown type, type exhausted, instances in use) is refused as a whole: nothing of
it is created or removed, and the refusal says why.

KubeVirt: a kubelet device is one instance (its UUID is the device ID); Allocate's env is
``MDEV_PCI_RESOURCE_<NAME>=<uuid>,<uuid>`` in the order of the device IDs (virt-launcher pops
one UUID per ``gpus``/``hostDevices`` entry, from the front); each instance's IOMMU group node
``/dev/vfio/<group>`` goes into the container with ``/dev/vfio/vfio``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from hostdev.host.mdev import MdevInstance, MdevInventory, MdevParent, MdevType
from hostdev.policy.health import Verdict
from hostdev.policy.naming import MDEV_PREFIX, resource_env_var

Placement = Literal["spread", "pack"]
MAX_INSTANCES = 1024  # per resource and node: far above any real parent's capacity


class MdevSpecError(ValueError):
    """An mdev entry the agent cannot use; the message names the field."""


@dataclass(frozen=True, slots=True)
class MdevSpec:
    type: str  # type id ("nvidia-35", "mtty-2") or the type's name ("GRID M60-2Q")
    count: int
    parents: tuple[str, ...] = ()  # shell patterns of parent names ("0000:3b:*", "mtty"); (): all
    placement: Placement = "spread"

    @classmethod
    def from_dict(cls, data: Any) -> MdevSpec:
        if not isinstance(data, dict):
            raise MdevSpecError("mdev: expected a mapping with type and count")
        unknown = set(data) - {"type", "count", "parents", "placement"}
        if unknown:
            raise MdevSpecError(f"mdev: unknown field(s) {sorted(unknown)}")
        t = data.get("type")
        if not isinstance(t, str) or not t.strip():
            raise MdevSpecError("mdev.type: the mdev type id or name (string) is required")
        count = data.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_INSTANCES:
            raise MdevSpecError(f"mdev.count: an integer from 0 to {MAX_INSTANCES} is required")
        parents = data.get("parents", [])
        if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
            raise MdevSpecError("mdev.parents: a list of parent device names or patterns")
        placement = data.get("placement", "spread")
        if placement not in ("spread", "pack"):
            raise MdevSpecError("mdev.placement: spread or pack")
        return cls(t, count, tuple(parents), "pack" if placement == "pack" else "spread")

    def matches_parent(self, name: str) -> bool:
        return not self.parents or any(fnmatch.fnmatchcase(name, p) for p in self.parents)


@dataclass(frozen=True, slots=True)
class MdevCreate:
    resource: str
    parent: str
    type_id: str


@dataclass(frozen=True, slots=True)
class MdevRemove:
    resource: str  # the owner recorded for it
    uuid: str
    why: str


@dataclass(frozen=True, slots=True)
class MdevPlan:
    creates: tuple[MdevCreate, ...] = ()
    removes: tuple[MdevRemove, ...] = ()
    refusals: Mapping[str, str] | None = None  # resource -> why nothing of it changed
    kept: Mapping[str, str] | None = None  # uuid -> why an unwanted instance stays

    @property
    def empty(self) -> bool:
        return not self.creates and not self.removes


def offering(spec: MdevSpec, inv: MdevInventory) -> list[tuple[MdevParent, MdevType]]:
    """The (parent, type) pairs that can serve ``spec``, parents by name."""
    out = []
    for name in sorted(inv.parents):
        p = inv.parents[name]
        if spec.matches_parent(name):
            t = p.type(spec.type)
            if t is not None:
                out.append((p, t))
    return out


def _describe_types(parents: Iterable[MdevParent]) -> str:
    seen: dict[str, str] = {}
    for p in parents:
        for t in p.types:
            seen.setdefault(t.id, f"{t.id}" + (f" ({t.name})" if t.name else ""))
    return ", ".join(seen.values()) or "none"


def plan_mdevs(
    wants: Mapping[str, MdevSpec],
    inv: MdevInventory,
    owned: Mapping[str, str],
    in_use: Mapping[str, str],
) -> MdevPlan:
    """What to create and remove so each resource in ``wants`` has its instances.

    ``owned``: UUID -> resource for the instances the agent made (others are never touched);
    ``in_use``: UUID -> why (held by a pod, its ``/dev/vfio/<group>`` open): never removed.
    """
    creates: list[MdevCreate] = []
    removes: list[MdevRemove] = []
    refusals: dict[str, str] = {}
    kept: dict[str, str] = {}
    avail: dict[tuple[str, str], int] = {}
    mine: dict[str, list[MdevInstance]] = {}
    for uuid, res in owned.items():
        inst = inv.instances.get(uuid)
        if inst is not None:
            mine.setdefault(res, []).append(inst)
    # Unwanted resources first: what they free is there for the others on the next pass.
    for res in sorted(mine.keys() - wants.keys()):
        for inst in mine[res]:
            if inst.uuid in in_use:
                kept[inst.uuid] = f"{res} is no longer wanted but {in_use[inst.uuid]}"
            else:
                removes.append(MdevRemove(res, inst.uuid, f"{res} is no longer wanted"))
    for res in sorted(wants):
        spec = wants[res]
        matched = [p for n, p in sorted(inv.parents.items()) if spec.matches_parent(n)]
        pairs = offering(spec, inv)
        have = mine.get(res, [])
        ok_keys = {(p.name, t.id) for p, t in pairs}
        right = [i for i in have if (i.parent, i.type_id) in ok_keys]
        wrong = [i for i in have if (i.parent, i.type_id) not in ok_keys]
        if not matched and spec.count:
            where = ", ".join(spec.parents) or "any"
            on_node = ", ".join(sorted(inv.parents)) or "none (is the parent's driver loaded?)"
            refusals[res] = f"no mdev parent matches {where}: parents on this node: {on_node}" + (
                f"; {len(have)} instances it made are gone" if have and not right else ""
            )
            continue
        if not pairs and spec.count:
            refusals[res] = (
                f"unknown mdev type {spec.type!r} on parents "
                f"{', '.join(p.name for p in matched)} (they offer {_describe_types(matched)})"
            )
            continue
        busy_wrong = [i for i in wrong if i.uuid in in_use]
        extra = len(right) - spec.count
        res_removes = [
            MdevRemove(res, i.uuid, f"not of type {spec.type} on a matching parent")
            for i in wrong
            if i.uuid not in in_use
        ]
        res_creates: list[MdevCreate] = []
        if extra > 0:
            by_parent: dict[str, list[MdevInstance]] = {}
            for i in right:
                by_parent.setdefault(i.parent or "", []).append(i)
            free = [i for i in right if i.uuid not in in_use]
            if len(free) < extra:
                held = [f"{i.uuid} ({in_use[i.uuid]})" for i in right if i.uuid in in_use]
                refusals[res] = (
                    f"{len(right)} instances, {spec.count} wanted, but only {len(free)} are free "
                    f"to remove; in use: {', '.join(held)}"
                )
                continue
            for _ in range(extra):
                # spread: take from the parent holding most; pack: from the last one used
                cands = [p for p in by_parent if any(i.uuid not in in_use for i in by_parent[p])]
                if spec.placement == "spread":
                    pick = max(cands, key=lambda p: (len(by_parent[p]), p))
                else:
                    pick = max(cands)
                inst = next(i for i in reversed(by_parent[pick]) if i.uuid not in in_use)
                by_parent[pick].remove(inst)
                res_removes.append(MdevRemove(res, inst.uuid, f"more than {spec.count} wanted"))
        elif extra < 0:
            need = -extra
            left = {
                (p.name, t.id): avail.get((p.name, t.id), t.available_instances or 0)
                for p, t in pairs
            }
            capacity = sum(left.values())
            if need > capacity:
                offer = ", ".join(f"{p}: {n}" for (p, _), n in left.items())
                refusals[res] = (
                    f"mdev type {spec.type} exhausted: {need} more instances wanted, "
                    f"the parents have {capacity} left ({offer})"
                )
                continue
            count = {p.name: 0 for p, _ in pairs}
            for i in right:
                if i.parent in count:
                    count[i.parent] += 1
            type_of = {p.name: t.id for p, t in pairs}
            for _ in range(need):
                cands = [p for p in count if left[(p, type_of[p])] > 0]
                pick = (
                    min(cands, key=lambda p: (count[p], p))
                    if spec.placement == "spread"
                    else cands[0]
                )
                count[pick] += 1
                left[(pick, type_of[pick])] -= 1
                res_creates.append(MdevCreate(res, pick, type_of[pick]))
            avail.update(left)
        for i in busy_wrong:
            kept[i.uuid] = f"not of type {spec.type} on a matching parent, but {in_use[i.uuid]}"
        creates += res_creates
        removes += res_removes
    return MdevPlan(tuple(creates), tuple(removes), refusals, kept)


def instance_health(uuid: str, inv: MdevInventory) -> Verdict:
    """Whether instance ``uuid`` can go to a VM now: there, its parent there, in an IOMMU
    group whose /dev/vfio node exists, bound to an mdev driver."""
    inst = inv.instances.get(uuid)
    if inst is None:
        return Verdict(False, f"mdev instance {uuid} is gone")
    if inst.parent is None or inst.parent not in inv.parents:
        return Verdict(False, f"mdev instance {uuid}: its parent {inst.parent} is gone")
    if inst.iommu_group is None:
        return Verdict(False, f"mdev instance {uuid} has no IOMMU group (is vfio loaded?)")
    if not inst.vfio_node:
        return Verdict(False, f"mdev instance {uuid}: /dev/vfio/{inst.iommu_group} is missing")
    if inst.driver is None:
        return Verdict(
            False, f"mdev instance {uuid} is bound to no driver (remove it and create it again)"
        )
    return Verdict(True)


def mdev_env_var(resource: str) -> str:
    return resource_env_var(resource, MDEV_PREFIX)


def mdev_allocation(
    resource: str, instances: Sequence[MdevInstance]
) -> tuple[dict[str, str], list[str]]:
    """Allocate's env and device nodes for ``instances`` (in the order of the request's
    device IDs): ``MDEV_PCI_RESOURCE_<NAME>`` = their UUIDs; ``/dev/vfio/vfio`` and each
    instance's ``/dev/vfio/<group>``."""
    env = {mdev_env_var(resource): ",".join(i.uuid for i in instances)}
    paths = ["/dev/vfio/vfio", *dict.fromkeys(f"/dev/vfio/{i.iommu_group}" for i in instances)]
    return env, paths


def mdev_status(
    inv: MdevInventory,
    owned: Mapping[str, str],
    refusals: Mapping[str, str],
    kept: Mapping[str, str],
) -> dict[str, Any] | None:
    """The NodeState ``status.mdev`` section: parents with their types, every instance (with the
    resource that owns it, when this agent made it), and why wishes were refused or instances
    kept. None on a node without mediated devices (the status then has no such section)."""
    if not inv.parents and not inv.instances and not owned and not refusals:
        return None
    return {
        "parents": [
            {
                "name": p.name,
                **({"pciAddress": str(p.pci)} if p.pci is not None else {}),
                "types": [
                    {
                        "id": t.id,
                        **({"name": t.name} if t.name else {}),
                        **({"deviceApi": t.device_api} if t.device_api else {}),
                        "availableInstances": t.available_instances or 0,
                    }
                    for t in p.types
                ],
            }
            for p in inv.parents.values()
        ],
        "instances": [
            {
                "uuid": i.uuid,
                "parent": i.parent or "",
                "type": i.type_id or "",
                **({"iommuGroup": i.iommu_group} if i.iommu_group is not None else {}),
                **({"resourceName": owned[i.uuid]} if i.uuid in owned else {}),
                "health": "Healthy" if instance_health(i.uuid, inv).healthy else "Unhealthy",
                **({"kept": kept[i.uuid]} if i.uuid in kept else {}),
            }
            for i in inv.instances.values()
        ],
        "refusals": [{"resourceName": r, "message": m} for r, m in sorted(refusals.items())],
    }
