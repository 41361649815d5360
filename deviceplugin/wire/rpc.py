"""gRPC (unary and server-streaming calls, no compression) over :mod:`.h2` on unix sockets.

Server: :class:`Server` maps method paths (``/package.Service/Method``) to handlers. A handler
gets the decoded request (a dict, see :mod:`.pb`) and returns the encoded response (unary) or
yields encoded responses (server streaming); raising :class:`RpcError` ends the call with that
status. Responses are bytes so callers can cache encodings (a ListAndWatch list of thousands of
devices is re-sent as cached bytes).

Client: :func:`call` opens a connection to a unix socket, makes one unary call and closes it
(the agent's client calls are rare: Register, a PodResources List every half minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hostdev.deviceplugin.wire import h2
from hostdev.deviceplugin.wire.pb import DecodeError, Schema

log = logging.getLogger(__name__)

# Status codes (grpc/status.proto)
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 1, 2, 3, 4, 5
FAILED_PRECONDITION, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 9, 12, 13, 14
CODE_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}
MAX_MESSAGE = 16 << 20  # the largest message we accept (the kubelet's PodResources cap)


class RpcError(Exception):
    """A call that ended with a non-OK status; ``code`` is the gRPC status code."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(f"{CODE_NAMES.get(code, code)}: {details}")
        self.code = code
        self.details = details

    @property
    def code_name(self) -> str:
        return CODE_NAMES.get(self.code, str(self.code))


def _frame_message(msg: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(msg)) + msg


def _take_messages(buf: bytearray) -> list[bytes]:
    """Complete length-prefixed messages at the front of ``buf`` (removed from it)."""
    out = []
    pos = 0
    while len(buf) - pos >= 5:
        flag = buf[pos]
        size = struct.unpack_from(">I", buf, pos + 1)[0]
        if flag != 0:
            raise RpcError(UNIMPLEMENTED, "compressed messages are not supported")
        if size > MAX_MESSAGE:
            raise RpcError(13, f"message of {size} bytes is above the {MAX_MESSAGE} limit")
        if len(buf) - pos - 5 < size:
            break
        out.append(bytes(buf[pos + 5 : pos + 5 + size]))
        pos += 5 + size
    del buf[:pos]
    return out


def _status_headers(code: int, details: str) -> list[tuple[str, str]]:
    out = [("grpc-status", str(code))]
    if details:
        out.append(("grpc-message", percent_encode(details)))
    return out


def percent_encode(text: str) -> str:
    """grpc-message encoding: bytes outside printable ASCII, and '%', as %XX."""
    return "".join(
        chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in text.encode()
    )


def percent_decode(text: str) -> str:
    if "%" not in text:
        return text
    out = bytearray()
    i, raw = 0, text.encode()
    while i < len(raw):
        if raw[i] == 0x25 and _is_hex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(b: bytes) -> bool:
    return len(b) == 2 and all(c in b"0123456789abcdefABCDEF" for c in b)


_RESPONSE_HEADERS = h2.encode_headers([(":status", "200"), ("content-type", "application/grpc")])
_OK_TRAILERS = h2.encode_headers([("grpc-status", "0")])


# ---- server ---------------------------------------------------------------------------------
Unary = Callable[[dict[str, Any]], Awaitable[bytes]]
Streaming = Callable[[dict[str, Any]], AsyncIterator[bytes]]


@dataclass(frozen=True, slots=True)
class Method:
    request: Schema
    handler: Unary | Streaming
    streaming: bool = False


