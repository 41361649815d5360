"""Leader election on a ``coordination.k8s.io/v1`` Lease, the way client-go's leaderelection
does it, for the asyncio operator process.

Only the leader runs kopf (its handlers, timers, daemons and watches); the others wait.

- Taking the lease is an optimistic-concurrency write (create, or replace at the
  resourceVersion read): of two processes racing for it, the API server lets exactly one win.
- A lease held by someone else (any holder, ours or foreign) is respected until it expires:
  ``leaseDurationSeconds`` after this process *observed* its last change. Local observation
  time, not the holder's ``renewTime``, so clock skew between nodes cannot shorten it. Between
  its looks (every ``retry`` seconds, and once more exactly when the lease it saw expires) a
  standby *watches* the Lease, so it observes each renewal the moment it is written, not up to
  a retry period later: a kill -9'd leader is replaced ``leaseDuration`` after its last
  renewal, and a released lease is taken at once.
- The leader renews every ``retry`` seconds from a thread of its own (kopf's event loop can be
  busy for seconds, e.g. at start-up on a loaded node; renewals must not wait for it). If it
  has not renewed for ``renew_deadline`` seconds (counted from the start of its last
  successful renewal, which precedes the write any follower can observe), it has lost: the
  process exits at once, before any follower can take over (``renew_deadline`` plus one
  request timeout < ``duration``), so two leaders never write at the same time.
- A graceful stop (SIGTERM) stops kopf first, then releases the lease (holder cleared,
  duration 1 s), so a standby (watching it) takes over at once instead of after a full lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

from hostdev.kube.client import ApiError

log = logging.getLogger("hostdev.operator.leader")

NOT_FOUND, CONFLICT = 404, 409
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


class LeaseApi(Protocol):
    """What the elector needs of :class:`hostdev.kube.client.ApiClient` (tests fake it)."""

    def request(
        self, method: str, path: str, *, body: object = None, timeout: float | None = None
    ) -> Any: ...

    def watch(
        self, path: str, query: Any, timeout_seconds: int, *, read_timeout: float | None = None
    ) -> Any: ...


def micro_time(t: datetime) -> str:
    """A MicroTime as client-go writes it (RFC 3339, microseconds, UTC)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_identity() -> str:
    """Pod name (the hostname in a pod) plus a random suffix: unique even across restarts."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    name: str
    namespace: str
    identity: str
    duration: float = 15.0
    renew_deadline: float = 10.0
    retry: float = 2.0

    @property
    def request_timeout(self) -> float:
        """Per lease call: a hung call still ends in time to give up before anyone may take
        over (renew_deadline + this < duration)."""
        return max(0.2, min(self.retry, (self.duration - self.renew_deadline) / 2))

    def check(self) -> None:
        if not self.retry < self.renew_deadline < self.duration:
            raise ValueError(
                f"leader election needs retry period ({self.retry:g}s) < renew deadline "
                f"({self.renew_deadline:g}s) < lease duration ({self.duration:g}s): the "
                "leader must give up before a standby may take over"
            )


class Elector:
    """Takes, renews and releases one Lease (a plain dict). The blocking client calls run in
    threads."""

    def __init__(
        self,
        api: LeaseApi,
        settings: LeaseSettings,
        clock: Callable[[], float] = time.monotonic,
        *,
        watch: bool = True,
    ) -> None:
        settings.check()
        self.api = api
        self.watch = watch  # follow the lease between looks (off: look every retry period)
        self.s = settings
        self.clock = clock
        self._seen: tuple[Any, ...] | None = None  # the lease record last observed
        self._seen_at = 0.0
        self.holder: str | None = None  # who held it at the last look
        self.expires: float | None = None  # when the lease someone else holds expires (clock)
        self.last_seen = clock()  # last attempt that reached the API server (liveness)

    # ---- one attempt (blocking) --------------------------------------------------------------
    @property
    def _collection(self) -> str:
        return LEASES.format(namespace=quote(self.s.namespace, safe=""))

    @property
    def _path(self) -> str:
        return f"{self._collection}/{quote(self.s.name, safe='')}"

    def try_take(self) -> bool:
        """Take or renew the lease: True when this process holds it now."""
        now = micro_time(datetime.now(UTC))
        s = self.s
        try:
            lease = self.api.request("GET", self._path, timeout=s.request_timeout)
        except ApiError as e:
            if e.status != NOT_FOUND:
                raise
            return self._create(now)
        self.last_seen = self.clock()
        self._observe(lease)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        self.holder = holder or None
        self.expires = None
        if holder and holder != s.identity:
            expires = self._seen_at + float(spec.get("leaseDurationSeconds") or s.duration)
            if self.clock() < expires:
                self.expires = expires
                return False
            log.info("Lease %s/%s of %s expired: taking it", s.namespace, s.name, holder)
        if holder != s.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = (spec.get("leaseTransitions") or 0) + 1
        spec["holderIdentity"] = s.identity
        spec["renewTime"] = now
        spec["leaseDurationSeconds"] = int(s.duration)
        lease["spec"] = spec
        try:
            # A replace at the resourceVersion read: a 409 if anyone wrote it since.
            self.api.request("PUT", self._path, body=lease, timeout=s.request_timeout)
        except ApiError as e:
            if e.status == CONFLICT:
                return False  # someone wrote it since we read it: look again next time
            raise
        self.holder = s.identity
        return True

    def _observe(self, lease: dict[str, Any]) -> str:
        """Note the lease record (its expiry counts from the first sight of each); returns its
        holder ("" = free)."""
        spec = lease.get("spec") or {}
        rv = (lease.get("metadata") or {}).get("resourceVersion")
        record = (spec.get("holderIdentity"), spec.get("renewTime"), rv)
        if record != self._seen:
            self._seen, self._seen_at = record, self.clock()
        return str(spec.get("holderIdentity") or "")

    def follow(self, timeout: float) -> None:
        """Watch the lease for ``timeout`` seconds (whole seconds: the API server's watch
        timeout; the rest is slept), observing each renewal as it is written. Returns early
        when the lease is released or deleted. Blocking: run it in a thread."""
        deadline = self.clock() + timeout
        rv = self._seen[2] if self._seen is not None else None
        if int(timeout) >= 1 and rv:
            query = {"fieldSelector": f"metadata.name={self.s.name}", "resourceVersion": rv}
            events = self.api.watch(
                self._collection,
                query,
                int(timeout),
                read_timeout=timeout + self.s.request_timeout,
            )
            try:
                for event in events:
                    obj = event.get("object")
                    if event.get("type") == "DELETED" or not isinstance(obj, dict):
                        return
                    if not self._observe(obj):
                        return
            except Exception as e:  # expired resourceVersion, network, RBAC: sleep the rest
                log.debug("Lease %s/%s: watch ended: %s", self.s.namespace, self.s.name, e)
            finally:
                events.close()  # ends the watch's connection
        time.sleep(max(0.0, deadline - self.clock()))

    def _create(self, now: str) -> bool:
        s = self.s
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": s.name, "namespace": s.namespace},
            "spec": {
                "holderIdentity": s.identity,
                "leaseDurationSeconds": int(s.duration),
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }
        try:
            self.api.request("POST", self._collection, body=body, timeout=s.request_timeout)
        except ApiError as e:
            if e.status == CONFLICT:
                return False  # another process created it first
            raise
        self.last_seen = self.clock()
        self.holder = s.identity
        return True

    def release_now(self) -> bool:
        """Give the lease up (only if this process still holds it)."""
        lease = self.api.request("GET", self._path)
        spec = lease.get("spec")
        if not spec or spec.get("holderIdentity") != self.s.identity:
            return False
        now = micro_time(datetime.now(UTC))
        spec["holderIdentity"] = None
        spec["leaseDurationSeconds"] = 1
        spec["renewTime"] = now
        spec["acquireTime"] = now
        try:
            self.api.request("PUT", self._path, body=lease)
        except ApiError as e:
            if e.status == CONFLICT:
                return False
            raise
        return True

    def next_look(self) -> float:
        """Seconds until the next attempt is worth making: the retry period, or less when the
        lease someone else holds expires sooner (taking it then, not up to a period later)."""
        if self.expires is None:
            return self.s.retry
        return max(0.0, min(self.s.retry, self.expires - self.clock()))

    # ---- loops (async) -----------------------------------------------------------------------
    async def _attempt(self) -> bool:
        try:
            return await asyncio.to_thread(self.try_take)
        except Exception as e:  # API server down, network: not ours this round
            log.warning("Lease %s/%s: %s", self.s.namespace, self.s.name, e)
            return False

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this process leads (True) or ``stop`` is set (False)."""
        said: str | None = None
        while not stop.is_set():
            if await self._attempt():
                return True
            if self.holder != said:
                said = self.holder
                log.info(
                    "Lease %s/%s is held by %s: standing by",
                    self.s.namespace,
                    self.s.name,
                    said or "nobody reachable",
                )
            await self._until_next_look(stop)
        return False

    async def _until_next_look(self, stop: asyncio.Event) -> None:
        wait = self.next_look()
        if not self.watch:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            return
        follow = asyncio.ensure_future(asyncio.to_thread(self.follow, wait))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({follow, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()  # a stop leaves the watch to end by itself (within ``wait``)

    def hold(self, stop: threading.Event) -> str | None:
        """Renew until the lease is lost (returns why) or ``stop`` is set (None). Blocking: run
        it in a thread of its own."""
        last_ok = self.clock()
        while not stop.wait(self.s.retry):
            started = self.clock()
            try:
                if self.try_take():
                    last_ok = started
                    continue
            except Exception as e:  # API server down, network: try again until the deadline
                log.warning("Lease %s/%s: renewal failed: %s", self.s.namespace, self.s.name, e)
            if self.holder not in (None, self.s.identity):
                return f"Lease taken by {self.holder}"
            if self.clock() - last_ok >= self.s.renew_deadline:
                return f"Lease not renewed for {self.s.renew_deadline:g}s"
        return None

    def keep(self, lost: Callable[[str], None]) -> tuple[threading.Thread, threading.Event]:
        """Renew in a daemon thread; ``lost(reason)`` is called from it when the lease is lost.
        Set the returned event to stop renewing."""
        stop = threading.Event()

        def run() -> None:
            why = self.hold(stop)
            if why is not None:
                lost(why)

        thread = threading.Thread(target=run, name="lease-renewal", daemon=True)
        thread.start()
        return thread, stop

    async def release(self) -> None:
        try:
            if await asyncio.to_thread(self.release_now):
                log.info("Lease %s/%s released", self.s.namespace, self.s.name)
        except Exception as e:
            log.warning("Lease %s/%s not released: %s", self.s.namespace, self.s.name, e)
