"""The agent's own gRPC (deviceplugin/wire) against the real thing: every message schema against
the descriptors generated from the .proto files, encodings against the protobuf runtime, and
calls both ways against grpcio (unary, server streaming, errors, flow control, bad peers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor

from hostdev.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as dp
from hostdev.deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc as dp_grpc
from hostdev.deviceplugin.api.dra.v1 import api_pb2 as dra_v1
from hostdev.deviceplugin.api.dra.v1beta1 import api_pb2 as dra_v1beta1
from hostdev.deviceplugin.api.drahealth.v1 import api_pb2 as health_v1
from hostdev.deviceplugin.api.drahealth.v1alpha1 import api_pb2 as health_v1alpha1
from hostdev.deviceplugin.api.pluginregistration.v1 import api_pb2 as reg
from hostdev.deviceplugin.api.podresources.v1 import api_pb2 as podres
from hostdev.deviceplugin.wire import h2, rpc
from hostdev.deviceplugin.wire import messages as m
from hostdev.deviceplugin.wire.pb import BOOL, INT, MAP, MESSAGE, STRING, DecodeError, Schema

# schema -> the generated message class it stands for (v1 where two versions share a schema)
PAIRS: list[tuple[Schema, Any]] = [
    (m.DEVICE_PLUGIN_OPTIONS, dp.DevicePluginOptions),
    (m.REGISTER_REQUEST, dp.RegisterRequest),
    (m.EMPTY, dp.Empty),
    (m.LIST_AND_WATCH_RESPONSE, dp.ListAndWatchResponse),
    (m.DEVICE, dp.Device),
    (m.TOPOLOGY_INFO, dp.TopologyInfo),
    (m.NUMA_NODE, dp.NUMANode),
    (m.PRE_START_CONTAINER_REQUEST, dp.PreStartContainerRequest),
    (m.PRE_START_CONTAINER_RESPONSE, dp.PreStartContainerResponse),
    (m.PREFERRED_ALLOCATION_REQUEST, dp.PreferredAllocationRequest),
    (m.CONTAINER_PREFERRED_ALLOCATION_REQUEST, dp.ContainerPreferredAllocationRequest),
    (m.PREFERRED_ALLOCATION_RESPONSE, dp.PreferredAllocationResponse),
    (m.CONTAINER_PREFERRED_ALLOCATION_RESPONSE, dp.ContainerPreferredAllocationResponse),
    (m.ALLOCATE_REQUEST, dp.AllocateRequest),
    (m.CONTAINER_ALLOCATE_REQUEST, dp.ContainerAllocateRequest),
    (m.ALLOCATE_RESPONSE, dp.AllocateResponse),
    (m.CONTAINER_ALLOCATE_RESPONSE, dp.ContainerAllocateResponse),
    (m.MOUNT, dp.Mount),
    (m.DEVICE_SPEC, dp.DeviceSpec),
    (m.CDI_DEVICE, dp.CDIDevice),
    (m.PLUGIN_INFO, reg.PluginInfo),
    (m.REGISTRATION_STATUS, reg.RegistrationStatus),
    (m.REGISTRATION_STATUS_RESPONSE, reg.RegistrationStatusResponse),
    (m.INFO_REQUEST, reg.InfoRequest),
    (m.CLAIM, dra_v1.Claim),
    (m.NODE_PREPARE_RESOURCES_REQUEST, dra_v1.NodePrepareResourcesRequest),
    (m.NODE_UNPREPARE_RESOURCES_REQUEST, dra_v1.NodeUnprepareResourcesRequest),
    (m.DRA_DEVICE, dra_v1.Device),
    (m.NODE_PREPARE_RESOURCE_RESPONSE, dra_v1.NodePrepareResourceResponse),
    (m.NODE_PREPARE_RESOURCES_RESPONSE, dra_v1.NodePrepareResourcesResponse),
    (m.NODE_UNPREPARE_RESOURCE_RESPONSE, dra_v1.NodeUnprepareResourceResponse),
    (m.NODE_UNPREPARE_RESOURCES_RESPONSE, dra_v1.NodeUnprepareResourcesResponse),
    (m.DEVICE_IDENTIFIER, health_v1.DeviceIdentifier),
    (m.DEVICE_HEALTH, health_v1.DeviceHealth),
    (m.NODE_WATCH_RESOURCES_RESPONSE, health_v1.NodeWatchResourcesResponse),
]
# Fields of the .protos the agent never reads are left out of its schemas on purpose.
UNREAD = {
    "ContainerResources": {"memory"},  # PodResources: memory and its topology
}
PARTIAL = [
    (m.LIST_POD_RESOURCES_RESPONSE, podres.ListPodResourcesResponse),
    (m.POD_RESOURCES, podres.PodResources),
    (m.CONTAINER_RESOURCES, podres.ContainerResources),
    (m.CONTAINER_DEVICES, podres.ContainerDevices),
    (m.DYNAMIC_RESOURCE, podres.DynamicResource),
    (m.CLAIM_RESOURCE, podres.ClaimResource),
]
_KINDS = {
    FieldDescriptor.TYPE_STRING: STRING,
    FieldDescriptor.TYPE_BOOL: BOOL,
    FieldDescriptor.TYPE_INT32: INT,
    FieldDescriptor.TYPE_INT64: INT,
    FieldDescriptor.TYPE_UINT64: INT,
    FieldDescriptor.TYPE_ENUM: INT,
    FieldDescriptor.TYPE_MESSAGE: MESSAGE,
}


def _check(schema: Schema, cls: Any, skip: set[str]) -> None:
    desc = cls.DESCRIPTOR
    assert schema.name == desc.name
    wanted = {f.name: f for f in desc.fields if f.name not in skip}
    assert set(schema.by_name) - skip == set(wanted), f"{desc.full_name}: fields differ"
    for name, fd in wanted.items():
        f = schema.by_name[name]
        assert f.number == fd.number, f"{desc.full_name}.{name}: number"
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            assert f.kind == MAP, f"{desc.full_name}.{name}: a map"
            value = fd.message_type.fields_by_name["value"]
            if value.message_type is None:
                assert f.message is None
            else:
                assert f.message is not None and f.message.name == value.message_type.name
            continue
        assert f.kind == _KINDS[fd.type], f"{desc.full_name}.{name}: kind"
        assert f.repeated == fd.is_repeated, name
        scalar_presence = fd.has_presence and fd.type != FieldDescriptor.TYPE_MESSAGE
        assert f.optional == (scalar_presence and not fd.is_repeated), name
        if fd.message_type is not None:
            assert f.message is not None and f.message.name == fd.message_type.name


@pytest.mark.parametrize(("schema", "cls"), PAIRS, ids=lambda x: getattr(x, "name", ""))
def test_schemas_match_the_protos(schema: Schema, cls: Any) -> None:
    _check(schema, cls, set())


@pytest.mark.parametrize(("schema", "cls"), PARTIAL, ids=lambda x: getattr(x, "name", ""))
def test_podresources_schemas_are_the_protos_minus_unread_fields(schema: Schema, cls: Any) -> None:
    _check(schema, cls, UNREAD.get(schema.name, set()))


def test_the_other_api_versions_carry_the_same_messages() -> None:
    # v1beta1 DRA lacks share_id only; dra-health v1alpha1 equals v1.
    _check(m.CLAIM, dra_v1beta1.Claim, set())
    _check(m.NODE_PREPARE_RESOURCES_RESPONSE, dra_v1beta1.NodePrepareResourcesResponse, set())
    _check(m.DRA_DEVICE, dra_v1beta1.Device, {"share_id"})
    _check(m.DEVICE_HEALTH, health_v1alpha1.DeviceHealth, set())


def test_encodings_match_the_protobuf_runtime() -> None:
    resp = {
        "container_responses": [
            {
                "envs": {"PCI_RESOURCE_EXAMPLE_COM_VF": "0000:3b:02.0,0000:3b:02.1", "E": ""},
                "devices": [
                    {"container_path": "/dev/vfio/vfio", "host_path": "/dev/vfio/vfio"},
                    {
                        "container_path": "/dev/vfio/7",
                        "host_path": "/dev/vfio/7",
                        "permissions": "mrw",
                    },
                ],
                "annotations": {"a": "é"},
            },
            {},
        ]
    }
    ours = m.ALLOCATE_RESPONSE.encode(resp)
    theirs = dp.AllocateResponse.FromString(ours)
    assert theirs.container_responses[0].envs["PCI_RESOURCE_EXAMPLE_COM_VF"].endswith("02.1")
    assert theirs.container_responses[0].annotations["a"] == "é"
    assert len(theirs.container_responses) == 2
    # Both ways: the runtime's bytes decode to the same dict, ours re-encode identically.
    assert m.ALLOCATE_RESPONSE.decode(theirs.SerializeToString()) == m.ALLOCATE_RESPONSE.decode(
        ours
    )
    dev = dp.Device(ID="0000:3b:02.0", health="Healthy")
    dev.topology.nodes.add(ID=1)
    assert m.DEVICE.encode(m.DEVICE.decode(dev.SerializeToString())) == dev.SerializeToString()
    # negative int64 (two's complement, ten bytes) and proto3 optional presence
    h = health_v1.DeviceHealth(last_updated_time=-5, health=health_v1.UNHEALTHY)
    assert m.DEVICE_HEALTH.decode(h.SerializeToString())["last_updated_time"] == -5
    assert m.DEVICE_HEALTH.encode({"last_updated_time": -5, "health": 2}) == h.SerializeToString()
    with_share = dra_v1.Device(device_name="d", share_id="")
    assert (
        m.DRA_DEVICE.encode({"device_name": "d", "share_id": ""}) == with_share.SerializeToString()
    )
    assert (
        m.DRA_DEVICE.decode(dra_v1.Device(device_name="d").SerializeToString())["share_id"] is None
    )


def test_unknown_fields_are_skipped_and_garbage_refused() -> None:
    # A newer kubelet's extra field (number 9, every wire type) is ignored.
    extra = b"\x48\x01" + b"\x52\x02hi" + b"\x4d\x00\x00\x00\x00" + b"\x49" + b"\x00" * 8
    got = m.CONTAINER_ALLOCATE_REQUEST.decode(extra + b"\x0a\x01a")
    assert got == {"devices_ids": ["a"]}
    for bad in (b"\x0a\x05ab", b"\x0a", b"\x80", b"\x0a\x02\xff\xfe", b"\x00\x01", b"\x0b"):
        with pytest.raises(DecodeError):
            m.CONTAINER_ALLOCATE_REQUEST.decode(bad)
    # packed and unpacked repeated varints read the same
    packed = podres.ContainerResources(name="c", cpu_ids=[1, 2, 300]).SerializeToString()
    assert m.CONTAINER_RESOURCES.decode(packed)["cpu_ids"] == [1, 2, 300]
    unpacked = b"\x0a\x01c" + b"\x18\x01\x18\x02\x18\xac\x02"
    assert m.CONTAINER_RESOURCES.decode(unpacked)["cpu_ids"] == [1, 2, 300]


def test_grpc_message_percent_encoding_round_trips() -> None:
    for text in ("plain", "100% sure", "é unicode, ümlaut\nnewline", ""):
        assert rpc.percent_decode(rpc.percent_encode(text)) == text
    assert rpc.percent_encode("a%b\n") == "a%25b%0A"
    assert rpc.percent_decode("bad %zz and %4") == "bad %zz and %4"


# ---- calls against grpcio ------------------------------------------------------------------
async def _allocate(req: dict[str, Any]) -> bytes:
    ids = [i for c in req["container_requests"] for i in c["devices_ids"]]
    if ids == ["refuse"]:
        raise rpc.RpcError(rpc.FAILED_PRECONDITION, "device refuse: not on vfio-pci (ü 100%)")
    if ids == ["crash"]:
        raise ValueError("a bug")
    return m.ALLOCATE_RESPONSE.encode({"container_responses": [{"envs": {"X": ",".join(ids)}}]})


def _devices(n: int) -> bytes:
    return m.LIST_AND_WATCH_RESPONSE.encode(
        {"devices": [{"ID": f"0000:{i // 256:02x}:{i % 256 // 8:02x}.{i % 8}"} for i in range(n)]}
    )


async def _watch(req: dict[str, Any]) -> AsyncIterator[bytes]:
    # Lists far above one flow-control window (64 KiB) and one frame (16 KiB).
    for n in (3, 20_000, 5):
        yield _devices(n)


@contextlib.asynccontextmanager
async def _server(tmp: str) -> AsyncIterator[str]:
    path = os.path.join(tmp, "p.sock")
    svc = m.DEVICE_PLUGIN_SERVICE
    server = rpc.Server(
        {
            svc + "Allocate": rpc.Method(m.ALLOCATE_REQUEST, _allocate),
            svc + "ListAndWatch": rpc.Method(m.EMPTY, _watch, streaming=True),
        }
    )
    await server.start(path)
    try:
        yield path
    finally:
        await server.stop()


async def test_grpcio_client_against_our_server(short_tmp: str) -> None:
    async with _server(short_tmp) as path, grpc.aio.insecure_channel(f"unix://{path}") as ch:
        stub = dp_grpc.DevicePluginStub(ch)
        req = dp.AllocateRequest()
        req.container_requests.add(devices_ids=["a", "b"])
        resp = await stub.Allocate(req, timeout=5)
        assert resp.container_responses[0].envs["X"] == "a,b"
        for ids, code, text in (
            (["refuse"], grpc.StatusCode.FAILED_PRECONDITION, "not on vfio-pci (ü 100%)"),
            (["crash"], grpc.StatusCode.INTERNAL, "ValueError: a bug"),
        ):
            bad = dp.AllocateRequest()
            bad.container_requests.add(devices_ids=ids)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Allocate(bad, timeout=5)
            assert err.value.code() == code and text in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetPreferredAllocation(dp.PreferredAllocationRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        sizes = [len(r.devices) async for r in stub.ListAndWatch(dp.Empty(), timeout=30)]
        assert sizes == [3, 20_000, 5]
        # many calls on one connection (stream ids, HPACK state, windows all keep up)
        got = await asyncio.gather(
            *(
                stub.Allocate(dp.AllocateRequest(container_requests=[req.container_requests[0]]))
                for _ in range(50)
            )
        )
        assert {r.container_responses[0].envs["X"] for r in got} == {"a,b"}


class _Registration(dp_grpc.RegistrationServicer):
    def __init__(self) -> None:
        self.seen: list[dp.RegisterRequest] = []

    async def Register(self, request: dp.RegisterRequest, context: Any) -> dp.Empty:
        self.seen.append(request)
        if request.resource_name == "example.com/refused":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "version unsupported: ü")
        return dp.Empty()


async def test_our_client_against_a_grpcio_server(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "kubelet.sock")
    servicer = _Registration()
    server = grpc.aio.server()
    dp_grpc.add_RegistrationServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    try:
        body = {
            "version": "v1beta1",
            "endpoint": "x.sock",
            "resource_name": "example.com/vf",
            "options": {"get_preferred_allocation_available": True},
        }
        assert await rpc.call(path, m.REGISTER, m.REGISTER_REQUEST.encode(body)) == b""
        assert servicer.seen[0].options.get_preferred_allocation_available
        assert servicer.seen[0].endpoint == "x.sock"
        refused = m.REGISTER_REQUEST.encode({**body, "resource_name": "example.com/refused"})
        with pytest.raises(rpc.RpcError) as err:
            await rpc.call(path, m.REGISTER, refused)
        assert (
            err.value.code == rpc.INVALID_ARGUMENT and err.value.details == "version unsupported: ü"
        )
        with pytest.raises(rpc.RpcError) as err:
            await rpc.call(path, "/v1beta1.Registration/Nope", b"")
        assert err.value.code == rpc.UNIMPLEMENTED
    finally:
        await server.stop(0)
    with pytest.raises(rpc.RpcError) as err:
        await rpc.call(path, m.REGISTER, b"", within=0.3, wait_for_ready=True)
    assert err.value.code == rpc.UNAVAILABLE


def _frames_after(path: str, junk: bytes) -> list[int]:
    """The frame types a server sends to a peer that sent ``junk``, until it closes."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(junk)
        s.settimeout(5)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    kinds, pos = [], 0
    while pos + 9 <= len(data):
        kinds.append(data[pos + 3])
        pos += 9 + struct.unpack(">I", b"\x00" + data[pos : pos + 3])[0]
    return kinds


