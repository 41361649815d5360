"""One kubelet device-plugin server: one resource name, one unix socket, one registration.

Device IDs are allocation units (see :mod:`hostdev.policy.allocation`): one per IOMMU group of
the resource, named by its lowest PCI address. The plugin never rescans the host itself; the
manager hands it each new :class:`Inventory` through :meth:`ResourcePlugin.update`, which
recomputes units and health and pushes a ListAndWatch message only when something changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from hostdev.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as pb
from hostdev.deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc
from hostdev.deviceplugin.metrics import Metrics
from hostdev.deviceplugin.recheck import recheck
from hostdev.deviceplugin.resources import ResourceConfig
from hostdev.host.address import PciAddress, PciAddressError
from hostdev.host.model import Inventory, IommuGroup, PciDevice
from hostdev.host.sysfs import Sysfs
from hostdev.policy.allocation import (
    AllocUnit,
    build_units,
    kubevirt_addresses,
    preferred_allocation,
)
from hostdev.policy.health import Verdict, unit_health
from hostdev.policy.naming import resource_env_var, socket_name
from hostdev.policy.selector import select_devices

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
PERMISSIONS = "mrw"
VFIO_CONTAINER = "/dev/vfio/vfio"
IOMMUFD = "/dev/iommu"

# Reconnect quickly while a (re)starting kubelet binds before it listens; and never inherit the
# connection backoff of an earlier channel to a kubelet.sock that is gone (grpc-python shares
# subchannels per target unless told otherwise).
_CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 500),
]


class AllocationRefusedError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Advertised:
    """One device as the kubelet sees it (also what is persisted across agent restarts)."""

    unit: AllocUnit
    verdict: Verdict


class ResourcePlugin(pb_grpc.DevicePluginServicer):
    def __init__(
        self,
        config: ResourceConfig,
        sysfs: Sysfs,
        plugin_dir: str,
        metrics: Metrics,
        *,
        on_change: Callable[[], None] | None = None,
        on_stale: Callable[[Iterable[PciAddress]], None] | None = None,
    ) -> None:
        self.config = config
        self._on_change = on_change
        # Allocate found the host differs from what was advertised: rescan these functions.
        self._on_stale = on_stale
        self.resource = config.resource_name
        self.sysfs = sysfs
        self.plugin_dir = plugin_dir
        self.socket_path = os.path.join(plugin_dir, socket_name(self.resource))
        self.env_var = resource_env_var(self.resource)
        self.metrics = metrics
        self.devices: dict[str, Advertised] = {}
        self.allocated: set[str] = set()  # handed out by Allocate: never dropped from the list
        self._allocated_at: dict[str, float] = {}
        self.registered = False
        self._server: grpc.aio.Server | None = None
        self._lifecycle = asyncio.Lock()  # start() and stop() never interleave
        # None in a queue ends that stream (server stopping).
        self._watchers: set[asyncio.Queue[pb.ListAndWatchResponse | None]] = set()
        self._msgs: dict[str, pb.Device] = {}
        self._snapshot = pb.ListAndWatchResponse()
        self._selected: tuple[PciDevice, ...] = ()
        self._units: tuple[AllocUnit, ...] = ()
        self._judged: dict[str, tuple[tuple[PciDevice | None, ...], IommuGroup | None]] = {}
        self._unit_of: dict[PciAddress, AllocUnit] = {}
        self._facts: dict[PciAddress, tuple[object, ...]] = {}
        self.units_version = 0  # bumped whenever the unit set is rebuilt
        self.shared_groups: dict[int, tuple[str, ...]] = {}  # group -> other resources in it
        self._msg_list: list[pb.Device] = []
        self._msg_index: dict[str, int] = {}
        self.generation = 0  # bumped on every published change (tests and benches wait on it)
        self._published = asyncio.Event()

    # ---- device set -------------------------------------------------------------------
    def seed(self, devices: Iterable[Advertised], allocated: Iterable[str] = ()) -> None:
        """Start from a persisted list (before any host scan), so the kubelet sees the same
        devices right after an agent restart."""
        self.devices = {a.unit.id: a for a in devices}
        self.allocated = set(allocated) & set(self.devices)
        self._publish()

    def update(self, inventory: Inventory, dirty: Collection[PciAddress] | None = None) -> bool:
        """Recompute units and health from ``inventory``; publish if anything changed.

        ``dirty``: the only addresses whose facts may have changed since the last update (a
        targeted rescan); None means anything may have changed.
        """
        if dirty is not None:
            fast = self._update_dirty(inventory, dirty)
            if fast is not None:
                return fast
        # Host views share unchanged PciDevice/IommuGroup objects between scans, so identity
        # checks let a rescan of a 4096-VF node skip regrouping and re-judging what did not
        # change (a targeted rescan then costs a few ms instead of tens).
        selected = select_devices(self.config.selector, inventory)
        if len(selected) == len(self._selected) and all(
            a is b or _unit_facts(a) == _unit_facts(b)
            for a, b in zip(selected, self._selected, strict=True)
        ):
            units = self._units
        else:
            units = build_units(selected)
            self._selected, self._units = selected, units
            self.units_version += 1
            self._unit_of = {a: u for u in units for a in u.addresses}
            self._facts = {d.address: _unit_facts(d) for d in selected}
        new: dict[str, Advertised] = {}
        devices, groups = inventory.devices, inventory.groups
        for u in units:
            key = (
                tuple(devices.get(a) for a in u.addresses),
                None if u.group is None else groups.get(u.group),
            )
            old = self.devices.get(u.id)
            cached = self._judged.get(u.id)
            if (
                cached is not None
                and old is not None
                and old.unit is u
                and cached[1] is key[1]
                and all(x is y for x, y in zip(cached[0], key[0], strict=True))
            ):
                new[u.id] = old
                continue
            v = self._judge(u, devices, groups)
            self._judged[u.id] = key
            new[u.id] = Advertised(u, v)
        for dev_id in self.allocated - new.keys():
            # In use by a pod: keep it, Unhealthy, so the kubelet does not lose track of it.
            old = self.devices.get(dev_id)
            if old is not None:
                why = old.verdict.reason if not old.verdict.healthy else None
                new[dev_id] = Advertised(
                    old.unit,
                    Verdict(
                        False,
                        why or f"{dev_id} left the PCI bus or this resource while a pod holds it",
                    ),
                )
        if new == self.devices:
            return False
        appeared = [k for k in new if k not in self.devices]
        if len(appeared) > 16:
            # A first scan of a big node: one line, not thousands.
            healthy = sum(new[k].verdict.healthy for k in appeared)
            log.info(
                "%s: %d devices appear (%d healthy), %s .. %s",
                self.resource,
                len(appeared),
                healthy,
                appeared[0],
                appeared[-1],
            )
        for dev_id, adv in new.items():
            old = self.devices.get(dev_id)
            if old is None:
                if len(appeared) <= 16:
                    log.info(
                        "%s: device %s appears (%s)", self.resource, dev_id, adv.verdict.kubelet
                    )
            elif old.verdict.healthy != adv.verdict.healthy:
                self._log_health(dev_id, adv.verdict)
        for dev_id in self.devices.keys() - new.keys():
            self._judged.pop(dev_id, None)
            log.info("%s: device %s is gone and not in use: dropped", self.resource, dev_id)
        self.devices = new
        self._publish()
        return True

    def set_in_use(self, in_use: Iterable[str], grace: float = 120.0) -> None:
        """Replace the in-use set with the kubelet's (PodResources), keeping allocations of the
        last ``grace`` seconds, which a List racing with Allocate may not show yet."""
        cutoff = time.monotonic() - grace
        recent = {k for k, t in self._allocated_at.items() if t >= cutoff}
        self._allocated_at = {k: t for k, t in self._allocated_at.items() if t >= cutoff}
        new = set(in_use) | recent
        if new != self.allocated:
            freed = self.allocated - new
            if freed:
                log.info("%s: no longer in use: %s", self.resource, ", ".join(sorted(freed)))
            self.allocated = new
            if self._on_change is not None:
                self._on_change()

    def _judge(
        self,
        u: AllocUnit,
        devices: Mapping[PciAddress, PciDevice],
        groups: Mapping[int, IommuGroup],
    ) -> Verdict:
        return self._shared_verdict(u, unit_health(u.addresses, u.group, devices, groups))

    def _shared_verdict(self, u: AllocUnit, v: Verdict) -> Verdict:
        others = self.shared_groups.get(u.group) if u.group is not None else None
        if v.healthy and others:
            return Verdict(
                False,
                f"IOMMU group {u.group} of {u.id} also holds devices of {', '.join(others)}; "
                "a group can go to one VM only: select the whole group in one resource",
            )
        return v

    def set_shared_groups(self, shared: Mapping[int, tuple[str, ...]]) -> bool:
        """Groups this resource shares with others (their units are never healthy)."""
        if dict(shared) == self.shared_groups:
            return False
        self.shared_groups = dict(shared)
        self._judged.clear()  # verdicts depend on it: re-judge everything on the next update
        return True

    def _update_dirty(self, inventory: Inventory, dirty: Collection[PciAddress]) -> bool | None:
        """Re-judge only the units holding a dirty address; None when that is not enough
        (the device set or a unit's shape changed, or a PF changed: pfNames may follow it)."""
        devices, groups = inventory.devices, inventory.groups
        selector = self.config.selector
        touched: dict[str, AllocUnit] = {}
        for a in dirty:
            d = devices.get(a)
            unit = self._unit_of.get(a)
            if d is not None and d.is_pf:
                return None
            now = d is not None and selector.matches(d, inventory)
            if now != (unit is not None):
                return None
            if d is not None and unit is not None:
                if _unit_facts(d) != self._facts.get(a):
                    return None
                touched[unit.id] = unit
        changed: dict[str, Advertised] = {}
        for dev_id, u in touched.items():
            old = self.devices.get(dev_id)
            if old is None or old.unit is not u:
                return None
            v = self._judge(u, devices, groups)
            self._judged[dev_id] = (
                tuple(devices.get(a) for a in u.addresses),
                None if u.group is None else groups.get(u.group),
            )
            if v != old.verdict:
                changed[dev_id] = Advertised(u, v)
        if not changed:
            return False
        for dev_id, adv in changed.items():
            self._log_health(dev_id, adv.verdict)
        self.devices = {**self.devices, **changed}
        self._publish(changed)
        return True

    def _log_health(self, dev_id: str, verdict: Verdict) -> None:
        log.warning(
            "%s: device %s is now %s%s",
            self.resource,
            dev_id,
            verdict.kubelet,
            f": {verdict.reason}" if verdict.reason else "",
        )

    def _device_msg(self, adv: Advertised) -> pb.Device:
        msg = self._msgs.get(adv.unit.id)
        if msg is not None and msg.health == adv.verdict.kubelet:
            return msg
        msg = pb.Device(ID=adv.unit.id, health=adv.verdict.kubelet)
        if adv.unit.numa_node is not None:
            msg.topology.nodes.add(ID=adv.unit.numa_node)
        self._msgs[adv.unit.id] = msg
        return msg

    def _publish(self, changed: Mapping[str, Advertised] | None = None) -> None:
        if changed is None:
            for gone in self._msgs.keys() - self.devices.keys():
                del self._msgs[gone]
            self._msg_list = [self._device_msg(a) for a in self.devices.values()]
            self._msg_index = {k: i for i, k in enumerate(self.devices)}
        else:
            for dev_id, adv in changed.items():
                self._msg_list[self._msg_index[dev_id]] = self._device_msg(adv)
        snap = pb.ListAndWatchResponse(devices=self._msg_list)
        self._snapshot = snap
        healthy = sum(a.verdict.healthy for a in self.devices.values())
        self.metrics.set_devices(self.resource, healthy, len(self.devices) - healthy)
        for q in self._watchers:
            if q.full():
                q.get_nowait()  # only the newest list matters
            q.put_nowait(snap)
        self.generation += 1
        if self._on_change is not None:
            self._on_change()
        self._published.set()
        self._published = asyncio.Event()

    async def wait_published(self, after: int) -> int:
        while self.generation <= after:
            await self._published.wait()
        return self.generation

    # ---- server lifecycle ---------------------------------------------------------------
    @property
    def serving(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        async with self._lifecycle:  # a stop() racing with this waits for the server to exist
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)  # a stale socket from an earlier run
            server = grpc.aio.server()
            pb_grpc.add_DevicePluginServicer_to_server(self, server)
            server.add_insecure_port(f"unix://{self.socket_path}")
            await server.start()
            self._server = server
            self.registered = False
            log.info("%s: serving on %s", self.resource, self.socket_path)

    async def stop(self, *, remove_socket: bool = True) -> None:
        """Stop serving; returns once the server is down and (by default) its socket is gone."""
        async with self._lifecycle:
            server, self._server = self._server, None
            self.registered = False
            for q in self._watchers:
                # End the streams ourselves: cancelled handlers make grpc log tracebacks.
                if q.full():
                    q.get_nowait()
                q.put_nowait(None)
            if server is not None:
                await asyncio.sleep(0)  # let the stream handlers return
                await server.stop(grace=0.2)
            if remove_socket:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.socket_path)

    async def register(self, rpc_timeout: float = 10.0) -> None:
        """Register with the kubelet (raises grpc.aio.AioRpcError on failure)."""
        kubelet = os.path.join(self.plugin_dir, KUBELET_SOCKET)
        req = pb.RegisterRequest(
            version=API_VERSION,
            endpoint=os.path.basename(self.socket_path),
            resource_name=self.resource,
            options=self._options(),
        )
        try:
            async with grpc.aio.insecure_channel(
                f"unix://{kubelet}", options=_CHANNEL_OPTIONS
            ) as channel:
                stub = pb_grpc.RegistrationStub(channel)
                await stub.Register(req, timeout=rpc_timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError:
            self.metrics.registrations.labels(self.resource, "error").inc()
            raise
        self.registered = True
        self.metrics.registrations.labels(self.resource, "ok").inc()
        log.info("%s: registered with the kubelet as %s", self.resource, req.endpoint)

    # ---- DevicePlugin RPCs --------------------------------------------------------------
    @staticmethod
    def _options() -> pb.DevicePluginOptions:
        return pb.DevicePluginOptions(
            pre_start_required=False, get_preferred_allocation_available=True
        )

    async def GetDevicePluginOptions(  # noqa: N802 (gRPC method name)
        self, request: pb.Empty, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DevicePluginOptions:
        return self._options()

    async def ListAndWatch(  # noqa: N802 (gRPC method name)
        self, request: pb.Empty, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ListAndWatchResponse]:
        q: asyncio.Queue[pb.ListAndWatchResponse | None] = asyncio.Queue(maxsize=1)
        self._watchers.add(q)
        log.info("%s: kubelet watching (%d devices)", self.resource, len(self.devices))
        try:
            yield self._snapshot
            while (msg := await q.get()) is not None:
                yield msg
        finally:
            self._watchers.discard(q)

    async def GetPreferredAllocation(  # noqa: N802 (gRPC method name)
        self, request: pb.PreferredAllocationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PreferredAllocationResponse:
        units = {k: a.unit for k, a in self.devices.items()}
        resp = pb.PreferredAllocationResponse()
        for creq in request.container_requests:
            ids = preferred_allocation(
                units,
                list(creq.available_deviceIDs),
                list(creq.must_include_deviceIDs),
                creq.allocation_size,
                self.config.strategy,
            )
            resp.container_responses.add(deviceIDs=ids)
        return resp

    async def Allocate(  # noqa: N802 (gRPC method name)
        self, request: pb.AllocateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AllocateResponse:
        start = time.perf_counter()
        resp = pb.AllocateResponse()
        try:
            for creq in request.container_requests:
                resp.container_responses.append(self.container_response(creq.devices_ids))
        except AllocationRefusedError as e:
            self.metrics.errors.labels(self.resource, "allocate").inc()
            log.error("%s: Allocate refused: %s", self.resource, e)
            await context.abort(e.code, f"{self.resource}: {e}")
        self.metrics.allocations.labels(self.resource).inc()
        self.metrics.allocate_seconds.labels(self.resource).observe(time.perf_counter() - start)
        return resp

    async def PreStartContainer(  # noqa: N802 (gRPC method name)
        self, request: pb.PreStartContainerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PreStartContainerResponse:
        return pb.PreStartContainerResponse()  # not requested at registration; nothing to do

    # ---- Allocate: the KubeVirt contract ------------------------------------------------
    def container_response(self, ids: Iterable[str]) -> pb.ContainerAllocateResponse:
        """Env ``PCI_RESOURCE_<NAME>``: each unit's primary function first, in the order of
        ``ids`` (KubeVirt attaches one address per VM entry, from the front), then the units'
        companions; VFIO device specs for every unit's group.

        Each unit's whole IOMMU group is re-read first (:mod:`hostdev.deviceplugin.recheck`):
        a unit whose group stopped being viable since the last scan is refused with the reason
        rather than handed to a VM that would then fail to start.
        """
        ids = list(ids)
        if not ids:
            raise AllocationRefusedError(
                grpc.StatusCode.INVALID_ARGUMENT, "no device IDs requested"
            )
        units: list[AllocUnit] = []
        cdevs: list[str] = []
        for dev_id in ids:
            adv = self.devices.get(dev_id)
            if adv is None:
                raise AllocationRefusedError(
                    grpc.StatusCode.NOT_FOUND, f"unknown device {dev_id!r} for this resource"
                )
            unit = adv.unit
            verdict, fresh = recheck(self.sysfs, unit, self._advertised_members(unit))
            verdict = self._shared_verdict(unit, verdict)
            if not verdict.healthy:
                if self._on_stale is not None:
                    self._on_stale({*unit.addresses, *(fresh.devices if fresh else ())})
                raise AllocationRefusedError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"device {dev_id} is not handed to a VM: {verdict.reason}",
                )
            assert fresh is not None  # a healthy verdict needs a group
            units.append(unit)
            for a in unit.addresses:
                cdev = fresh.devices[a].vfio_cdev
                if cdev and os.path.exists(self.sysfs.path("dev/vfio/devices", cdev)):
                    cdevs.append(cdev)
        out = pb.ContainerAllocateResponse()
        out.envs[self.env_var] = ",".join(str(a) for a in kubevirt_addresses(units))
        groups = dict.fromkeys(u.group for u in units)
        paths = [VFIO_CONTAINER, *(f"/dev/vfio/{g}" for g in groups)]
        if os.path.exists(self.sysfs.path(IOMMUFD)):
            paths.append(IOMMUFD)
            paths.extend(f"/dev/vfio/devices/{c}" for c in cdevs)
        seen: set[str] = set()
        for p in paths:
            if p not in seen:
                seen.add(p)
                out.devices.add(container_path=p, host_path=p, permissions=PERMISSIONS)
        now = time.monotonic()
        for dev_id in ids:
            self._allocated_at[dev_id] = now
        if not self.allocated.issuperset(ids):
            self.allocated.update(ids)
            if self._on_change is not None:
                self._on_change()
        self.metrics.allocated_devices.labels(self.resource).inc(len(ids))
        log.info("%s: allocated %s -> %s", self.resource, ",".join(ids), out.envs[self.env_var])
        return out

    def _advertised_members(self, unit: AllocUnit) -> tuple[PciAddress, ...] | None:
        """The group's members when ``unit`` was last judged (None: not judged since start)."""
        judged = self._judged.get(unit.id)
        return None if judged is None or judged[1] is None else judged[1].members


def _unit_facts(d: PciDevice) -> tuple[object, ...]:
    """What :func:`build_units` looks at: equal facts, equal units."""
    return (d.address, d.iommu_group, d.numa_node, d.physfn)


def advertised_to_json(adv: Advertised) -> dict[str, Any]:
    u = adv.unit
    return {
        "id": u.id,
        "addresses": [str(a) for a in u.addresses],
        "group": u.group,
        "numa": u.numa_node,
        "pf": None if u.pf is None else str(u.pf),
        "healthy": adv.verdict.healthy,
        "reason": adv.verdict.reason,
    }


def advertised_from_json(data: Mapping[str, Any]) -> Advertised:
    """Raises ValueError/KeyError/TypeError on malformed input (the caller drops the entry)."""
    try:
        addrs = tuple(PciAddress.parse(a) for a in data["addresses"])
        pf = None if data.get("pf") is None else PciAddress.parse(data["pf"])
    except PciAddressError as e:
        raise ValueError(str(e)) from None
    if not addrs or str(addrs[0]) != data["id"]:
        raise ValueError(f"entry {data.get('id')!r}: id must be its first address")
    group, numa = data.get("group"), data.get("numa")
    if not (group is None or isinstance(group, int)) or not (numa is None or isinstance(numa, int)):
        raise TypeError(f"entry {data['id']}: group and numa must be integers or null")
    unit = AllocUnit(id=data["id"], addresses=addrs, group=group, numa_node=numa, pf=pf)
    return Advertised(unit, Verdict(bool(data.get("healthy")), data.get("reason")))
