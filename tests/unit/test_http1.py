"""The API client's HTTP/1.1 (hostdev.kube.http1) against a real socket server that answers with
hand-written bytes: framings the API server uses, and answers no server should send."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from hostdev.kube.client import ApiClient, ApiError, Credentials
from hostdev.kube.http1 import Connection, DisconnectedError, ProtocolError

Handler = Callable[[socket.socket, list[bytes]], None]  # the socket, the requests seen


def read_request(sock: socket.socket) -> bytes:
    """One request (head and Content-Length body) as sent; b"" if the client closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            return data
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += sock.recv(65536)
    return data


@contextmanager
def server(*handlers: Handler) -> Iterator[tuple[int, list[bytes]]]:
    """Serves one connection per handler, in order; yields the port and the requests seen."""
    srv = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for handle in handlers:
                conn, _ = srv.accept()
                with conn:
                    handle(conn, seen)
        except BaseException as e:  # surfaced by the test
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], seen
    finally:
        srv.close()
        t.join(timeout=10)
    assert not errors, errors


def answer(*responses: bytes, then_close: bool = True) -> Handler:
    """Read a request, send the next response; for each response in turn."""

    def handle(sock: socket.socket, seen: list[bytes]) -> None:
        for resp in responses:
            req = read_request(sock)
            if not req:
                return
            seen.append(req)
            sock.sendall(resp)
        if not then_close:
            read_request(sock)  # until the client closes

    return handle


OK_JSON = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"a": "b"}\n'
)


def test_content_length_answers_on_one_kept_alive_connection() -> None:
    with server(answer(OK_JSON, OK_JSON)) as (port, seen):
        c = Connection("127.0.0.1", port, timeout=10)
        for _ in range(2):
            r = c.request("GET", "/api/v1/x?y=1", None, {"Accept": "application/json"})
            assert (r.status, r.reason, r.will_close) == (200, "OK", False)
            assert r.headers["content-type"] == "application/json"
            assert r.read() == b'{"a": "b"}\n'
        # The server closes after two answers: a third request on the connection learns so.
        with pytest.raises(ConnectionError):
            c.request("PATCH", "/p", b"{}", {"Content-Type": "application/merge-patch+json"})
        c.close()
    assert len(seen) == 2
    first = seen[0].decode()
    assert first.startswith("GET /api/v1/x?y=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{port}\r\n" in first and "Content-Length" not in first
    assert "Accept-Encoding: identity\r\n" in first


def test_a_write_sends_its_length_even_without_a_body() -> None:
    with server(answer(OK_JSON)) as (port, seen):
        c = Connection("127.0.0.1", port, timeout=10)
        c.request("POST", "/p", None, {}).read()
        c.close()
    assert b"Content-Length: 0\r\n" in seen[0]


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'7;ext=1\r\n{"a":1}\r\n'
    b"1\r\n\n\r\n"
    b'A\r\n{"b":2}\n{"\r\n'
    b'5\r\nc":3}\r\n'
    b"0\r\nX-Trailer: t\r\n\r\n"
)


def test_chunked_body_with_extensions_and_trailer() -> None:
    with server(answer(CHUNKED, OK_JSON)) as (port, _):
        c = Connection("127.0.0.1", port, timeout=10)
        r = c.request("GET", "/", None, {})
        assert r.read() == b'{"a":1}\n{"b":2}\n{"c":3}'
        # The trailer was read: the next answer on the connection starts clean.
        assert c.request("GET", "/", None, {}).read() == b'{"a": "b"}\n'
        c.close()


def test_readline_joins_lines_across_chunks_and_splits_lines_in_one() -> None:
    with server(answer(CHUNKED)) as (port, _):
        c = Connection("127.0.0.1", port, timeout=10)
        r = c.request("GET", "/", None, {})
        lines = list(iter(r.readline, b""))
        c.close()
    assert lines == [b'{"a":1}\n', b'{"b":2}\n', b'{"c":3}']