async def test_a_peer_that_is_not_http2_is_dropped_and_the_server_goes_on(short_tmp: str) -> None:
    async with _server(short_tmp) as path:
        for junk in (
            b"GET / HTTP/1.1\r\n\r\n",
            h2.PREFACE + b"\x00\xff\xff\x00\x00\x00\x00\x00\x01",
        ):
            kinds = await asyncio.to_thread(_frames_after, path, junk)
            assert h2.SETTINGS in kinds and h2.GOAWAY in kinds  # told why, then closed
        async with grpc.aio.insecure_channel(f"unix://{path}") as ch:
            req = dp.AllocateRequest()
            req.container_requests.add(devices_ids=["still"])
            resp = await dp_grpc.DevicePluginStub(ch).Allocate(req, timeout=5)
            assert resp.container_responses[0].envs["X"] == "still"


class _Wire(asyncio.Transport):
    """A transport for a connection driven by hand: what it was given to send, and whether it
    was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.wrote = asyncio.Event()
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))
        self.wrote.set()

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def test_a_connection_set_up_while_the_server_stops_is_ended_not_served(
    short_tmp: str,
) -> None:
    """asyncio calls connection_made a little after the accept: a connection accepted just
    before stop() closed the listener is set up after stop() looked at its connections."""
    server = rpc.Server({"/t.T/Allocate": rpc.Method(m.ALLOCATE_REQUEST, _allocate)})
    await server.start(os.path.join(short_tmp, "p.sock"))
    stopping = asyncio.create_task(server.stop())
    await asyncio.sleep(0)  # stop() runs up to its first wait: the listener is closed
    assert not server.serving
    late, wire = rpc._ServerConnection(server), _Wire()
    late.connection_made(wire)
    assert wire.closed and late.closed and late not in server.connections
    sent = b"".join(wire.writes)
    assert sent[3] == h2.SETTINGS and h2.frame(h2.GOAWAY, 0, 0, b"\0" * 8) in sent
    await stopping


def test_blocking_client_from_a_thread(short_tmp: str) -> None:
    path = str(Path(short_tmp) / "k.sock")

    async def serve_then_call() -> bytes:
        server = grpc.aio.server()
        dp_grpc.add_RegistrationServicer_to_server(_Registration(), server)
        server.add_insecure_port(f"unix://{path}")
        await server.start()
        try:
            return await asyncio.to_thread(rpc.call_blocking, path, m.REGISTER, b"")
        finally:
            await server.stop(0)

    assert asyncio.run(serve_then_call()) == b""


def test_header_blocks_decode_as_hpack_does_while_the_peer_table_changes() -> None:
    """An all-indexed header block is decoded once per connection and then reused; a block that
    adds to the peer's dynamic table shifts what the same indexed bytes mean, and is honoured."""
    from hpack import Decoder, Encoder

    seen: list[tuple[tuple[str, str], ...] | None] = []

    class Recorder(h2.Connection):
        def on_headers(self, s: h2.Stream) -> None:
            seen.append(s.headers)

    conn, reference, enc = Recorder(), Decoder(), Encoder()
    newest, second = b"\xbe", b"\xbf"  # dynamic table entries 62 and 63, indexed
    blocks = [
        enc.encode([("x-a", "1")]),  # a literal added to the table: 62 = x-a
        newest,
        newest,  # the same bytes again: from the cache
        enc.encode([("x-b", "2")]),  # 62 = x-b now, 63 = x-a
        newest,
        second,
        newest,
    ]
    for sid, block in enumerate(blocks, start=1):
        conn._header_block(h2.Stream(sid, 65535), sid, 0, block)
    expected = [tuple((str(n), str(v)) for n, v in reference.decode(b)) for b in blocks]
    assert seen == expected
    assert [h[0] for h in seen[4:]] == [("x-b", "2"), ("x-a", "1"), ("x-b", "2")]


