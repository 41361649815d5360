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

from hostdev.deviceplugin.metrics import Metrics
from hostdev.deviceplugin.resources import ResourceConfig
from hostdev.deviceplugin.units import (
    Advertised,
    ResourceUnits,
    UnitRefusedError,
    advertised_from_json,
    advertised_to_json,
)
from hostdev.deviceplugin.wire import messages as msg
from hostdev.deviceplugin.wire import rpc
from hostdev.deviceplugin.wire.pb import varint
from hostdev.host.address import PciAddress
from hostdev.host.sysfs import Sysfs
from hostdev.policy.allocation import AllocUnit, kubevirt_addresses, preferred_allocation
from hostdev.policy.naming import resource_env_var, socket_generation, socket_name

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
PERMISSIONS = "mrw"
VFIO_CONTAINER = "/dev/vfio/vfio"
IOMMUFD = "/dev/iommu"
_OPTIONS = {"pre_start_required": False, "get_preferred_allocation_available": True}
_OPTIONS_BYTES = msg.DEVICE_PLUGIN_OPTIONS.encode(_OPTIONS)
_EMPTY = b""
# The kubelet's answer (gRPC UNKNOWN) to a Register whose socket path it still holds an
# endpoint for: devicemanager ManagerImpl.PluginConnected, "device plugin already connected: "
# followed by the path in the kubelet's device-plugin directory.
ALREADY_CONNECTED = "device plugin already connected: "

__all__ = [
    "Advertised",
    "AllocationRefusedError",
    "ResourcePlugin",
    "advertised_from_json",
    "advertised_to_json",
]


class AllocationRefusedError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def kubelet_holds_endpoint(error: rpc.RpcError, socket_path: str) -> bool:
    """Whether a failed Register says the kubelet still has an endpoint at ``socket_path``
    (compared by file name: the kubelet may see its directory at another path)."""
    return (
        error.code == rpc.UNKNOWN
        and error.details.startswith(ALREADY_CONNECTED)
        and os.path.basename(error.details.removeprefix(ALREADY_CONNECTED).strip())
        == os.path.basename(socket_path)
    )


