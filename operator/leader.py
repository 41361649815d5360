"""Leader election on a ``coordination.k8s.io/v1`` Lease, the way client-go's leaderelection
does it, for the asyncio operator process.

Only the leader runs kopf (its handlers, timers, daemons and watches); the others wait.

- Taking the lease is an optimistic-concurrency write (create, or replace at the
  resourceVersion read): of two processes racing for it, the API server lets exactly one win.
- A lease held by someone else (any holder, ours or foreign) is respected until it expires:
  ``leaseDurationSeconds`` after this process *observed* its last change. Local observation
  time, not the holder's ``renewTime``, so clock skew between nodes cannot shorten it.
- The leader renews every ``retry`` seconds from a thread of its own (kopf's event loop can be
  busy for seconds, e.g. at start-up on a loaded node; renewals must not wait for it). If it
  has not renewed for ``renew_deadline`` seconds (counted from the start of its last
  successful renewal, which precedes the write any follower can observe), it has lost: the
  process exits at once, before any follower can take over (``renew_deadline`` plus one
  request timeout < ``duration``), so two leaders never write at the same time.
- A graceful stop (SIGTERM) stops kopf first, then releases the lease (holder cleared,
  duration 1 s), so a standby takes over within one retry period instead of a full lease.
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
from typing import Any

import kubernetes

log = logging.getLogger("hostdev.operator.leader")

NOT_FOUND, CONFLICT = 404, 409


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
    """Takes, renews and releases one Lease. The blocking client calls run in threads."""

    def __init__(
        self,
        api: kubernetes.client.CoordinationV1Api,
        settings: LeaseSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        settings.check()
        self.api = api
        self.s = settings
        self.clock = clock
        self._seen: tuple[Any, ...] | None = None  # the lease record last observed
        self._seen_at = 0.0
        self.holder: str | None = None  # who held it at the last look
        self.last_seen = clock()  # last attempt that reached the API server (liveness)

    # ---- one attempt (blocking) --------------------------------------------------------------
    def try_take(self) -> bool:
        """Take or renew the lease: True when this process holds it now."""
        now = datetime.now(UTC)
        s = self.s
        try:
            lease = self.api.read_namespaced_lease(
                s.name, s.namespace, _request_timeout=s.request_timeout
            )
        except kubernetes.client.ApiException as e:
            if e.status != NOT_FOUND:
                raise
            return self._create(now)
        self.last_seen = self.clock()
        spec = lease.spec or kubernetes.client.V1LeaseSpec()
        rv = lease.metadata.resource_version if lease.metadata else None
        record = (spec.holder_identity, spec.renew_time, rv)
        if record != self._seen:
            self._seen, self._seen_at = record, self.clock()
        holder = spec.holder_identity or ""
        self.holder = holder or None
        if holder and holder != s.identity:
            expires = self._seen_at + float(spec.lease_duration_seconds or s.duration)
            if self.clock() < expires:
                return False
            log.info("Lease %s/%s of %s expired: taking it", s.namespace, s.name, holder)
        if holder != s.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = s.identity
        spec.renew_time = now
        spec.lease_duration_seconds = int(s.duration)
        lease.spec = spec
        try:
            self.api.replace_namespaced_lease(
                s.name, s.namespace, lease, _request_timeout=s.request_timeout
            )
        except kubernetes.client.ApiException as e:
            if e.status == CONFLICT:
                return False  # someone wrote it since we read it: look again next time
            raise
        self.holder = s.identity
        return True

    def _create(self, now: datetime) -> bool:
        s = self.s
        body = kubernetes.client.V1Lease(
            metadata=kubernetes.client.V1ObjectMeta(name=s.name, namespace=s.namespace),
            spec=kubernetes.client.V1LeaseSpec(
                holder_identity=s.identity,
                lease_duration_seconds=int(s.duration),
                acquire_time=now,
                renew_time=now,
                lease_transitions=0,
            ),
        )
        try:
            self.api.create_namespaced_lease(s.namespace, body, _request_timeout=s.request_timeout)
        except kubernetes.client.ApiException as e:
            if e.status == CONFLICT:
                return False  # another process created it first
            raise
        self.last_seen = self.clock()
        self.holder = s.identity
        return True

    def release_now(self) -> bool:
        """Give the lease up (only if this process still holds it)."""
        s = self.s
        lease = self.api.read_namespaced_lease(s.name, s.namespace)
        if lease.spec is None or lease.spec.holder_identity != s.identity:
            return False
        now = datetime.now(UTC)
        lease.spec.holder_identity = None
        lease.spec.lease_duration_seconds = 1
        lease.spec.renew_time = now
        lease.spec.acquire_time = now
        try:
            self.api.replace_namespaced_lease(s.name, s.namespace, lease)
        except kubernetes.client.ApiException as e:
            if e.status == CONFLICT:
                return False
            raise
        return True

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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.s.retry)
        return False

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