async def test_a_ping_and_the_call_it_came_with_are_answered_in_one_send() -> None:
    """grpc-go sends a PING with its calls: the ack waits for the call's answer and both leave
    in one write (one wake-up of the peer); nothing is sent before the handler has run."""
    from hpack import Encoder

    wire = _Wire()
    writes, wrote = wire.writes, wire.wrote

    async def empty(request: dict[str, Any]) -> bytes:
        return b""

    conn = rpc._ServerConnection(rpc.Server({"/t.T/Empty": rpc.Method(m.EMPTY, empty)}))
    conn.connection_made(wire)
    writes.clear()  # our SETTINGS
    wrote.clear()
    block = Encoder().encode(
        [(":method", "POST"), (":scheme", "http"), (":path", "/t.T/Empty"),
         (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")]
    )  # fmt: skip
    conn.data_received(
        h2.PREFACE
        + h2.frame(h2.SETTINGS, 0, 0)
        + h2.frame(h2.PING, 0, 0, b"probe!!!")
        + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, block)
        + h2.frame(h2.DATA, h2.END_STREAM, 1, b"\0\0\0\0\0")
    )
    assert writes == []
    await asyncio.wait_for(wrote.wait(), 10)
    (out,) = writes
    frames = []
    while out:
        size = int.from_bytes(out[:3], "big")
        frames.append((out[3], out[4], int.from_bytes(out[5:9], "big"), out[9 : 9 + size]))
        out = out[9 + size :]
    assert [f[:3] for f in frames] == [
        (h2.SETTINGS, h2.ACK, 0),
        (h2.PING, h2.ACK, 0),
        (h2.HEADERS, h2.END_HEADERS, 1),
        (h2.DATA, 0, 1),
        (h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1),  # the trailers
    ]
    assert frames[1][3] == b"probe!!!" and b"grpc-status" in frames[4][3]