def _len_field(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload


_TOPOLOGY: dict[int, bytes] = {}  # NUMA node -> encoded Device.topology field


def device_bytes(adv: Advertised) -> bytes:
    """One ``Device`` of a ListAndWatch list, as the field of the response (tag, length,
    message): the list is these pieces joined. Encoded by hand (ID, health, topology): lists
    of thousands of devices are built at start and on every change."""
    body = _len_field(b"\x0a", adv.unit.id.encode()) + _len_field(
        b"\x12", adv.verdict.kubelet.encode()
    )
    numa = adv.unit.numa_node
    if numa is not None:
        topo = _TOPOLOGY.get(numa)
        if topo is None:
            topo = _TOPOLOGY[numa] = _len_field(
                b"\x1a", msg.TOPOLOGY_INFO.encode({"nodes": [{"ID": numa}]})
            )
        body += topo
    return _len_field(b"\x0a", body)


class ResourcePlugin(ResourceUnits):
    def __init__(
        self,
        config: ResourceConfig,
        sysfs: Sysfs,
        plugin_dir: str,
        metrics: Metrics,
        *,
        on_change: Callable[[], None] | None = None,
        on_stale: Callable[[Iterable[PciAddress]], None] | None = None,
        on_delivered: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config, sysfs, metrics, on_change=on_change, on_stale=on_stale)
        self._on_delivered = on_delivered
        self.delivered = b""  # the last list a ListAndWatch stream handed to the transport
        self.plugin_dir = plugin_dir
        # The socket's generation: 1 (the plain name) until the kubelet refuses the path
        # (see next_socket); a new server object starts again from 1.
        self.socket_generation = 1
        self.socket_path = os.path.join(plugin_dir, socket_name(self.resource))
        self.env_var = resource_env_var(self.resource)
        self.registered = False
        self._server: rpc.Server | None = None
        self._lifecycle = asyncio.Lock()  # start() and stop() never interleave
        # None in a queue ends that stream (server stopping).
        self._watchers: set[asyncio.Queue[bytes | None]] = set()
        # unit id -> (health, encoded Device): a unit's bytes are re-encoded only when it changes
        self._msgs: dict[str, tuple[str, bytes]] = {}
        self._snapshot = b""  # the encoded ListAndWatchResponse
        self._msg_list: list[bytes] = []
        self._msg_index: dict[str, int] = {}

    # ---- ListAndWatch messages ----------------------------------------------------------
    def _device_msg(self, adv: Advertised) -> bytes:
        cached = self._msgs.get(adv.unit.id)
        health = adv.verdict.kubelet
        if cached is not None and cached[0] == health:
            return cached[1]
        b = device_bytes(adv)
        self._msgs[adv.unit.id] = (health, b)
        return b

    def _published_hook(self, changed: Mapping[str, Advertised] | None) -> None:
        if changed is None:
            for gone in self._msgs.keys() - self.devices.keys():
                del self._msgs[gone]
            self._msg_list = [self._device_msg(a) for a in self.devices.values()]
            self._msg_index = {k: i for i, k in enumerate(self.devices)}
        else:
            for dev_id, adv in changed.items():
                self._msg_list[self._msg_index[dev_id]] = self._device_msg(adv)
        snap = b"".join(self._msg_list)
        self._snapshot = snap
        for q in self._watchers:
            if q.full():
                q.get_nowait()  # only the newest list matters
            q.put_nowait(snap)

    # ---- server lifecycle ---------------------------------------------------------------
    @property
    def serving(self) -> bool:
        return self._server is not None

    @property
    def kubelet_current(self) -> bool:
        """The kubelet was handed the current list (the same bytes object)."""
        return self.delivered is self._snapshot

    def _methods(self) -> dict[str, rpc.Method]:
        svc = msg.DEVICE_PLUGIN_SERVICE
        return {
            svc + "GetDevicePluginOptions": rpc.Method(msg.EMPTY, self.GetDevicePluginOptions),
            svc + "ListAndWatch": rpc.Method(msg.EMPTY, self.ListAndWatch, streaming=True),
            svc + "GetPreferredAllocation": rpc.Method(
                msg.PREFERRED_ALLOCATION_REQUEST, self.GetPreferredAllocation
            ),
            svc + "Allocate": rpc.Method(msg.ALLOCATE_REQUEST, self.Allocate),
            svc + "PreStartContainer": rpc.Method(
                msg.PRE_START_CONTAINER_REQUEST, self.PreStartContainer
            ),
        }

    async def start(self) -> None:
        async with self._lifecycle:  # a stop() racing with this waits for the server to exist
            await self._start()

    async def _start(self) -> None:
        if self.socket_generation == 1:
            self._remove_later_sockets()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a stale socket from an earlier run
        server = rpc.Server(self._methods())
        await server.start(self.socket_path)
        self._server = server
        self.registered = False
        log.info("%s: serving on %s", self.resource, self.socket_path)

    def _remove_later_sockets(self) -> None:
        """Remove this resource's later-generation sockets an earlier run left behind."""
        try:
            names = os.listdir(self.plugin_dir)
        except OSError:
            return
        for name in names:
            if (socket_generation(self.resource, name) or 1) > 1:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.plugin_dir, name))

    async def next_socket(self) -> str:
        """Serve on the next generation's socket path, because the kubelet refuses to register
        the current one (its device manager keeps a stale endpoint there: see
        docs/DESIGN.md). The current socket is removed; a path a file already holds (another
        agent's socket, say) is skipped. Returns the path given up."""
        async with self._lifecycle:
            old, serving = self.socket_path, self._server is not None
            await self._stop(remove_socket=True)
            self.socket_generation = self._free_generation(self.socket_generation + 1)
            self.socket_path = self._socket_path(self.socket_generation)
            if serving:  # else whoever stopped the server starts it again (on the new path)
                await self._start()
        return old

    def _socket_path(self, generation: int) -> str:
        return os.path.join(self.plugin_dir, socket_name(self.resource, generation))

    def _free_generation(self, generation: int) -> int:
        """``generation`` or the first later one without a socket file (a stat each)."""
        while os.path.exists(self._socket_path(generation)):
            generation += 1
        return generation

    async def stop(self, *, remove_socket: bool = True) -> None:
        """Stop serving; returns once the server is down and (by default) its socket is gone."""
        async with self._lifecycle:
            await self._stop(remove_socket=remove_socket)

    async def _stop(self, *, remove_socket: bool) -> None:
        server, self._server = self._server, None
        self.registered = False
        for q in self._watchers:
            # End the streams ourselves (the kubelet then sees a clean end of the call).
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
        """Register with the kubelet (raises :class:`rpc.RpcError` on failure)."""
        kubelet = os.path.join(self.plugin_dir, KUBELET_SOCKET)
        endpoint = os.path.basename(self.socket_path)
        req = msg.REGISTER_REQUEST.encode(
            {
                "version": API_VERSION,
                "endpoint": endpoint,
                "resource_name": self.resource,
                "options": _OPTIONS,
            }
        )
        try:
            await rpc.call(kubelet, msg.REGISTER, req, within=rpc_timeout, wait_for_ready=True)
        except rpc.RpcError:
            self.metrics.registrations.labels(self.resource, "error").inc()
            raise
        self.registered = True
        self.metrics.registrations.labels(self.resource, "ok").inc()
        log.info("%s: registered with the kubelet as %s", self.resource, endpoint)

    # ---- DevicePlugin RPCs --------------------------------------------------------------
    async def GetDevicePluginOptions(self, request: dict[str, Any]) -> bytes:  # noqa: N802
        return _OPTIONS_BYTES

    async def ListAndWatch(self, request: dict[str, Any]) -> AsyncIterator[bytes]:  # noqa: N802
        q: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)
        self._watchers.add(q)
        log.info("%s: kubelet watching (%d devices)", self.resource, len(self.devices))
        try:
            snap: bytes | None = self._snapshot
            while snap is not None:
                yield snap  # returns once it is written out (the stream's flow control)
                self.delivered = snap
                if self._on_delivered is not None:
                    self._on_delivered()
                snap = await q.get()
        finally:
            self._watchers.discard(q)

    async def GetPreferredAllocation(self, request: dict[str, Any]) -> bytes:  # noqa: N802
        units = {k: a.unit for k, a in self.devices.items()}
        out = []
        for creq in request["container_requests"]:
            ids = preferred_allocation(
                units,
                creq["available_deviceIDs"],
                creq["must_include_deviceIDs"],
                creq["allocation_size"],
                self.config.strategy,
            )
            out.append({"deviceIDs": ids})
        return msg.PREFERRED_ALLOCATION_RESPONSE.encode({"container_responses": out})

    async def Allocate(self, request: dict[str, Any]) -> bytes:  # noqa: N802
        start = time.perf_counter()
        try:
            responses = [
                self.container_response(creq["devices_ids"])
                for creq in request["container_requests"]
            ]
        except AllocationRefusedError as e:
            self.metrics.errors.labels(self.resource, "allocate").inc()
            log.error("%s: Allocate refused: %s", self.resource, e)
            raise rpc.RpcError(e.code, f"{self.resource}: {e}") from None
        out = msg.ALLOCATE_RESPONSE.encode({"container_responses": responses})
        self.metrics.allocations.labels(self.resource).inc()
        self.metrics.allocate_seconds.labels(self.resource).observe(time.perf_counter() - start)
        return out

    async def PreStartContainer(self, request: dict[str, Any]) -> bytes:  # noqa: N802
        return _EMPTY  # not requested at registration; nothing to do

    # ---- Allocate: the KubeVirt contract ------------------------------------------------
    def container_response(self, ids: Iterable[str]) -> dict[str, Any]:
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
            raise AllocationRefusedError(rpc.INVALID_ARGUMENT, "no device IDs requested")
        units: list[AllocUnit] = []
        cdevs: list[str] = []
        for dev_id in ids:
            if dev_id not in self.devices:
                raise AllocationRefusedError(
                    rpc.NOT_FOUND, f"unknown device {dev_id!r} for this resource"
                )
            try:
                checked = self.recheck(dev_id)
            except UnitRefusedError as e:
                raise AllocationRefusedError(rpc.FAILED_PRECONDITION, str(e)) from None
            units.append(checked.unit)
            cdevs.extend(checked.cdevs)
        env = ",".join(str(a) for a in kubevirt_addresses(units))
        groups = dict.fromkeys(u.group for u in units)
        paths = [VFIO_CONTAINER, *(f"/dev/vfio/{g}" for g in groups)]
        if os.path.exists(self.sysfs.path(IOMMUFD)):
            paths.append(IOMMUFD)
            paths.extend(f"/dev/vfio/devices/{c}" for c in cdevs)
        specs = [
            {"container_path": p, "host_path": p, "permissions": PERMISSIONS}
            for p in dict.fromkeys(paths)
        ]
        self.mark_allocated(ids)
        self.metrics.allocated_devices.labels(self.resource).inc(len(ids))
        log.info("%s: allocated %s -> %s", self.resource, ",".join(ids), env)
        return {"envs": {self.env_var: env}, "devices": specs}