class _ServerConnection(h2.Connection):
    client = False

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.server = server
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.server.stopping:
            # Accepted while stop() ran (asyncio sets a connection up a little after the
            # accept): stop() no longer sees it, so it is ended here, not served.
            self.goaway()
            return
        self.server.connections.add(self)

    def _peer_opens(self, sid: int) -> h2.Stream | None:
        if sid % 2 == 0 or sid <= self.last_peer_stream:
            raise h2.ProtocolError(f"stream {sid} cannot be opened by a client")
        self.last_peer_stream = sid
        s = h2.Stream(sid, self.peer_initial_window)
        self.streams[sid] = s
        return s

    def on_headers(self, s: h2.Stream) -> None:
        if s.ended:
            self._dispatch(s)

    def on_data(self, s: h2.Stream) -> None:
        if len(s.data) > MAX_MESSAGE + 5:
            self._finish(s, RpcError(INTERNAL, "request too large"))
            return
        if s.ended:
            self._dispatch(s)

    def on_stream_reset(self, s: h2.Stream) -> None:
        task = s.owner
        if isinstance(task, asyncio.Task):
            task.cancel()

    def on_closed(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for t in list(self.tasks):
            t.cancel()

    def _dispatch(self, s: h2.Stream) -> None:
        headers = dict(s.headers or ())
        path = headers.get(":path", "")
        method = self.server.methods.get(path)
        if method is None:
            self._finish(s, RpcError(UNIMPLEMENTED, f"unknown method {path}"))
            return
        try:
            messages = _take_messages(s.data)
            if len(messages) != 1:
                raise RpcError(INTERNAL, f"{path}: expected one request message")
            request = method.request.decode(messages[0])
        except DecodeError as e:
            self._finish(s, RpcError(INTERNAL, f"{path}: cannot parse the request: {e}"))
            return
        except RpcError as e:
            self._finish(s, e)
            return
        task = asyncio.get_running_loop().create_task(self._run(s, path, method, request))
        s.owner = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, s: h2.Stream, path: str, method: Method, request: dict[str, Any]) -> None:
        try:
            if method.streaming:
                started = False
                async for msg in method.handler(request):  # type: ignore[union-attr]
                    if s.reset is not None or self.closed:
                        return
                    if not started:
                        self.send_headers(s, _RESPONSE_HEADERS)
                        started = True
                    self.send_data(s, _frame_message(msg))
                    await self.drained(s)  # back-pressure: one list at a time per watcher
                if not started:
                    self.send_headers(s, _RESPONSE_HEADERS)
                self.end_stream(s, _OK_TRAILERS)
            else:
                msg = await method.handler(request)  # type: ignore[misc]
                if s.reset is not None or self.closed:
                    return
                self.send_whole(s, _RESPONSE_HEADERS, _frame_message(msg), _OK_TRAILERS)
        except RpcError as e:
            self._finish(s, e)
        except asyncio.CancelledError:
            if s.reset is None and not self.closed:
                self.reset_stream(s)
        except Exception as e:
            log.exception("%s failed", path)
            self._finish(s, RpcError(INTERNAL, f"{type(e).__name__}: {e}"))

    def _finish(self, s: h2.Stream, error: RpcError) -> None:
        """End ``s`` with ``error``: trailers after what was sent, or trailers only."""
        if s.reset is not None or self.closed or s.closed_local:
            return
        block = h2.encode_headers(_status_headers(error.code, error.details))
        if s.sent_headers:
            self.end_stream(s, block)
        else:
            head = [(":status", "200"), ("content-type", "application/grpc")]
            self.send_headers(
                s,
                h2.encode_headers(head + _status_headers(error.code, error.details)),
                end_stream=True,
            )


class Server:
    """gRPC services on one unix socket."""

    def __init__(self, methods: Mapping[str, Method]) -> None:
        self.methods = dict(methods)
        self.connections: set[_ServerConnection] = set()
        self._server: asyncio.base_events.Server | None = None
        self.path: str | None = None
        self.stopping = False  # stop() began: a connection set up from now on is not served

    async def start(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _ServerConnection(self), path)
        self.path = path

    async def stop(self, grace: float = 0.2) -> None:
        """Stop accepting, end every connection (GOAWAY) after up to ``grace`` seconds for
        calls in flight, and wait until they are closed."""
        server, self._server = self._server, None
        if server is None:
            return
        self.stopping = True
        server.close()
        calls = {t for c in self.connections for t in c.tasks}
        if calls:
            await asyncio.wait(calls, timeout=grace)
        for c in list(self.connections):
            for t in list(c.tasks):
                t.cancel()
            c.goaway()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), grace + 1.0)

    @property
    def serving(self) -> bool:
        return self._server is not None


