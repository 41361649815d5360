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

from hostdev.deviceplugin.dra.prepare import Answer, ClaimKey
from hostdev.deviceplugin.wire import messages as msg
from hostdev.deviceplugin.wire import rpc
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
_EMPTY = b""


def _claims(request: Mapping[str, Any]) -> list[ClaimKey]:
    return [ClaimKey(c["namespace"], c["uid"], c["name"]) for c in request["claims"]]


def prepare_response(pool: str, answers: Mapping[str, Answer]) -> bytes:
    """NodePrepareResourcesResponse (v1 and v1beta1 encode alike: v1 only adds share_id)."""
    claims: dict[str, dict[str, Any]] = {}
    for uid, a in answers.items():
        if a.error:
            claims[uid] = {"error": a.error}
            continue
        claims[uid] = {
            "devices": [
                {
                    "request_names": list(d.requests),
                    "pool_name": pool,
                    "device_name": d.device,
                    "cdi_device_ids": list(d.cdi_ids),
                }
                for d in a.devices
            ]
        }
    return msg.NODE_PREPARE_RESOURCES_RESPONSE.encode({"claims": claims})


def unprepare_response(errors: Mapping[str, str]) -> bytes:
    return msg.NODE_UNPREPARE_RESOURCES_RESPONSE.encode(
        {"claims": {uid: {"error": err} for uid, err in errors.items()}}
    )


def health_message(pool: str, rows: Sequence[tuple[str, bool, str]], timeout: int) -> bytes:
    """A NodeWatchResourcesResponse for ``rows`` (v1 and v1alpha1: the same shape)."""
    now = int(time.time())
    return msg.NODE_WATCH_RESOURCES_RESPONSE.encode(
        {
            "devices": [
                {
                    "device": {"pool_name": pool, "device_name": name},
                    "health": msg.HEALTHY if healthy else msg.UNHEALTHY,
                    "last_updated_time": now,
                    "health_check_timeout_seconds": timeout,
                    "message": why[:1024],
                }
                for name, healthy, why in rows
            ]
        }
    )


async def _health_stream(fe: DraFrontEnd) -> AsyncIterator[bytes]:
    """Every device at first and every ``health_interval``; in between, on a change, only the
    devices whose row changed. The kubelet keeps what a report leaves out (it times a device
    out to Unknown only after ``health_timeout`` without news, which the full resends prevent),
    so a unit going Unhealthy on a 4,096-unit node is one row, not 4,096 (~40 ms to encode)."""
    q = fe.health_subscribe()
    try:
        rows = fe.health_rows
        sent: frozenset[tuple[str, bool, str]] = frozenset()
        full = True
        while rows is not None:
            if full:
                yield health_message(fe.pool, rows, fe.health_timeout)
            else:
                changed = [r for r in rows if r not in sent]
                if changed:
                    yield health_message(fe.pool, changed, fe.health_timeout)
            sent = frozenset(rows)
            try:
                rows = await asyncio.wait_for(q.get(), timeout=fe.health_interval)
                full = False
            except TimeoutError:
                rows, full = fe.health_rows, True
    finally:
        fe.health_unsubscribe(q)


def dra_server(fe: DraFrontEnd) -> rpc.Server:
    """DRA v1 and v1beta1 and dra-health v1 and v1alpha1 on the plugin socket."""

    async def prepare(request: dict[str, Any]) -> bytes:
        return prepare_response(fe.pool, await fe.prepare(_claims(request)))

    async def unprepare(request: dict[str, Any]) -> bytes:
        return unprepare_response(await fe.unprepare(_claims(request)))

    def watch(version: str) -> rpc.Streaming:
        async def run(request: dict[str, Any]) -> AsyncIterator[bytes]:
            log.info("DRA: the kubelet watches device health (%s)", version)
            async for m in _health_stream(fe):
                yield m

        return run

    methods: dict[str, rpc.Method] = {}
    for svc in msg.DRA_SERVICES:
        methods[svc + "NodePrepareResources"] = rpc.Method(
            msg.NODE_PREPARE_RESOURCES_REQUEST, prepare
        )
        methods[svc + "NodeUnprepareResources"] = rpc.Method(
            msg.NODE_UNPREPARE_RESOURCES_REQUEST, unprepare
        )
    for svc in msg.HEALTH_SERVICES:
        version = svc.strip("/").split(".")[0]
        methods[svc + "NodeWatchResources"] = rpc.Method(msg.EMPTY, watch(version), streaming=True)
    return rpc.Server(methods)


def registration_server(fe: DraFrontEnd) -> rpc.Server:
    async def get_info(request: dict[str, Any]) -> bytes:
        return msg.PLUGIN_INFO.encode(
            {
                "type": PLUGIN_TYPE,
                "name": DRIVER,
                "endpoint": fe.socket_path,
                "supported_versions": list(SERVICES),
            }
        )

    async def notify(request: dict[str, Any]) -> bytes:
        fe.registration_status(request["plugin_registered"], request["error"])
        return _EMPTY

    svc = msg.PLUGIN_REGISTRATION_SERVICE
    return rpc.Server(
        {
            svc + "GetInfo": rpc.Method(msg.INFO_REQUEST, get_info),
            svc + "NotifyRegistrationStatus": rpc.Method(msg.REGISTRATION_STATUS, notify),
        }
    )
