"""The kubelet-facing gRPC services of the DRA plugin, thin over :class:`DraFrontEnd`.

- Registration (``pluginregistration/v1``) on ``<plugins_registry>/pci.hostdev.io-reg.sock``:
  GetInfo says "DRAPlugin pci.hostdev.io at <plugins>/pci.hostdev.io/dra.sock" and lists the
  services below; the kubelet picks the first DRA version it knows (in our order) and the
  newest health version it knows.
- On ``dra.sock``: DRA ``v1`` and ``v1beta1`` (NodePrepareResources, NodeUnprepareResources)
  and dra-health ``v1`` and ``v1alpha1`` (NodeWatchResources).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from hostdev.deviceplugin.api.dra.v1 import api_pb2 as dra_v1
from hostdev.deviceplugin.api.dra.v1 import api_pb2_grpc as dra_v1_grpc
from hostdev.deviceplugin.api.dra.v1beta1 import api_pb2 as dra_v1beta1
from hostdev.deviceplugin.api.dra.v1beta1 import api_pb2_grpc as dra_v1beta1_grpc
from hostdev.deviceplugin.api.drahealth.v1 import api_pb2 as health_v1
from hostdev.deviceplugin.api.drahealth.v1 import api_pb2_grpc as health_v1_grpc
from hostdev.deviceplugin.api.drahealth.v1alpha1 import api_pb2 as health_v1alpha1
from hostdev.deviceplugin.api.drahealth.v1alpha1 import api_pb2_grpc as health_v1alpha1_grpc
from hostdev.deviceplugin.api.pluginregistration.v1 import api_pb2 as reg
from hostdev.deviceplugin.api.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from hostdev.deviceplugin.dra.prepare import Answer, ClaimKey
from hostdev.policy.dra import DRIVER

if TYPE_CHECKING:
    from hostdev.deviceplugin.dra.frontend import DraFrontEnd

log = logging.getLogger(__name__)

PLUGIN_TYPE = "DRAPlugin"
# Order matters: the kubelet takes the first DRA service it supports, so v1 comes first.
SERVICES = (
    "v1.DRAPlugin",
    "v1beta1.DRAPlugin",
    "v1.DRAResourceHealth",
    "v1alpha1.DRAResourceHealth",
)

Ctx = grpc.aio.ServicerContext[Any, Any]


def _claims(request: Any) -> list[ClaimKey]:
    return [ClaimKey(c.namespace, c.uid, c.name) for c in request.claims]


def _prepare_response(mod: Any, pool: str, answers: Mapping[str, Answer]) -> Any:
    resp = mod.NodePrepareResourcesResponse()
    for uid, a in answers.items():
        out = resp.claims[uid]
        if a.error:
            out.error = a.error
            continue
        for d in a.devices:
            out.devices.add(
                request_names=list(d.requests),
                pool_name=pool,
                device_name=d.device,
                cdi_device_ids=list(d.cdi_ids),
            )
    return resp


def _unprepare_response(mod: Any, errors: Mapping[str, str]) -> Any:
    resp = mod.NodeUnprepareResourcesResponse()
    for uid, err in errors.items():
        out = resp.claims[uid]
        if err:
            out.error = err
    return resp


class _Dra:
    """NodePrepareResources/NodeUnprepareResources for one API version (``mod``: its
    messages; v1 and v1beta1 name every field the same)."""

    mod: Any

    def __init__(self, fe: DraFrontEnd) -> None:
        self.fe = fe

    async def NodePrepareResources(self, request: Any, context: Ctx) -> Any:  # noqa: N802
        answers = await self.fe.prepare(_claims(request))
        return _prepare_response(self.mod, self.fe.pool, answers)

    async def NodeUnprepareResources(self, request: Any, context: Ctx) -> Any:  # noqa: N802
        errors = await self.fe.unprepare(_claims(request))
        return _unprepare_response(self.mod, errors)


class DraV1(_Dra, dra_v1_grpc.DRAPluginServicer):
    mod = dra_v1


class DraV1beta1(_Dra, dra_v1beta1_grpc.DRAPluginServicer):
    mod = dra_v1beta1


def health_message(mod: Any, pool: str, rows: Sequence[tuple[str, bool, str]], timeout: int) -> Any:
    """A complete NodeWatchResourcesResponse (v1 or v1alpha1: the same shape)."""
    now = int(time.time())
    resp = mod.NodeWatchResourcesResponse()
    for name, healthy, why in rows:
        resp.devices.add(
            device=mod.DeviceIdentifier(pool_name=pool, device_name=name),
            health=mod.HEALTHY if healthy else mod.UNHEALTHY,
            last_updated_time=now,
            health_check_timeout_seconds=timeout,
            message=why[:1024],
        )
    return resp


async def _health_stream(fe: DraFrontEnd, mod: Any) -> AsyncIterator[Any]:
    q = fe.health_subscribe()
    try:
        rows = fe.health_rows
        while rows is not None:
            yield health_message(mod, fe.pool, rows, fe.health_timeout)
            try:
                # The kubelet marks a device Unknown when not told for health_timeout: resend.
                rows = await asyncio.wait_for(q.get(), timeout=fe.health_interval)
            except TimeoutError:
                rows = fe.health_rows
    finally:
        fe.health_unsubscribe(q)


class _Health:
    """NodeWatchResources for one API version (``mod``: its messages)."""

    mod: Any

    def __init__(self, fe: DraFrontEnd) -> None:
        self.fe = fe

    async def NodeWatchResources(  # noqa: N802 (gRPC method name)
        self, request: Any, context: Ctx
    ) -> AsyncIterator[Any]:
        log.info("DRA: the kubelet watches device health (%s)", self.mod.__name__.split(".")[-2])
        async for msg in _health_stream(self.fe, self.mod):
            yield msg


class HealthV1(_Health, health_v1_grpc.DRAResourceHealthServicer):
    mod = health_v1


class HealthV1alpha1(_Health, health_v1alpha1_grpc.DRAResourceHealthServicer):
    mod = health_v1alpha1


class Registration(reg_grpc.RegistrationServicer):
    def __init__(self, fe: DraFrontEnd) -> None:
        self.fe = fe

    async def GetInfo(  # noqa: N802 (gRPC method name)
        self, request: reg.InfoRequest, context: Ctx
    ) -> reg.PluginInfo:
        return reg.PluginInfo(
            type=PLUGIN_TYPE,
            name=DRIVER,
            endpoint=self.fe.socket_path,
            supported_versions=list(SERVICES),
        )

    async def NotifyRegistrationStatus(  # noqa: N802 (gRPC method name)
        self, request: reg.RegistrationStatus, context: Ctx
    ) -> reg.RegistrationStatusResponse:
        self.fe.registration_status(request.plugin_registered, request.error)
        return reg.RegistrationStatusResponse()


def dra_server(fe: DraFrontEnd) -> grpc.aio.Server:
    server = grpc.aio.server()
    dra_v1_grpc.add_DRAPluginServicer_to_server(DraV1(fe), server)
    dra_v1beta1_grpc.add_DRAPluginServicer_to_server(DraV1beta1(fe), server)
    health_v1_grpc.add_DRAResourceHealthServicer_to_server(HealthV1(fe), server)
    health_v1alpha1_grpc.add_DRAResourceHealthServicer_to_server(HealthV1alpha1(fe), server)
    return server


def registration_server(fe: DraFrontEnd) -> grpc.aio.Server:
    server = grpc.aio.server()
    reg_grpc.add_RegistrationServicer_to_server(Registration(fe), server)
    return server
