"""Prometheus metrics of the node agent, and the HTTP endpoint serving them plus ``/healthz``
for the DaemonSet probe.

The text exposition format (version 0.0.4) is written here rather than by ``prometheus_client``:
that package costs ~0.1 s and ~12 MiB of memory to import (it brings an HTTP server, WSGI and
threading machinery), more than the agent's whole start-up budget on a small node, for a dozen
counters. The endpoint runs on the agent's event loop (``asyncio.start_server``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable, Sequence

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Child:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _HistogramChild:
    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, le in enumerate(self.buckets):
            if value <= le:
                self.counts[i] += 1
                return


class _Metric:
    kind = ""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}

    def _new(self) -> object:
        return _Child()

    def _child(self, values: tuple[str, ...]) -> object:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new()
        return child

    def remove(self, *values: str) -> None:
        del self._children[tuple(values)]

    def _labels(self, values: tuple[str, ...], le: str | None = None) -> str:
        pairs = list(zip(self.labelnames, values, strict=True))
        if le is not None:
            pairs.append(("le", le))
        # Sorted by name, as prometheus_client writes them.
        parts = [f'{k}="{_escape(v)}"' for k, v in sorted(pairs)]
        return "{" + ",".join(parts) + "}" if parts else ""

    def samples(self) -> Iterable[tuple[str, str, float]]:
        """(sample name, label text, value) of every child."""
        for values, child in sorted(self._children.items()):
            assert isinstance(child, _Child)
            yield self.sample_name, self._labels(values), child.value

    @property
    def sample_name(self) -> str:
        return self.name

    def expose(self) -> str:
        lines = [f"# HELP {self.sample_name} {self.doc}", f"# TYPE {self.sample_name} {self.kind}"]
        lines += [f"{n}{lab} {_number(v)}" for n, lab, v in self.samples()]
        return "\n".join(lines) + "\n"


class Counter(_Metric):
    kind = "counter"

    def labels(self, *values: str) -> _Child:
        child = self._child(tuple(values))
        assert isinstance(child, _Child)
        return child

    @property
    def sample_name(self) -> str:
        return self.name + "_total"


class Gauge(Counter):
    kind = "gauge"

    @property
    def sample_name(self) -> str:
        return self.name

    def set(self, value: float) -> None:
        """For a gauge without labels."""
        self.labels().set(value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, doc: str, labelnames: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> None:
        super().__init__(name, doc, labelnames)
        self.buckets = (*sorted(buckets), math.inf)

    def _new(self) -> object:
        return _HistogramChild(self.buckets)

    def labels(self, *values: str) -> _HistogramChild:
        child = self._child(tuple(values))
        assert isinstance(child, _HistogramChild)
        return child

    def observe(self, value: float) -> None:
        """For a histogram without labels."""
        self.labels().observe(value)

    def samples(self) -> Iterable[tuple[str, str, float]]:
        for values, child in sorted(self._children.items()):
            assert isinstance(child, _HistogramChild)
            total = 0
            for le, n in zip(child.buckets, child.counts, strict=True):
                total += n
                yield f"{self.name}_bucket", self._labels(values, _number(le)), total
            yield f"{self.name}_count", self._labels(values), total
            yield f"{self.name}_sum", self._labels(values), child.sum


class Metrics:
    """One set per agent (tests run several agents in one process)."""

    def __init__(self) -> None:
        self.devices = Gauge(
            "hostdev_devices",
            "Devices (allocatable units) advertised to the kubelet",
            ["resource", "health"],
        )
        self.allocations = Counter("hostdev_allocations", "Successful Allocate calls", ["resource"])
        self.allocated_devices = Counter(
            "hostdev_allocated_devices", "Device IDs handed out by Allocate", ["resource"]
        )
        self.errors = Counter(
            "hostdev_errors", "Refused RPCs and failed operations", ["resource", "kind"]
        )
        self.registrations = Counter(
            "hostdev_registrations", "Register calls to the kubelet", ["resource", "result"]
        )
        self.rescans = Counter("hostdev_rescans", "Host rescans", ["kind"])
        self.allocate_seconds = Histogram(
            "hostdev_allocate_seconds",
            "Time the Allocate handler takes (host re-check included, gRPC excluded)",
            ["resource"],
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
        )
        self.dra_claims = Counter(
            "hostdev_dra_claims",
            "ResourceClaims the DRA plugin prepared or unprepared",
            ["operation", "result"],
        )
        self.dra_prepare_seconds = Histogram(
            "hostdev_dra_prepare_seconds",
            "Time NodePrepareResources takes (claim read, re-checks and file writes)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.dra_slice_writes = Counter(
            "hostdev_dra_slice_writes",
            "ResourceSlice writes (create, update, delete) of this node's pool",
            ["verb"],
        )
        self.dra_slices = Gauge(
            "hostdev_dra_published_devices", "Devices this node offers in its ResourceSlices"
        )
        self._all: tuple[_Metric, ...] = tuple(
            m for m in vars(self).values() if isinstance(m, _Metric)
        )

    def set_devices(self, resource: str, healthy: int, unhealthy: int) -> None:
        self.devices.labels(resource, "Healthy").set(healthy)
        self.devices.labels(resource, "Unhealthy").set(unhealthy)

    def forget(self, resource: str) -> None:
        for health in ("Healthy", "Unhealthy"):
            if (resource, health) in self.devices._children:
                self.devices.remove(resource, health)

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return "".join(m.expose() for m in self._all).encode()

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's value by its exposed name and labels (tests), None when absent."""
        for m in self._all:
            want = m._labels(tuple((labels or {}).get(k, "") for k in m.labelnames))
            for n, lab, v in m.samples():
                if n == name and lab == want:
                    return v
        return None


async def serve_http(
    metrics: Metrics, port: int, healthy: Callable[[], tuple[bool, str]], addr: str = ""
) -> asyncio.Server:
    """``/metrics`` and ``/healthz`` on one port, on the running event loop."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = head.split(b"\r\n", 1)[0].split()
            path = parts[1].decode("ascii", "replace") if len(parts) >= 2 else ""
            if path.startswith("/healthz"):
                ok, why = healthy()
                code, ctype, body = (200 if ok else 503), "text/plain; charset=utf-8", why + "\n"
                data = body.encode()
            elif path.startswith("/metrics") or path == "/":
                code, ctype, data = 200, CONTENT_TYPE, metrics.exposition()
            else:
                code, ctype, data = 404, "text/plain; charset=utf-8", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
            writer.write(
                f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, addr or None, port)
    log.info("metrics and /healthz on port %d", server.sockets[0].getsockname()[1])
    return server