# ---- client ---------------------------------------------------------------------------------
class _ClientConnection(h2.Connection):
    client = True

    def __init__(self) -> None:
        super().__init__()
        self.next_id = 1
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def open(self) -> h2.Stream:
        s = h2.Stream(self.next_id, self.peer_initial_window)
        self.next_id += 2
        s.owner = asyncio.get_running_loop().create_future()
        self.streams[s.id] = s
        return s

    def _settle(self, s: h2.Stream) -> None:
        fut = s.owner
        if isinstance(fut, asyncio.Future) and not fut.done():
            fut.set_result(None)

    def on_headers(self, s: h2.Stream) -> None:
        if s.ended:
            self._settle(s)

    def on_data(self, s: h2.Stream) -> None:
        if s.ended:
            self._settle(s)

    def on_stream_reset(self, s: h2.Stream) -> None:
        self._settle(s)

    def on_goaway(self, last_stream: int) -> None:
        for s in list(self.streams.values()):
            if s.id > last_stream:
                s.reset = h2.CANCEL
                self._settle(s)

    def on_closed(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


def _timeout_header(seconds: float) -> str:
    ms = max(1, int(seconds * 1000))
    return f"{ms}m" if ms < 10**8 else f"{int(seconds)}S"


async def call(
    socket_path: str,
    method: str,
    request: bytes,
    *,
    within: float = 10.0,
    wait_for_ready: bool = False,
) -> bytes:
    """One unary call on a fresh connection to ``socket_path``; the response message bytes, or
    :class:`RpcError` (UNAVAILABLE when the socket cannot be reached, DEADLINE_EXCEEDED after
    ``within`` seconds, which go to the server as the call's grpc-timeout).
    ``wait_for_ready``: keep trying to connect until the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    delay = 0.02
    while True:
        try:
            _, conn = await loop.create_unix_connection(_ClientConnection, socket_path)
            break
        except OSError as e:
            if not wait_for_ready or loop.time() + delay >= deadline:
                raise RpcError(UNAVAILABLE, f"cannot connect to {socket_path}: {e}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
    try:
        s = conn.open()
        head = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", _timeout_header(max(0.001, deadline - loop.time()))),
        ]
        conn.send_whole(s, h2.encode_headers(head), _frame_message(request), b"")
        try:
            await asyncio.wait_for(s.owner, max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise RpcError(DEADLINE_EXCEEDED, f"{method} on {socket_path}: no answer") from None
        return _unary_result(method, s)
    finally:
        if conn.transport is not None:
            conn.transport.close()


def _unary_result(method: str, s: h2.Stream) -> bytes:
    if not s.ended:
        raise RpcError(UNAVAILABLE, f"{method}: the connection ended before the answer")
    head = dict(s.headers or ())
    status = dict(s.trailers or ()) if s.trailers is not None else head
    if head.get(":status", "200") != "200":
        raise RpcError(UNKNOWN, f"{method}: HTTP status {head.get(':status')}")
    try:
        code = int(status.get("grpc-status", str(UNKNOWN)))
    except ValueError:
        code = UNKNOWN
    if code != OK:
        raise RpcError(code, percent_decode(status.get("grpc-message", "")))
    messages = _take_messages(s.data)
    if len(messages) != 1:
        raise RpcError(INTERNAL, f"{method}: expected one response message, got {len(messages)}")
    return messages[0]


def call_blocking(socket_path: str, method: str, request: bytes, *, within: float = 10.0) -> bytes:
    """:func:`call` for threads without an event loop (e.g. the NodeState loop's thread)."""
    return asyncio.run(call(socket_path, method, request, within=within))
