"""Prometheus metrics of the device-plugin servers, and the HTTP endpoint serving them plus
``/healthz`` for the DaemonSet probe."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)


class Metrics:
    """One set per agent; a private registry keeps tests and several agents apart."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.devices = Gauge(
            "hostdev_devices",
            "Devices (allocatable units) advertised to the kubelet",
            ["resource", "health"],
            registry=r,
        )
        self.allocations = Counter(
            "hostdev_allocations", "Successful Allocate calls", ["resource"], registry=r
        )
        self.allocated_devices = Counter(
            "hostdev_allocated_devices",
            "Device IDs handed out by Allocate",
            ["resource"],
            registry=r,
        )
        self.errors = Counter(
            "hostdev_errors", "Refused RPCs and failed operations", ["resource", "kind"], registry=r
        )
        self.registrations = Counter(
            "hostdev_registrations",
            "Register calls to the kubelet",
            ["resource", "result"],
            registry=r,
        )
        self.rescans = Counter("hostdev_rescans", "Host rescans", ["kind"], registry=r)
        self.allocate_seconds = Histogram(
            "hostdev_allocate_seconds",
            "Time the Allocate handler takes (host re-check included, gRPC excluded)",
            ["resource"],
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
            registry=r,
        )

        self.dra_claims = Counter(
            "hostdev_dra_claims",
            "ResourceClaims the DRA plugin prepared or unprepared",
            ["operation", "result"],
            registry=r,
        )
        self.dra_prepare_seconds = Histogram(
            "hostdev_dra_prepare_seconds",
            "Time NodePrepareResources takes (claim read, re-checks and file writes)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.dra_slice_writes = Counter(
            "hostdev_dra_slice_writes",
            "ResourceSlice writes (create, update, delete) of this node's pool",
            ["verb"],
            registry=r,
        )
        self.dra_slices = Gauge(
            "hostdev_dra_published_devices",
            "Devices this node offers in its ResourceSlices",
            registry=r,
        )

    def set_devices(self, resource: str, healthy: int, unhealthy: int) -> None:
        self.devices.labels(resource, "Healthy").set(healthy)
        self.devices.labels(resource, "Unhealthy").set(unhealthy)

    def forget(self, resource: str) -> None:
        for health in ("Healthy", "Unhealthy"):
            with contextlib.suppress(KeyError):
                self.devices.remove(resource, health)


def serve_http(
    metrics: Metrics, port: int, healthy: Callable[[], tuple[bool, str]], addr: str = ""
) -> ThreadingHTTPServer:
    """``/metrics`` and ``/healthz`` on one port, in a daemon thread. Returns the server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/healthz"):
                ok, why = healthy()
                body = (why + "\n").encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
            elif self.path.startswith("/metrics") or self.path == "/":
                body = generate_latest(metrics.registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            else:
                body = b"not found\n"
                self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("http: " + format, *args)

    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics and /healthz on port %d", server.server_address[1])
    return server
