"""A small Kubernetes API client: JSON over HTTPS, keep-alive, watches.

Shared by the node agent and the operator, which read and write their objects as plain dicts
(the agent: its NodeState, ResourceSlices, claims, launcher pods; the operator: its own
resources, nodes, evictions and its Lease). The ``kubernetes`` package costs ~0.4 s and
~34 MiB to import (generated models for every API type, urllib3, oauth and websocket stacks),
which is more than a small node's whole start-up budget and most of the agent's memory goal,
and a third of the operator's idle memory; so both speak HTTP themselves (:mod:`.http1` +
``ssl``): one keep-alive connection per thread, a fresh one per watch.

Credentials: the pod's service account (in-cluster: token re-read as the kubelet rotates it,
the cluster CA), or a kubeconfig with a token, a token file or a client certificate. Exec and
auth-provider plugins are refused with a message (both processes run in-cluster; kubeconfigs
are for development and tests).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from hostdev.kube import DEFAULT_SERVICE_ACCOUNT_DIR
from hostdev.kube.http1 import Connection, DisconnectedError

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
TOKEN_REFRESH = 60.0  # seconds between re-reads of a token file
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")


class ConfigError(Exception):
    """No usable credentials; the message says what is missing."""


class ApiError(Exception):
    """The API server answered with an error status (``status`` 0: it could not be reached)."""

    def __init__(self, status: int, reason: str, body: str = "") -> None:
        self.status = status
        self.reason = reason
        self.body = body
        message = reason
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("message"):
            message = f"{reason}: {doc['message']}"
        super().__init__(f"{status} {message}".strip())
        self.message = message


def quote(text: str) -> str:
    """Percent-encoding for query values (everything but RFC 3986's unreserved characters)."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in text.encode())


def query_string(params: Mapping[str, object] | None) -> str:
    if not params:
        return ""
    parts = []
    for k, v in params.items():
        if v is None:
            continue
        value = ("true" if v else "false") if isinstance(v, bool) else str(v)
        parts.append(f"{quote(k)}={quote(value)}")
    return "?" + "&".join(parts) if parts else ""


@dataclass(frozen=True, slots=True)
class Credentials:
    server: str  # https://host:port[/prefix]
    ca_file: str | None = None
    ca_data: str | None = None  # PEM
    token: str | None = None
    token_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    headers: tuple[tuple[str, str], ...] = field(default=())  # e.g. Impersonate-User (tests)


def in_cluster(sa_dir: str = DEFAULT_SERVICE_ACCOUNT_DIR) -> Credentials:
    host, port = (
        os.environ.get("KUBERNETES_SERVICE_HOST"),
        os.environ.get("KUBERNETES_SERVICE_PORT"),
    )
    if not host or not port:
        raise ConfigError(
            "not in a pod (KUBERNETES_SERVICE_HOST/PORT unset) and no --kubeconfig given"
        )
    token_file = os.path.join(sa_dir, "token")
    if not os.path.exists(token_file):
        raise ConfigError(f"no service account token at {token_file}")
    if ":" in host:
        host = f"[{host}]"
    return Credentials(
        server=f"https://{host}:{port}",
        ca_file=os.path.join(sa_dir, "ca.crt"),
        token_file=token_file,
    )


def from_kubeconfig(path: str) -> Credentials:
    """The current context's cluster and user of a kubeconfig file."""
    import yaml  # only for kubeconfig files (development and tests)

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"kubeconfig {path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"kubeconfig {path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"kubeconfig {path}: not a kubeconfig")
    base = os.path.dirname(os.path.abspath(path))

    def named(kind: str, name: object) -> dict[str, Any]:
        for item in doc.get(kind) or ():
            if isinstance(item, dict) and item.get("name") == name:
                value = item.get(kind[:-1]) or {}
                return value if isinstance(value, dict) else {}
        raise ConfigError(f"kubeconfig {path}: no {kind[:-1]} named {name!r}")

    ctx = named("contexts", doc.get("current-context"))
    cluster = named("clusters", ctx.get("cluster"))
    user = named("users", ctx.get("user")) if ctx.get("user") else {}
    if "exec" in user or "auth-provider" in user:
        raise ConfigError(
            f"kubeconfig {path}: exec and auth-provider credentials are not supported by "
            "hostdev; use a token, a token file or a client certificate"
        )

    def file(key: str, where: dict[str, Any]) -> str | None:
        value = where.get(key)
        return None if not value else os.path.join(base, str(value))

    def data_file(key: str, where: dict[str, Any]) -> str | None:
        value = where.get(key)
        if not value:
            return None
        import tempfile  # kubeconfig files only: not on the in-cluster start path

        fd, tmp = tempfile.mkstemp(prefix="hostdev-kube-")
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(value))
        return tmp

    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise ConfigError(f"kubeconfig {path}: the cluster has no https:// server")
    ca_data = cluster.get("certificate-authority-data")
    return Credentials(
        server=server.rstrip("/"),
        ca_file=file("certificate-authority", cluster),
        ca_data=base64.b64decode(ca_data).decode() if ca_data else None,
        token=user.get("token") or None,
        token_file=file("tokenFile", user),
        cert_file=file("client-certificate", user) or data_file("client-certificate-data", user),
        key_file=file("client-key", user) or data_file("client-key-data", user),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
    )