def test_readline_on_a_content_length_body() -> None:
    with server(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\na\nbc\nd")) as (port, _):
        c = Connection("127.0.0.1", port, timeout=10)
        r = c.request("GET", "/", None, {})
        assert list(iter(r.readline, b"")) == [b"a\n", b"bc\n", b"d"]
        c.close()


def test_body_until_close_and_connection_close() -> None:
    until_close = b"HTTP/1.1 200 OK\r\n\r\nall of it"
    closing = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\nok"
    with server(answer(until_close), answer(closing)) as (port, _):
        c = Connection("127.0.0.1", port, timeout=10)
        r = c.request("GET", "/", None, {})
        assert r.will_close and r.read() == b"all of it"
        c.close()
        c = Connection("127.0.0.1", port, timeout=10)
        r = c.request("GET", "/", None, {})
        assert r.will_close and r.read() == b"ok"
        c.close()


def test_interim_answers_are_skipped_and_204_has_no_body() -> None:
    resp = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"
    with server(answer(resp, OK_JSON)) as (port, _):
        c = Connection("127.0.0.1", port, timeout=10)
        r = c.request("DELETE", "/x", None, {})
        assert (r.status, r.read()) == (204, b"")
        assert c.request("GET", "/", None, {}).status == 200
        c.close()


@pytest.mark.parametrize(
    ("resp", "says"),
    [
        (b"SPDY/3 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n", "not a header field"),
        (b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n", "not a header field"),
        (b"HTTP/1.1 200 OK\r\nName : v\r\n\r\n", "not a header field"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", "longer than"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 201 + b"\r\n", "more than 200"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        ("HTTP/1.1 200 OK\r\nContent-Length: ²\r\n\r\n".encode("latin-1"), "bad Content"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nab\r\n", "bad chunk"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported transfer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "bytes before the body's end"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", "CRLF"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "closed within a header field"),
        (b"HTTP/1.1 200 OK\r\n", "closed within a header field"),
        (b"HTTP/1.1 20", "closed within the status line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "bytes before"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n", "closed within a"),
    ],
)
def test_answers_no_server_should_send_are_protocol_errors(resp: bytes, says: str) -> None:
    with server(answer(resp)) as (port, _):
        c = Connection("127.0.0.1", port, timeout=10)
        with pytest.raises(ProtocolError, match=says):
            c.request("GET", "/", None, {}).read()
        c.close()


def test_closed_without_an_answer_is_disconnected() -> None:
    def close_at_once(sock: socket.socket, _: list[bytes]) -> None:
        read_request(sock)

    with server(close_at_once) as (port, _):
        c = Connection("127.0.0.1", port, timeout=10)
        with pytest.raises(DisconnectedError):
            c.request("GET", "/", None, {})
        c.close()


def test_a_line_break_in_a_header_value_sends_nothing() -> None:
    with server(answer(OK_JSON)) as (port, seen):
        c = Connection("127.0.0.1", port, timeout=10)
        with pytest.raises(ValueError, match="line break in 'Authorization'"):
            c.request("GET", "/", None, {"Authorization": "Bearer a\r\nX-Evil: 1"})
        assert c.sock is None  # not even connected
        c.request("GET", "/", None, {}).read()
        c.close()
    assert b"Evil" not in b"".join(seen)


def test_a_body_read_after_another_thread_closed_the_connection_is_an_os_error() -> None:
    with server(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")) as (port, _):
        c = Connection("127.0.0.1", port, timeout=10)
        r = c.request("GET", "/", None, {})
        c.close()  # as the client's close() does at shutdown, while an answer is pending
        with pytest.raises(ConnectionAbortedError, match="closed meanwhile"):
            r.read()


def test_client_close_ends_a_call_waiting_for_its_answer() -> None:
    got = threading.Event()

    def hold(sock: socket.socket, seen: list[bytes]) -> None:
        seen.append(read_request(sock))
        got.set()
        read_request(sock)  # no answer: until the client side goes away

    with server(hold) as (port, _):
        api = ApiClient(Credentials(server=f"http://127.0.0.1:{port}"))
        errors: list[BaseException] = []

        def call() -> None:
            try:
                api.get("/api/v1/nodes")
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=call)
        t.start()
        assert got.wait(10)
        api.close()
        t.join(10)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ApiError) and errors[0].status == 0


# ---- through the API client -------------------------------------------------------------


def test_client_retries_once_on_a_kept_alive_connection_the_server_closed() -> None:
    not_found = json.dumps({"kind": "Status", "message": 'nodes "x" not found'}).encode()
    gone = (
        b"HTTP/1.1 404 Not Found\r\nContent-Length: "
        + str(len(not_found)).encode()
        + b"\r\n\r\n"
        + not_found
    )
    with server(answer(OK_JSON), answer(OK_JSON, gone)) as (port, seen):
        api = ApiClient(Credentials(server=f"http://127.0.0.1:{port}", token="t"))
        assert api.get("/api/v1/a") == {"a": "b"}
        # The first connection is closed by now (its handler returned): a fresh one answers.
        assert api.get("/api/v1/b") == {"a": "b"}
        with pytest.raises(ApiError) as err:
            api.get("/api/v1/nodes/x")
        api.close()
    assert err.value.status == 404 and err.value.message == 'Not Found: nodes "x" not found'
    assert [s.split(b" ")[1] for s in seen] == [b"/api/v1/a", b"/api/v1/b", b"/api/v1/nodes/x"]
    assert all(b"Authorization: Bearer t\r\n" in s for s in seen)


def test_client_watch_reads_events_and_raises_an_error_event() -> None:
    ev1 = json.dumps({"type": "ADDED", "object": {"metadata": {"name": "a"}}}).encode() + b"\n"
    ev2 = json.dumps({"type": "ERROR", "object": {"code": 410, "reason": "Expired"}}).encode()
    body = b"".join(b"%X\r\n%s\r\n" % (len(p), p) for p in (ev1[:9], ev1[9:], ev2 + b"\n"))
    resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"
    with server(answer(resp)) as (port, seen):
        api = ApiClient(Credentials(server=f"http://127.0.0.1:{port}"))
        events = api.watch("/api/v1/nodes", {"resourceVersion": "5"}, 30)
        assert next(events)["object"]["metadata"]["name"] == "a"
        with pytest.raises(ApiError) as err:
            next(events)
        api.close()
    assert err.value.status == 410
    assert seen[0].startswith(b"GET /api/v1/nodes?resourceVersion=5&watch=true&timeoutSeconds=30 ")
