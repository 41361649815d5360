"""HTTP/2 (RFC 9113) over a unix socket, with prior knowledge, as gRPC speaks it.

One :class:`Connection` (an asyncio protocol) per socket connection, server or client side.
It frames and unframes, keeps both directions' flow-control windows, answers SETTINGS and
PING, and hands complete header blocks and DATA to its owner (:mod:`.rpc`) per stream.

Header blocks are decoded by ``hpack`` (Huffman codes and the dynamic table are what peers
send); ours are encoded here with literals that never touch the peer's dynamic table, so the
few header sets gRPC needs are encoded once and reused as bytes.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Iterable
from typing import Any, cast

from hpack import Decoder
from hpack.exceptions import HPACKError

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0, 1, 2, 3, 4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 5, 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
# SETTINGS identifiers
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 1, 2, 3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 4, 5, 6
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
FRAME_SIZE_ERROR, CANCEL, COMPRESSION_ERROR = 6, 8, 9

DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384
# What we let peers send before we say more: one window large enough for the biggest
# message the agent reads (a PodResources list, capped at 16 MiB by the kubelet).
RECV_WINDOW = 16 << 20
MAX_WINDOW = (1 << 31) - 1
_HEADER = struct.Struct(">BHBBI")  # length as 1+2 bytes, type, flags, stream id


class ProtocolError(Exception):
    """The peer broke HTTP/2; the connection is closed with ``code``."""

    def __init__(self, message: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


_INDEXED_BLOCKS = 16  # distinct all-indexed blocks kept per connection


def _only_indexed(block: bytes) -> bool:
    """Every field an indexed one with a one-byte index (RFC 7541 6.1: high bit set, index
    1-126): such a block neither adds to nor resizes the dynamic table."""
    return bool(block) and min(block) >= 0x81 and max(block) <= 0xFE


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HEADER.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


# ---- HPACK encoding (RFC 7541), literals only ----------------------------------------------
# Static-table entries we use whole (name and value): index 3 ":method: POST",
# 6 ":scheme: http", 8 ":status: 200".
_STATIC = {(":method", "POST"): 3, (":scheme", "http"): 6, (":status", "200"): 8}


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_str(text: str) -> bytes:
    b = text.encode()
    return _hpack_int(len(b), 7, 0) + b  # H=0: no Huffman


def encode_headers(headers: Iterable[tuple[str, str]]) -> bytes:
    """A header block of indexed static entries and literals "without indexing" (a peer's
    dynamic table is never touched, so a block can be cached and sent on any connection)."""
    out = bytearray()
    for name, value in headers:
        idx = _STATIC.get((name, value))
        if idx is not None:
            out += _hpack_int(idx, 7, 0x80)
        else:
            out += b"\x00" + _hpack_str(name) + _hpack_str(value)
    return bytes(out)


class Stream:
    """One HTTP/2 stream as the owner sees it."""

    __slots__ = (
        "_window_open",
        "closed_local",
        "data",
        "ended",
        "headers",
        "id",
        "owner",
        "pending",
        "pending_end",
        "recv_unacked",
        "reset",
        "send_window",
        "sent_headers",
        "trailers",
    )

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.headers: tuple[tuple[str, str], ...] | None = None
        self.trailers: tuple[tuple[str, str], ...] | None = None
        self.data = bytearray()
        self.ended = False  # the peer sent END_STREAM
        self.reset: int | None = None  # RST_STREAM code (either side), or connection gone
        self.closed_local = False  # we sent END_STREAM
        self.sent_headers = False  # we sent a header block
        self.send_window = send_window
        self.pending = bytearray()  # DATA waiting for window
        self.pending_end: bytes | None = None  # trailer block to send after pending (or b"")
        self.recv_unacked = 0
        self._window_open: asyncio.Event | None = None
        self.owner: Any = None  # what the rpc layer keeps per stream


class Connection(asyncio.Protocol):
    """Frames in, frames out. Subclasses implement the ``on_*`` hooks (called on the loop)."""

    client = False

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self._buf = bytearray()
        self._preface_seen = self.client  # a server first reads the client's preface
        self._decoder = Decoder()
        # Header blocks made only of indexed fields, decoded: they leave the dynamic table as it
        # is, so the same bytes decode the same until a block that is not such changes it. A
        # gRPC client sends each call's headers this way once its table holds them: the kubelet's
        # Allocate then skips hpack (~20 us a call).
        self._indexed: dict[bytes, tuple[tuple[str, str], ...]] = {}
        self._continuing: tuple[Stream | None, int, bytearray] | None = None  # sid, flags, block
        self.send_window = DEFAULT_WINDOW  # connection-level, ours towards the peer
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_FRAME
        self.recv_unacked = 0
        self.closed = False
        self.last_peer_stream = 0
        self.goaway_received: int | None = None
        self._corked: list[bytes] | None = None  # frames held back by send_whole()
        # Frames held until _flush_pending (see data_received).
        self._pending: list[bytes] | None = None
        self._flush_handle: asyncio.Handle | None = None

    # ---- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        settings = struct.pack(
            ">HIHIHI",
            ENABLE_PUSH,
            0,
            INITIAL_WINDOW_SIZE,
            RECV_WINDOW,
            MAX_HEADER_LIST_SIZE,
            1 << 20,
        )
        hello = PREFACE if self.client else b""
        transport.write(
            hello
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", RECV_WINDOW - DEFAULT_WINDOW))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for s in list(self.streams.values()):
            if s.reset is None:
                s.reset = CANCEL
            self._wake(s)
            self.on_stream_reset(s)
        self.streams.clear()
        self.on_closed(exc)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        # What this read makes us send (a PING or SETTINGS ack) waits for the handlers it
        # started, which run right after this on the loop: a gRPC client's call arrives with a
        # PING (grpc-go's bandwidth probe) and gets the ack and the answer in one send, one
        # wake-up of the peer instead of two (on a VM each costs tens of microseconds).
        if self._pending is None:
            self._pending = []
        try:
            if not self._preface_seen:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise ProtocolError("not an HTTP/2 client preface")
                    return
                if buf[: len(PREFACE)] != PREFACE:
                    raise ProtocolError("not an HTTP/2 client preface")
                del buf[: len(PREFACE)]
                self._preface_seen = True
            pos, end = 0, len(buf)
            while end - pos >= 9:
                hi, lo, kind, flags, sid = _HEADER.unpack_from(buf, pos)
                length = hi << 16 | lo
                if length > RECV_MAX_FRAME:
                    raise ProtocolError(f"frame of {length} bytes", FRAME_SIZE_ERROR)
                if end - pos - 9 < length:
                    break
                payload = bytes(buf[pos + 9 : pos + 9 + length])
                pos += 9 + length
                self._frame(kind, flags, sid & 0x7FFFFFFF, payload)
                if self.closed:
                    return
            del buf[:pos]
        except ProtocolError as e:
            self.fail(e.code, str(e))
        except HPACKError as e:
            self.fail(COMPRESSION_ERROR, f"header block: {e}")
        finally:
            if not self._pending:
                self._pending = None
            elif self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_pending)

    # ---- frames in ------------------------------------------------------------------------
    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if self._continuing is not None and kind != CONTINUATION:
            raise ProtocolError("a header block was interrupted")
        if kind == DATA:
            self._data(flags, sid, payload)
        elif kind == HEADERS:
            self._headers(flags, sid, payload)
        elif kind == CONTINUATION:
            if self._continuing is None:
                raise ProtocolError("CONTINUATION without HEADERS")
            stream, first_flags, block = self._continuing
            if stream is not None and stream.id != sid:
                raise ProtocolError("CONTINUATION on another stream")
            block += payload
            if flags & END_HEADERS:
                self._continuing = None
                self._header_block(stream, sid, first_flags, bytes(block))
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif kind == PING:
            if len(payload) != 8:
                raise ProtocolError("PING payload must be 8 bytes", FRAME_SIZE_ERROR)
            if not flags & ACK:
                self.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            s = self.streams.pop(sid, None)
            if s is not None:
                s.reset = struct.unpack(">I", payload[:4])[0] if len(payload) >= 4 else CANCEL
                self._wake(s)
                self.on_stream_reset(s)
        elif kind == GOAWAY:
            last = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF if len(payload) >= 4 else 0
            self.goaway_received = last
            self.on_goaway(last)
        elif kind == PUSH_PROMISE:
            raise ProtocolError("PUSH_PROMISE although push is disabled")
        # PRIORITY and unknown frame types are ignored (RFC 9113 section 5.5).

    def _strip_padding(self, flags: int, payload: bytes) -> bytes:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ProtocolError("bad padding")
            return payload[1 : len(payload) - payload[0]]
        return payload

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        size = len(payload)
        self.recv_unacked += size
        if self.recv_unacked >= RECV_WINDOW // 2:
            self.write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.recv_unacked)))
            self.recv_unacked = 0
        s = self.streams.get(sid)
        if s is None or s.ended:
            return  # a stream we reset or closed: the connection window was still used
        s.data += self._strip_padding(flags, payload)
        s.recv_unacked += size
        if flags & END_STREAM:
            s.ended = True
        elif s.recv_unacked >= RECV_WINDOW // 2:
            self.write(frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", s.recv_unacked)))
            s.recv_unacked = 0
        self.on_data(s)
        self._maybe_forget(s)

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolError("HEADERS on stream 0")
        block = self._strip_padding(flags, payload)
        if flags & PRIORITY_FLAG:
            block = block[5:]
        s = self.streams.get(sid)
        if s is None:
            s = self._peer_opens(sid)
        if flags & END_HEADERS:
            self._header_block(s, sid, flags, block)
        else:
            self._continuing = (s, flags, bytearray(block))

    def _peer_opens(self, sid: int) -> Stream | None:
        """A HEADERS frame for a stream we do not know: a new request (server side)."""
        return None

    def _header_block(self, s: Stream | None, sid: int, flags: int, block: bytes) -> None:
        headers = self._indexed.get(block)
        if headers is None:
            # Always decoded otherwise: that keeps the decoder's table in step with the peer's.
            # hpack's HeaderTuple is a (name, value) tuple of str (raw=False).
            headers = cast("tuple[tuple[str, str], ...]", tuple(self._decoder.decode(block)))
            if _only_indexed(block):
                if len(self._indexed) < _INDEXED_BLOCKS:
                    self._indexed[block] = headers
            else:
                self._indexed.clear()  # the table may have changed: the indices with it
        if s is None:
            return
        if s.headers is None:
            s.headers = headers
        else:
            s.trailers = headers
        if flags & END_STREAM:
            s.ended = True
        self.on_headers(s)
        self._maybe_forget(s)

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolError("SETTINGS payload not a multiple of 6", FRAME_SIZE_ERROR)
        for off in range(0, len(payload), 6):
            ident, value = struct.unpack_from(">HI", payload, off)
            if ident == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError("INITIAL_WINDOW_SIZE too large", FLOW_CONTROL_ERROR)
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for s in self.streams.values():
                    s.send_window += delta
            elif ident == MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= (1 << 24) - 1:
                    raise ProtocolError("bad MAX_FRAME_SIZE")
                self.peer_max_frame = value
        self.write(frame(SETTINGS, ACK, 0))
        for s in list(self.streams.values()):
            self._flush(s)

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError("WINDOW_UPDATE payload must be 4 bytes", FRAME_SIZE_ERROR)
        inc = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
        if sid == 0:
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise ProtocolError("connection window overflow", FLOW_CONTROL_ERROR)
            for waiting in list(self.streams.values()):
                if waiting.pending or waiting.pending_end is not None:
                    self._flush(waiting)
                    if self.send_window <= 0:
                        break
        else:
            s = self.streams.get(sid)
            if s is not None:
                s.send_window += inc
                self._flush(s)

    # ---- frames out -----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        elif self._pending is not None:
            self._pending.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def _flush_pending(self) -> None:
        self._flush_handle = None
        held, self._pending = self._pending, None
        if held:
            self.write(b"".join(held))

    def send_whole(self, s: Stream, block: bytes, data: bytes, trailers: bytes) -> None:
        """A whole unary message on ``s``: the header ``block``, ``data`` and the end (see
        :meth:`end_stream`), in one write as far as the windows allow: one send and one
        wake-up of the peer, not three."""
        self._corked = []
        try:
            self.send_headers(s, block)
            self.send_data(s, data)
            self.end_stream(s, trailers)
        finally:
            held, self._corked = self._corked, None
            if held:
                self.write(b"".join(held))

    def send_headers(self, s: Stream, block: bytes, *, end_stream: bool = False) -> None:
        """A header block on ``s`` (split into CONTINUATION frames when large)."""
        flags = END_STREAM if end_stream else 0
        s.sent_headers = True
        limit = self.peer_max_frame
        if len(block) <= limit:
            self.write(frame(HEADERS, flags | END_HEADERS, s.id, block))
        else:
            parts = [block[i : i + limit] for i in range(0, len(block), limit)]
            out = [frame(HEADERS, flags, s.id, parts[0])]
            out += [frame(CONTINUATION, 0, s.id, p) for p in parts[1:-1]]
            out.append(frame(CONTINUATION, END_HEADERS, s.id, parts[-1]))
            self.write(b"".join(out))
        if end_stream:
            s.closed_local = True
            self._maybe_forget(s)

    def send_data(self, s: Stream, data: bytes) -> None:
        """Queue ``data`` on ``s``; what the windows allow goes out now, the rest later."""
        s.pending += data
        self._flush(s)

    def end_stream(self, s: Stream, trailers: bytes) -> None:
        """After the queued data: ``trailers`` as a header block with END_STREAM (or, for
        ``b""``, an empty DATA frame with END_STREAM)."""
        s.pending_end = trailers
        self._flush(s)

    def _flush(self, s: Stream) -> None:
        if s.reset is not None or s.closed_local:
            return
        out = []
        pending = s.pending
        while pending:
            n = min(len(pending), s.send_window, self.send_window, self.peer_max_frame)
            if n <= 0:
                break
            out.append(frame(DATA, 0, s.id, bytes(pending[:n])))
            del pending[:n]
            s.send_window -= n
            self.send_window -= n
        if out:
            self.write(b"".join(out))
        if pending:
            return
        self._wake(s)
        if s.pending_end is not None:
            block, s.pending_end = s.pending_end, None
            if block:
                self.send_headers(s, block, end_stream=True)
            else:
                self.write(frame(DATA, END_STREAM, s.id))
                s.closed_local = True
                self._maybe_forget(s)

    async def drained(self, s: Stream) -> None:
        """Until ``s`` has no data waiting for window (or is reset)."""
        while s.pending and s.reset is None and not self.closed:
            if s._window_open is None:
                s._window_open = asyncio.Event()
            await s._window_open.wait()
            s._window_open = None

    def _wake(self, s: Stream) -> None:
        if s._window_open is not None:
            s._window_open.set()

    def reset_stream(self, s: Stream, code: int = CANCEL) -> None:
        if s.reset is None and not s.closed_local:
            self.write(frame(RST_STREAM, 0, s.id, struct.pack(">I", code)))
        if s.reset is None:
            s.reset = code
        self._wake(s)
        self.streams.pop(s.id, None)

    def _maybe_forget(self, s: Stream) -> None:
        if s.ended and s.closed_local:
            self.streams.pop(s.id, None)

    def fail(self, code: int, message: str) -> None:
        """Tell the peer why (GOAWAY) and close."""
        log.warning("HTTP/2 connection closed: %s", message)
        self.goaway(code, message)

    def goaway(self, code: int = NO_ERROR, message: str = "") -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_pending()  # what was held goes first
        if self.transport is not None and not self.closed:
            payload = struct.pack(">II", self.last_peer_stream, code) + message.encode()[:200]
            self.transport.write(frame(GOAWAY, 0, 0, payload))
            self.transport.close()
            self.closed = True

    # ---- hooks ----------------------------------------------------------------------------
    def on_headers(self, s: Stream) -> None: ...
    def on_data(self, s: Stream) -> None: ...
    def on_stream_reset(self, s: Stream) -> None: ...
    def on_goaway(self, last_stream: int) -> None: ...
    def on_closed(self, exc: Exception | None) -> None: ...


# We never raise MAX_FRAME_SIZE above the default, so a bigger frame is an error.
RECV_MAX_FRAME = DEFAULT_FRAME
