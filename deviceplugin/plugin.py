"""One kubelet device-plugin server: one resource name, one unix socket, one registration.

The device-plugin front end of the node agent: :class:`ResourcePlugin` is the resource's
:class:`~hostdev.deviceplugin.units.ResourceUnits` (units, health, in-use set) served over the
kubelet device-plugin API ``v1beta1``. Device IDs are allocation units (one per IOMMU group of
the resource, named by its lowest PCI address); every published change of the units becomes a
ListAndWatch message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import grpc

from hostdev.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as pb
from hostdev.deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc
from hostdev.deviceplugin.metrics import Metrics
from hostdev.deviceplugin.resources import ResourceConfig
from hostdev.deviceplugin.units import (
    Advertised,
    ResourceUnits,
    UnitRefusedError,
    advertised_from_json,
    advertised_to_json,
)
from hostdev.host.address import PciAddress
from hostdev.host.sysfs import Sysfs
from hostdev.policy.allocation import AllocUnit, kubevirt_addresses, preferred_allocation
from hostdev.policy.naming import resource_env_var, socket_name

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

__all__ = [
    "Advertised",
    "AllocationRefusedError",
    "ResourcePlugin",
    "advertised_from_json",
    "advertised_to_json",
]


class AllocationRefusedError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ResourcePlugin(ResourceUnits, pb_grpc.DevicePluginServicer):
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
        super().__init__(config, sysfs, metrics, on_change=on_change, on_stale=on_stale)
        self.plugin_dir = plugin_dir
        self.socket_path = os.path.join(plugin_dir, socket_name(self.resource))
        self.env_var = resource_env_var(self.resource)
        self.registered = False
        self._server: grpc.aio.Server | None = None
        self._lifecycle = asyncio.Lock()  # start() and stop() never interleave
        # None in a queue ends that stream (server stopping).
        self._watchers: set[asyncio.Queue[pb.ListAndWatchResponse | None]] = set()
        self._msgs: dict[str, pb.Device] = {}
        self._snapshot = pb.ListAndWatchResponse()
        self._msg_list: list[pb.Device] = []
        self._msg_index: dict[str, int] = {}

    # ---- ListAndWatch messages ----------------------------------------------------------
    def _device_msg(self, adv: Advertised) -> pb.Device:
        msg = self._msgs.get(adv.unit.id)
        if msg is not None and msg.health == adv.verdict.kubelet:
            return msg
        msg = pb.Device(ID=adv.unit.id, health=adv.verdict.kubelet)
        if adv.unit.numa_node is not None:
            msg.topology.nodes.add(ID=adv.unit.numa_node)
        self._msgs[adv.unit.id] = msg
        return msg

    def _published_hook(self, changed: Mapping[str, Advertised] | None) -> None:
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
        for q in self._watchers:
            if q.full():
                q.get_nowait()  # only the newest list matters
            q.put_nowait(snap)

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

        Each unit's whole IOMMU group is re-read first (:meth:`ResourceUnits.recheck`, on
        :mod:`hostdev.deviceplugin.recheck`): a unit whose group stopped being viable since the
        last scan is refused with the reason rather than handed to a VM that would then fail to
        start.
        """
        ids = list(ids)
        if not ids:
            raise AllocationRefusedError(
                grpc.StatusCode.INVALID_ARGUMENT, "no device IDs requested"
            )
        units: list[AllocUnit] = []
        cdevs: list[str] = []
        for dev_id in ids:
            if dev_id not in self.devices:
                raise AllocationRefusedError(
                    grpc.StatusCode.NOT_FOUND, f"unknown device {dev_id!r} for this resource"
                )
            try:
                checked = self.recheck(dev_id)
            except UnitRefusedError as e:
                raise AllocationRefusedError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
            units.append(checked.unit)
            cdevs.extend(checked.cdevs)
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
        self.mark_allocated(ids)
        self.metrics.allocated_devices.labels(self.resource).inc(len(ids))
        log.info("%s: allocated %s -> %s", self.resource, ",".join(ids), out.envs[self.env_var])
        return out
