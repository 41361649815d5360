"""Mediated devices on the node: the agent's own instances (create, remove, remember) and their
device-plugin resource.

- :class:`MdevOwner` creates and removes instances to match the resources' ``mdev`` entries
  (plan: :func:`hostdev.policy.mdev.plan_mdevs`). It records every UUID it makes in
  ``<state-dir>/mdev-owned.json`` *before* writing ``create`` (a crash between the two leaves a
  record of an instance that does not exist, which the next pass forgets), and never removes an
  instance it did not make, one a pod was allocated, or one whose ``/dev/vfio/<group>`` a
  process holds open (a ``remove`` then would block until the VM exits, and take its device).
  A resource whose creates fail half-way has this pass's instances removed again: it is left as
  it was, with the reason.
- :class:`MdevPlugin` serves one resource's instances to the kubelet: one device per instance
  (ID = UUID), health from the instance and its parent, Allocate answering
  ``MDEV_PCI_RESOURCE_<NAME>`` plus the instances' VFIO group nodes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hostdev.deviceplugin.atomicfile import atomic_write
from hostdev.deviceplugin.metrics import Metrics
from hostdev.deviceplugin.persist import mdev_owned_path
from hostdev.deviceplugin.plugin import PERMISSIONS, AllocationRefusedError, ResourcePlugin
from hostdev.deviceplugin.resources import ResourceConfig
from hostdev.deviceplugin.units import Advertised, ResourceUnits, UnitRefusedError
from hostdev.deviceplugin.wire import rpc
from hostdev.host.address import PciAddress
from hostdev.host.mdev import (
    MdevInstance,
    MdevInventory,
    MdevParent,
    discover_mdev,
    instance_dir,
    read_instance,
    type_dir,
)
from hostdev.host.mdevuuid import UUID_RE
from hostdev.host.model import Inventory
from hostdev.host.sysfs import Sysfs
from hostdev.policy.allocation import AllocUnit
from hostdev.policy.health import Verdict
from hostdev.policy.mdev import (
    MdevSpec,
    instance_health,
    mdev_allocation,
    mdev_env_var,
    mdev_status,
    plan_mdevs,
)

log = logging.getLogger(__name__)

Writer = Callable[[str, str], None]


def sysfs_write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


@dataclass
class MdevResult:
    """One reconcile pass: what changed, and why what did not."""

    created: list[tuple[str, str]] = field(default_factory=list)  # (resource, uuid)
    removed: list[tuple[str, str]] = field(default_factory=list)
    refusals: dict[str, str] = field(default_factory=dict)  # resource -> why
    kept: dict[str, str] = field(default_factory=dict)  # uuid -> why it stays

    @property
    def changed(self) -> bool:
        return bool(self.created or self.removed)


class MdevOwner:
    """The instances this agent made (UUID -> resource), and the passes that keep them matching
    the wanted ones."""

    def __init__(self, sysfs: Sysfs, state_dir: str | None, write: Writer = sysfs_write) -> None:
        self.sysfs = sysfs
        self.root = sysfs.root
        self.path = None if state_dir is None else mdev_owned_path(state_dir)
        self.write = write
        self.owned: dict[str, str] = self._load()
        self.last = MdevResult()

    def _load(self) -> dict[str, str]:
        if self.path is None:
            return {}
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # Unreadable: start empty (nothing is removed that we cannot prove we made).
            log.error("%s unreadable (%s): no mdev instance is taken as ours", self.path, e)
            return {}
        owned = data.get("owned") if isinstance(data, dict) else None
        if not isinstance(owned, dict):
            return {}
        return {u: r for u, r in owned.items() if UUID_RE.match(u) and isinstance(r, str)}

    def _save(self) -> None:
        if self.path is not None:
            payload = json.dumps({"owned": dict(sorted(self.owned.items()))}, indent=1)
            atomic_write(self.path, payload.encode())

    def inventory(self) -> MdevInventory:
        return discover_mdev(self.root)

    def status(self) -> dict[str, Any] | None:
        """The NodeState ``status.mdev`` section (see :func:`hostdev.policy.mdev.mdev_status`)."""
        last = self.last
        return mdev_status(self.inventory(), dict(self.owned), last.refusals, last.kept)

    def of(self, resource: str) -> list[str]:
        return sorted(u for u, r in self.owned.items() if r == resource)

    def in_use(self, inv: MdevInventory, allocated: Mapping[str, str]) -> dict[str, str]:
        """UUID -> why it must stay: allocated to a pod, or its VFIO group open."""
        # Imported here: the facts module (ctypes, ipaddress) is not on the way to the first
        # registration, and only a node with mdev resources gets this far.
        from hostdev.deviceplugin.config.facts import open_nodes

        out = dict(allocated)
        nodes = {
            f"/dev/vfio/{i.iommu_group}": i.uuid
            for i in inv.instances.values()
            if i.iommu_group is not None
        }
        for node, holders in open_nodes(self.sysfs, set(nodes)).items():
            out.setdefault(nodes[node], f"{node} is open by {', '.join(holders)}")
        return out

    def reconcile(
        self, wants: Mapping[str, MdevSpec], allocated: Mapping[str, str] | None = None
    ) -> MdevResult:
        """Create and remove this agent's instances so every resource in ``wants`` has its
        count. Blocking (sysfs writes): run it off the event loop."""
        import uuid as uuidlib  # here, not at start: uuid imports platform

        inv = self.inventory()
        gone = [u for u in self.owned if u not in inv.instances]
        for u in gone:
            log.info("mdev instance %s (%s) is gone: forgotten", u, self.owned[u])
            del self.owned[u]
        if gone:
            self._save()
        busy = self.in_use(inv, allocated or {})
        plan = plan_mdevs(wants, inv, self.owned, busy)
        result = MdevResult(refusals=dict(plan.refusals or {}), kept=dict(plan.kept or {}))
        for rm in plan.removes:
            self._remove(rm.uuid, rm.resource, rm.why, result)
        by_res: dict[str, list[tuple[str, str, str]]] = {}
        for c in plan.creates:
            by_res.setdefault(c.resource, []).append((c.parent, c.type_id, c.resource))
        for res, todo in by_res.items():
            made: list[str] = []
            for parent, type_id, _ in todo:
                uuid = str(uuidlib.uuid4())
                try:
                    self._create(parent, type_id, uuid, res)
                except OSError as e:
                    why = (
                        f"mdev type {type_id} on {parent} exhausted (the kernel refused another "
                        "instance)"
                        if e.errno == errno.ENOSPC
                        else f"creating an instance of {type_id} on {parent} failed: "
                        f"{e.strerror or e}"
                    )
                    for u in reversed(made):  # nothing half-done: undo this pass's instances
                        self._remove(u, res, "rolled back", result)
                        result.created.remove((res, u))
                    result.refusals[res] = why + (
                        f"; the {len(made)} created in this pass were removed again" if made else ""
                    )
                    log.error("%s: %s", res, result.refusals[res])
                    break
                made.append(uuid)
                result.created.append((res, uuid))
        for res, why in plan.refusals.items() if plan.refusals else ():
            log.warning("%s: mdev instances left as they are: %s", res, why)
        self.last = result
        return result

    def _create(self, parent: str, type_id: str, uuid: str, resource: str) -> None:
        self.owned[uuid] = resource
        self._save()  # first: a crash after the write still knows the instance is ours
        try:
            self.write(os.path.join(type_dir(self.root, parent, type_id), "create"), uuid)
        except OSError:
            del self.owned[uuid]
            self._save()
            raise
        log.info("%s: created mdev instance %s (%s on %s)", resource, uuid, type_id, parent)

    def _remove(self, uuid: str, resource: str, why: str, result: MdevResult) -> None:
        # A last look right before the write: a VM may have opened the group since the plan.
        inv = MdevInventory({}, {})
        inst_now = read_instance(self.root, uuid)
        if inst_now is not None:
            inv = MdevInventory({}, {uuid: inst_now})
        held = self.in_use(inv, {})
        if uuid in held:
            result.kept[uuid] = held[uuid]
            log.warning("%s: mdev instance %s kept: %s", resource, uuid, held[uuid])
            return
        if inst_now is not None:
            try:
                self.write(os.path.join(instance_dir(self.root, uuid), "remove"), "1")
            except OSError as e:
                result.kept[uuid] = f"remove failed: {e.strerror or e}"
                log.error("%s: removing mdev instance %s failed: %s", resource, uuid, e)
                return
        self.owned.pop(uuid, None)
        self._save()
        result.removed.append((resource, uuid))
        log.info("%s: removed mdev instance %s (%s)", resource, uuid, why)


class MdevUnits(ResourceUnits):
    """One mdev resource's instances as units (ID = UUID), health from the instance and its
    parent; shared by the device-plugin server (:class:`MdevPlugin`) and the DRA front end."""

    owner: MdevOwner
    instances: dict[str, MdevInstance]
    parents: dict[str, MdevParent]

    def __init__(
        self, config: ResourceConfig, sysfs: Sysfs, metrics: Metrics, owner: MdevOwner
    ) -> None:
        super().__init__(config, sysfs, metrics)
        self._init_mdev(owner)

    def _init_mdev(self, owner: MdevOwner) -> None:
        self.owner = owner
        self.instances = {}
        self.parents: dict[str, MdevParent] = {}  # of the instances, as last read

    def update(self, inventory: Inventory, dirty: Any = None) -> bool:
        """The PCI inventory says nothing about instances: re-read them (a few files each)."""
        return self.update_mdev(self.owner.inventory())

    def update_mdev(self, inv: MdevInventory) -> bool:
        new: dict[str, Advertised] = {}
        for uuid in self.owner.of(self.resource):
            inst = inv.instances.get(uuid)
            if inst is None:
                continue
            parent = inv.parents.get(inst.parent or "")
            unit = AllocUnit(uuid, (), inst.iommu_group, parent.numa_node if parent else None, None)
            new[uuid] = Advertised(unit, instance_health(uuid, inv))
        for uuid in self.allocated - new.keys():
            old = self.devices.get(uuid)
            if old is not None:  # a pod holds it: keep it, Unhealthy (see ResourceUnits.update)
                new[uuid] = Advertised(old.unit, instance_health(uuid, inv))
        self.instances = {u: inv.instances[u] for u in new if u in inv.instances}
        self.parents = {
            p: inv.parents[p]
            for p in {i.parent for i in self.instances.values() if i.parent}
            if p in inv.parents
        }
        if new == self.devices:
            return False
        for uuid, adv in new.items():
            old = self.devices.get(uuid)
            if old is None:
                log.info(
                    "%s: mdev instance %s appears (%s)", self.resource, uuid, adv.verdict.kubelet
                )
            elif old.verdict != adv.verdict:
                self._log_health(uuid, adv.verdict)
        for uuid in self.devices.keys() - new.keys():
            log.info("%s: mdev instance %s is gone and not in use: dropped", self.resource, uuid)
        self.devices = new
        self._publish()
        return True

    def recheck_instance(self, uuid: str) -> tuple[MdevInstance, MdevInventory]:
        """The instance re-read: there, its parent there, its group node there (else
        :class:`UnitRefusedError` with the reason), with the inventory it was read from."""
        if uuid not in self.devices:
            raise UnitRefusedError(f"unknown device {uuid!r} for this resource")
        inv = self.owner.inventory()
        verdict: Verdict = instance_health(uuid, inv)
        if not verdict.healthy:
            raise UnitRefusedError(f"mdev instance {uuid} is not handed to a VM: {verdict.reason}")
        return inv.instances[uuid], inv


class MdevPlugin(MdevUnits, ResourcePlugin):
    """The kubelet device-plugin server of one mdev resource (see the module docstring)."""

    def __init__(
        self,
        config: ResourceConfig,
        sysfs: Sysfs,
        plugin_dir: str,
        metrics: Metrics,
        owner: MdevOwner,
        *,
        on_change: Callable[[], None] | None = None,
        on_stale: Callable[[Iterable[PciAddress]], None] | None = None,
        on_delivered: Callable[[], None] | None = None,
    ) -> None:
        ResourcePlugin.__init__(
            self,
            config,
            sysfs,
            plugin_dir,
            metrics,
            on_change=on_change,
            on_stale=on_stale,
            on_delivered=on_delivered,
        )
        self._init_mdev(owner)
        self.env_var = mdev_env_var(self.resource)

    def container_response(self, ids: Iterable[str]) -> dict[str, Any]:
        """``MDEV_PCI_RESOURCE_<NAME>`` = the UUIDs in the order of ``ids``; ``/dev/vfio/vfio``
        and each instance's group node. Each instance is re-read first: one that is gone, whose
        parent is gone or whose group node is missing is refused with the reason."""
        ids = list(ids)
        if not ids:
            raise AllocationRefusedError(rpc.INVALID_ARGUMENT, "no device IDs requested")
        instances = []
        for uuid in ids:
            if uuid not in self.devices:
                raise AllocationRefusedError(
                    rpc.NOT_FOUND, f"unknown device {uuid!r} for this resource"
                )
            try:
                instances.append(self.recheck_instance(uuid)[0])
            except UnitRefusedError as e:
                raise AllocationRefusedError(rpc.FAILED_PRECONDITION, str(e)) from None
        env, paths = mdev_allocation(self.resource, instances)
        specs = [
            {"container_path": p, "host_path": p, "permissions": PERMISSIONS}
            for p in dict.fromkeys(paths)
        ]
        self.mark_allocated(ids)
        self.metrics.allocated_devices.labels(self.resource).inc(len(ids))
        log.info("%s: allocated %s", self.resource, ", ".join(f"{k}={v}" for k, v in env.items()))
        return {"envs": dict(env), "devices": specs}
