"""HTTP/1.1 for the API client (:mod:`.client`): one request at a time on a kept-alive
connection, the answer read as RFC 9112 says (status line, header fields, then a body framed
by ``Transfer-Encoding: chunked``, ``Content-Length`` or the end of the connection).

Not ``http.client``: it imports the ``email`` package to parse header fields, ~13 ms of the
node agent's start on a 2-core node (its 1 x 8 goal is 0.12 s from spawn to the kubelet
holding the devices, and the NodeState GET is on that path). The API server's answers need
little of what it offers: no 1.0 servers, no proxies, no compression (none is asked for).

Every failure is an :class:`OSError`: the socket's own, :class:`DisconnectedError` (the server
closed the connection before answering: a kept-alive one it had timed out) or
:class:`ProtocolError` (an answer that is not HTTP/1.1 as the RFC frames it). The caller drops
the connection on any of them.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Mapping
from typing import BinaryIO

MAX_LINE = 65536  # a status line, a header field or a chunk-size line (a body's lines: any)
MAX_FIELDS = 200
_NO_BODY_METHODS = frozenset({"HEAD"})
_SEND_LENGTH_METHODS = frozenset({"POST", "PUT", "PATCH"})
_FORBIDDEN = frozenset("\r\n\0")


class ProtocolError(OSError):
    """The answer is not HTTP/1.1 as RFC 9112 frames it (the message says where)."""


class DisconnectedError(ConnectionResetError):
    """The server closed the connection without answering the request."""


class _Stream:
    """The connection's buffered reader. Another thread may close the connection while this one
    waits for an answer (the client's close at shutdown): that read ends with an OSError, as
    every failure here does, not with the ValueError of a closed file."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def read(self, n: int = -1) -> bytes:
        try:
            return self._f.read(n)
        except ValueError:
            raise ConnectionAbortedError("the connection was closed meanwhile") from None

    def readline(self, limit: int = -1) -> bytes:
        try:
            return self._f.readline(limit)
        except ValueError:
            raise ConnectionAbortedError("the connection was closed meanwhile") from None

    def close(self) -> None:
        self._f.close()


def _line(f: _Stream, what: str) -> bytes:
    """One CRLF-ended line; b"" if the connection ended before it began."""
    line = f.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise ProtocolError(f"{what} longer than {MAX_LINE} bytes")
    if line and not line.endswith(b"\n"):
        raise ProtocolError(f"connection closed within {what}")
    return line


def _fields(f: _Stream) -> dict[str, str]:
    """Header (or trailer) fields up to the empty line; names lower-cased, repeats joined."""
    out: dict[str, str] = {}
    for _ in range(MAX_FIELDS + 1):
        line = _line(f, "a header field")
        if not line:
            raise ProtocolError("connection closed within a header field")
        if line in (b"\r\n", b"\n"):
            return out
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip() or name[0] in " \t":
            raise ProtocolError(f"not a header field: {line[:80]!r}")
        key, val = name.lower(), value.strip()
        out[key] = f"{out[key]}, {val}" if key in out else val
    raise ProtocolError(f"more than {MAX_FIELDS} header fields")


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


class Response:
    """An answer's status and fields; the body is read with :meth:`read` or :meth:`readline`
    (and must be, before the connection carries another request)."""

    def __init__(self, f: _Stream, method: str) -> None:
        self._f = f
        while True:
            line = _line(f, "the status line")
            if not line:
                raise DisconnectedError("the server closed the connection without an answer")
            version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
            code, _, self.reason = rest.partition(" ")
            if not version.startswith("HTTP/1.") or not _digits(code) or len(code) != 3:
                raise ProtocolError(f"not an HTTP/1.x status line: {line[:80]!r}")
            self.status = int(code)
            self.headers = _fields(f)
            if not 100 <= self.status < 200 or self.status == 101:
                break  # an interim answer (100 Continue, 103 Early Hints) comes before the one
        conn = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        self.will_close = "close" in conn or (version == "HTTP/1.0" and "keep-alive" not in conn)
        self._chunked = False
        self._left: int | None = 0  # bytes of the body (or the current chunk) still to read
        self._pending = b""  # chunked body read past the last line (readline)
        self._done = method in _NO_BODY_METHODS or self.status in (204, 304)
        if self._done:
            return
        coding = self.headers.get("transfer-encoding")
        length = self.headers.get("content-length")
        if coding is not None:
            if coding.split(",")[-1].strip().lower() != "chunked":
                raise ProtocolError(f"unsupported transfer coding {coding!r}")
            self._chunked = True
        elif length is not None:
            if not _digits(length):
                raise ProtocolError(f"bad Content-Length {length!r}")
            self._left = int(length)
            self._done = self._left == 0
        else:
            self._left = None  # the body ends with the connection
            self.will_close = True

    def _next_chunk(self) -> None:
        """Start the next chunk (``_left`` set), or read the trailer after the last one."""
        line = _line(self._f, "a chunk size")
        size = line.split(b";", 1)[0].strip()  # chunk extensions are ignored (RFC 9112 7.1.1)
        if not size or size.lstrip(b"0123456789abcdefABCDEF"):
            raise ProtocolError(f"bad chunk size {line[:80]!r}")
        self._left = int(size, 16)
        if self._left == 0:
            _fields(self._f)  # the trailer section ends the body
            self._done = True

    def _exactly(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            raise ProtocolError(f"connection closed {n - len(data)} bytes before the body's end")
        return data

    def _chunk_data(self) -> bytes:
        """The current chunk's data (b"" once the body is done)."""
        while not self._done and self._left == 0:
            self._next_chunk()
        if self._done:
            return b""
        assert self._left is not None
        data = self._exactly(self._left)
        self._left = 0
        if _line(self._f, "a chunk's end") not in (b"\r\n", b"\n"):
            raise ProtocolError("a chunk does not end with CRLF")
        return data

    def read(self) -> bytes:
        """The rest of the body."""
        if self._done:
            out, self._pending = self._pending, b""
            return out
        if self._chunked:
            parts = [self._pending]
            while chunk := self._chunk_data():
                parts.append(chunk)
            self._pending = b""
            return b"".join(parts)
        self._done = True
        if self._left is None:
            return self._f.read()
        return self._exactly(self._left)

    def readline(self) -> bytes:
        """The next line of the body with its newline (the last may lack one); b"" at its end.
        A watch's events are lines, each in one chunk or spread over several."""
        if not self._chunked:
            if self._done:
                return b""
            if self._left is None:
                return self._f.readline()
            line = self._f.readline(self._left)
            if not line:
                raise ProtocolError(f"connection closed {self._left} bytes before the body's end")
            self._left -= len(line)
            self._done = self._left == 0
            return line
        parts, tail = [], self._pending
        while b"\n" not in tail:
            parts.append(tail)
            tail = self._chunk_data()
            if not tail:
                self._pending = b""
                return b"".join(parts)
        end, _, self._pending = tail.partition(b"\n")
        parts.append(end + b"\n")
        return b"".join(parts)


class Connection:
    """One TCP (or TLS) connection to ``host:port``, opened by the first request."""

    def __init__(
        self, host: str, port: int, *, timeout: float, context: ssl.SSLContext | None = None
    ) -> None:
        self.host, self.port = host, port
        self.timeout = timeout
        self.context = context
        self.sock: socket.socket | None = None
        self._f: _Stream | None = None
        default = 443 if context is not None else 80
        name = f"[{host}]" if ":" in host else host
        self._host_field = name if port == default else f"{name}:{port}"

    def set_timeout(self, timeout: float) -> None:
        self.timeout = timeout
        if self.sock is not None:
            self.sock.settimeout(timeout)

    def _open(self) -> _Stream:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._f = _Stream(sock.makefile("rb"))
        return self._f

    def request(
        self, method: str, target: str, body: bytes | None, headers: Mapping[str, str]
    ) -> Response:
        """Send one request and read the answer's head (its body is the caller's to read)."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_field}"]
        lines += (f"{k}: {v}" for k, v in headers.items())
        lines.append("Accept-Encoding: identity")
        if body is not None or method in _SEND_LENGTH_METHODS:
            lines.append(f"Content-Length: {len(body or b'')}")
        for line in lines:
            if _FORBIDDEN.intersection(line):
                # A token file with a stray line break must not split the request.
                raise ValueError(f"{method} {target}: line break in {line.split(':')[0]!r}")
        head = "\r\n".join(lines) + "\r\n\r\n"
        f = self._f or self._open()
        assert self.sock is not None
        self.sock.sendall(head.encode("latin-1") + (body or b""))
        return Response(f, method)

    def close(self) -> None:
        f, sock, self._f, self.sock = self._f, self.sock, None, None
        if f is not None:
            f.close()
        if sock is not None:
            sock.close()