def load(kubeconfig: str | None, sa_dir: str = DEFAULT_SERVICE_ACCOUNT_DIR) -> Credentials:
    return from_kubeconfig(kubeconfig) if kubeconfig else in_cluster(sa_dir)


def ssl_context(creds: Credentials) -> ssl.SSLContext:
    """The TLS side of ``creds``: the CA to trust, the client certificate if any."""
    ctx = ssl.create_default_context(cafile=creds.ca_file, cadata=creds.ca_data)
    if creds.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if creds.cert_file and creds.key_file:
        ctx.load_cert_chain(creds.cert_file, creds.key_file)
    return ctx


def read_token(creds: Credentials) -> str | None:
    """The bearer token as of now: the token file's content (the kubelet rotates a bound
    service-account token in place), else the kubeconfig's token. OSError if the file cannot
    be read."""
    if creds.token_file:
        with open(creds.token_file, encoding="utf-8") as f:
            return f.read().strip()
    return creds.token


class ApiClient:
    """Thread-safe: each thread keeps its own keep-alive connection."""

    def __init__(
        self, creds: Credentials, *, timeout: float = 30.0, user_agent: str = "hostdev-node"
    ) -> None:
        self.creds = creds
        self.timeout = timeout  # per request (connect, and each read)
        self.user_agent = user_agent
        scheme, _, rest = creds.server.partition("://")
        hostport, _, prefix = rest.partition("/")
        self.https = scheme == "https"
        self.prefix = "/" + prefix if prefix else ""
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            host, port = hostport, "443" if self.https else "80"
        self.host, self.port = host.strip("[]"), int(port)
        self._ssl: ssl.SSLContext | None = None
        self._local = threading.local()
        self._token: str | None = creds.token
        self._token_read = 0.0
        self._lock = threading.Lock()
        self._conns: set[Connection] = set()
        self._watching: set[Connection] = set()
        self.requests = 0  # requests sent (benches count API calls)

    # ---- connections --------------------------------------------------------------------
    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl_context(self.creds)
        return self._ssl

    def _connect(self, timeout: float) -> Connection:
        context = self._context() if self.https else None
        conn = Connection(self.host, self.port, timeout=timeout, context=context)
        with self._lock:
            self._conns.add(conn)
        return conn

    def _drop(self, conn: Connection) -> None:
        conn.close()
        with self._lock:
            self._conns.discard(conn)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection; a watch blocked in a read ends at once (its socket is shut
        down: closing the connection itself would wait for that read)."""
        with self._lock:
            conns, self._conns = list(self._conns), set()
            watching = set(self._watching)
        for c in conns:
            if c.sock is not None:
                with contextlib.suppress(OSError):
                    c.sock.shutdown(socket.SHUT_RDWR)
            if c not in watching:
                c.close()

    def _headers(self, content_type: str | None) -> dict[str, str]:
        h = {"Accept": JSON, "User-Agent": self.user_agent}
        token = self._bearer()
        if token:
            h["Authorization"] = f"Bearer {token}"
        if content_type:
            h["Content-Type"] = content_type
        h.update(self.creds.headers)
        return h

    def _bearer(self) -> str | None:
        if self.creds.token_file and time.monotonic() - self._token_read > TOKEN_REFRESH:
            try:
                self._token = read_token(self.creds)
                self._token_read = time.monotonic()
            except OSError:
                pass  # keep the last one; the API server will say if it expired
        return self._token

    # ---- requests -----------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, object] | None = None,
        body: object = None,
        content_type: str = JSON,
        timeout: float | None = None,
    ) -> Any:
        """One call; the decoded JSON answer. Raises :class:`ApiError` (status 0: the server
        could not be reached). ``timeout``: this call's, instead of the client's."""
        url = self.prefix + path + query_string(query)
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = self._headers(content_type if data is not None else None)
        for attempt in (1, 2):
            conn: Connection | None = getattr(self._local, "conn", None)
            reused = conn is not None
            if conn is None:
                conn = self._local.conn = self._connect(self.timeout)
            wait = self.timeout if timeout is None else timeout
            if conn.timeout != wait:  # a kept-alive connection made for another timeout
                conn.set_timeout(wait)
            try:
                resp = conn.request(method, url, data, headers)
                raw = resp.read()
            except (DisconnectedError, BrokenPipeError, ConnectionResetError) as e:
                # A kept-alive connection the server closed meanwhile: once more, fresh.
                self._drop(conn)
                self._local.conn = None
                if reused and attempt == 1:
                    continue
                raise ApiError(0, f"{method} {path}: {type(e).__name__}: {e}") from e
            except OSError as e:  # http1.ProtocolError included
                self._drop(conn)
                self._local.conn = None
                raise ApiError(0, f"{method} {path}: {type(e).__name__}: {e}") from e
            self.requests += 1
            if resp.will_close:
                self._drop(conn)
                self._local.conn = None
            if resp.status >= 300:
                raise ApiError(resp.status, resp.reason, raw.decode("utf-8", "replace"))
            return json.loads(raw) if raw else None
        raise AssertionError("unreachable")

    def get(self, path: str, **query: object) -> Any:
        return self.request("GET", path, query=query)

    def watch(
        self,
        path: str,
        query: Mapping[str, object],
        timeout_seconds: int,
        *,
        read_timeout: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The events of a watch (``{"type", "object"}``) until the server ends it. An
        ``ERROR`` event is raised as :class:`ApiError` with its status code (410: expired).
        ``read_timeout``: the socket's (default: the server's timeout plus 10 s)."""
        q = {**query, "watch": True, "timeoutSeconds": timeout_seconds}
        conn = self._connect(timeout_seconds + 10.0 if read_timeout is None else read_timeout)
        with self._lock:
            self._watching.add(conn)
        try:
            try:
                target = self.prefix + path + query_string(q)
                resp = conn.request("GET", target, None, self._headers(None))
            except OSError as e:
                raise ApiError(0, f"watch {path}: {type(e).__name__}: {e}") from e
            self.requests += 1
            if resp.status >= 300:
                raise ApiError(resp.status, resp.reason, resp.read().decode("utf-8", "replace"))
            while True:
                try:
                    line = resp.readline()
                except OSError as e:  # a timeout and http1.ProtocolError included
                    raise ApiError(0, f"watch {path}: {type(e).__name__}: {e}") from e
                if not line:
                    return
                if not line.strip():
                    continue
                ev = json.loads(line)
                if ev.get("type") == "ERROR":
                    st = ev.get("object") or {}
                    raise ApiError(
                        int(st.get("code") or 500), str(st.get("reason") or ""), json.dumps(st)
                    )
                yield ev
        finally:
            with self._lock:
                self._watching.discard(conn)
            self._drop(conn)
