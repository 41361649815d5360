"""The node agent's cluster loop: this node's ``PassthroughNodeState`` in, configuration and
device-plugin resources applied, status out.

Threads: a watcher (list + watch from the resourceVersion, list again on 410) feeds a queue;
the loop thread syncs when the spec generation changes (a status-only update never re-applies),
re-runs the sync every ``resync`` seconds as a safety net (sooner after a failed sync: ``retry``
seconds, doubling per consecutive failure up to ``resync``, since most failures are transient:
a VF still held by a VM, a driver still loading), refreshes health and allocations
every ``allocations_every`` seconds; a :class:`StatusWriter` sends the status batched and only
on change.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from hostdev.deviceplugin.flags import NODESTATE_RESYNC
from hostdev.deviceplugin.nodestate.kube import NodeStateClient, WatchExpiredError
from hostdev.deviceplugin.nodestate.status import StatusWriter
from hostdev.deviceplugin.nodestate.sync import Syncer, generation_of, utc_now
from hostdev.host.address import PciAddress
from hostdev.host.model import Inventory
from hostdev.policy.blockers import Blocker, blocking_pods, find_blockers, with_blockers
from hostdev.policy.mdev import MdevSpec
from hostdev.policy.nodestatus import (
    FAILED,
    IN_PROGRESS,
    AllocationRow,
    SyncOutcome,
    render_status,
)

log = logging.getLogger(__name__)

Served = Mapping[str, tuple[PciAddress, ...]]


class ResourceSink(Protocol):
    """Where the resolved resources go (the device-plugin manager, through an adapter); ``dra``
    names the resources the kubelet gets through DRA instead of a device plugin."""

    def apply(
        self,
        resources: Served,
        dra: frozenset[str] = frozenset(),
        mdevs: tuple[tuple[str, MdevSpec], ...] = (),
    ) -> None: ...


class AllocationSource(Protocol):
    def read(self, served: Served, inventory: Inventory) -> tuple[AllocationRow, ...] | None: ...


class PodsGone(Protocol):
    """Tells when pods on this node go (a watch): ``run`` calls ``gone(namespace, pod)`` for
    each until ``stop`` is set."""

    def run(self, stop: threading.Event, gone: Callable[[str, str], None]) -> None: ...


@dataclass(frozen=True, slots=True)
class _Gone:
    namespace: str
    pod: str


@dataclass(frozen=True, slots=True)
class LoopSettings:
    coalesce: float = 1.0  # seconds a status waits for newer ones before it is written
    resync: float = NODESTATE_RESYNC  # re-run the sync this often even without a spec change
    allocations_every: float = 30.0  # re-read health and allocations this often
    watch_timeout: int = 60  # seconds per watch request (the server ends it; we re-watch)
    backoff: float = 5.0  # after an API error
    retry: float = 10.0  # first re-try of a failed sync; doubles per failure, up to ``resync``


def _flat(served: Served) -> dict[PciAddress, str]:
    return {a: name for name, addrs in served.items() for a in addrs}


class NodeStateLoop:
    def __init__(
        self,
        client: NodeStateClient,
        syncer: Syncer,
        sink: ResourceSink,
        *,
        allocations: AllocationSource | None = None,
        settings: LoopSettings | None = None,
        live_inventory: Callable[[], Inventory | None] | None = None,
        served: Served | None = None,
        pods_gone: PodsGone | None = None,
        mdev_status: Callable[[], Mapping[str, Any] | None] | None = None,
    ) -> None:
        self.client = client
        self.mdev_status = mdev_status  # the status.mdev section (None: the node has none)
        self.syncer = syncer
        self.sink = sink
        self.allocation_source = allocations
        # The device plugins' event-driven view of the host, if there is one: refreshes read it
        # instead of walking sysfs again (a full discovery of 4096 VFs takes ~0.6 s).
        self.live_inventory = live_inventory
        self.settings = settings or LoopSettings()
        self.name = client.name
        self.writer = StatusWriter(
            client.patch_status, name=client.name, coalesce=self.settings.coalesce
        )
        self.pods_gone = pods_gone
        self._events: queue.Queue[Mapping[str, Any] | _Gone | None] = queue.Queue()
        self._obj: Mapping[str, Any] | None = None
        self._uid: str | None = None
        self._synced_generation: int | None = None
        # What the plugins serve already (seeded at start-up from their saved lists), so the
        # first sync only tells them when the spec says otherwise.
        self._served: Served | None = served
        self._dra: frozenset[str] = frozenset()
        self._mdevs: tuple[tuple[str, MdevSpec], ...] = ()
        self._inventory: Inventory | None = None
        self._outcome: SyncOutcome | None = None
        self._allocations: tuple[AllocationRow, ...] | None = None
        # VMs (their pods) the last sync had to wait for; when one lets go, sync again at once.
        self._blockers: tuple[Blocker, ...] = ()
        self._waiting_on: frozenset[tuple[str, str]] = frozenset()
        self._replan = False
        # Progress counters, so tests and benches wait for events instead of for time:
        self.syncs = 0  # completed syncs
        self.refreshes = 0  # completed health/allocation refreshes
        self.watch_rounds = 0  # watch requests that ended normally (the server's timeout)
        self.handled = 0  # watch items (objects, deletions) taken and acted upon
        self.handled_version: str | None = None  # resourceVersion of the newest one handled

    # ---- watcher thread ---------------------------------------------------------------------
    def _watch(self, stop: threading.Event) -> None:
        rv: str | None = None
        while not stop.is_set():
            try:
                if rv is None:
                    obj, rv = self.client.list()
                    self._events.put(obj)
                for ev in self.client.watch(rv, self.settings.watch_timeout):
                    rv = str((ev.obj.get("metadata") or {}).get("resourceVersion") or rv)
                    if ev.type == "DELETED":
                        self._events.put(None)
                    elif ev.type != "BOOKMARK":
                        self._events.put(ev.obj)
                    if stop.is_set():
                        return
                self.watch_rounds += 1
            except WatchExpiredError:
                log.info("NodeState %s: watch expired, listing again", self.name)
                rv = None
            except Exception as e:
                if stop.is_set():
                    return
                log.warning("NodeState %s: list/watch failed: %s", self.name, e)
                rv = None
                stop.wait(self.settings.backoff)

    # ---- loop thread ------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        s = self.settings
        self.writer.start()
        watcher = threading.Thread(
            target=self._watch, args=(stop,), name=f"watch-{self.name}", daemon=True
        )
        watcher.start()
        pods = None
        if self.pods_gone is not None:
            pods = threading.Thread(
                target=self.pods_gone.run,
                args=(stop, lambda ns, pod: self._events.put(_Gone(ns, pod))),
                name=f"pods-{self.name}",
                daemon=True,
            )
            pods.start()
        next_resync = next_alloc = float("inf")
        failures = 0  # consecutive failed syncs of the current spec
        try:
            while not stop.is_set():
                now = time.monotonic()
                wait = max(0.0, min(next_resync, next_alloc, now + 0.5) - now)
                taken = 0
                try:
                    item = self._events.get(timeout=wait)
                except queue.Empty:
                    pass
                else:
                    self._observe(item)
                    taken = 1
                    while True:  # take every queued event: one sync for a burst
                        try:
                            self._observe(self._events.get_nowait())
                        except queue.Empty:
                            break
                        taken += 1
                now = time.monotonic()
                if self._obj is not None and (
                    generation_of(self._obj) != self._synced_generation
                    or now >= next_resync
                    or self._replan
                ):
                    self._replan = False
                    if generation_of(self._obj) != self._synced_generation:
                        failures = 0  # a new spec starts a fresh back-off
                    self._guarded_sync()
                    now = time.monotonic()
                    failed = self._outcome is not None and self._outcome.state == FAILED
                    failures = failures + 1 if failed else 0
                    delay = min(s.resync, s.retry * 2 ** (failures - 1)) if failed else s.resync
                    if failed:
                        log.info(
                            "NodeState %s: sync failed (%d in a row), retrying in %.0f s",
                            self.name,
                            failures,
                            delay,
                        )
                    next_resync = now + delay
                    next_alloc = now + s.allocations_every
                elif self._obj is not None and self._outcome is not None and now >= next_alloc:
                    try:
                        self.refresh()
                    except Exception:
                        log.exception("NodeState %s: refresh failed", self.name)
                    next_alloc = time.monotonic() + s.allocations_every
                if taken:
                    version = (self._obj or {}).get("metadata", {}).get("resourceVersion")
                    self.handled_version = None if self._obj is None else str(version)
                    self.handled += taken
        finally:
            self.writer.stop(flush=True)
            watcher.join(timeout=1.0)
            if pods is not None:
                pods.join(timeout=1.0)

    def _observe(self, obj: Mapping[str, Any] | _Gone | None) -> None:
        if isinstance(obj, _Gone):
            if (obj.namespace, obj.pod) in self._waiting_on:
                log.info(
                    "NodeState %s: pod %s/%s that held devices the spec needs is gone: "
                    "applying again",
                    self.name,
                    obj.namespace,
                    obj.pod,
                )
                self._replan = True
            return
        if obj is None:
            if self._obj is not None:
                log.warning(
                    "NodeState %s was deleted: keeping the node's configuration and resources "
                    "as they are until it is back",
                    self.name,
                )
            self._obj = None
            return
        uid = str((obj.get("metadata") or {}).get("uid") or "")
        if uid != self._uid:
            # First sight (or re-created): what is written is whatever the object says now.
            self._uid = uid
            self._synced_generation = None
            self.writer.reset(obj.get("status"))
        self._obj = obj

    def _render(self, outcome: SyncOutcome) -> dict[str, Any]:
        assert self._inventory is not None
        previous, now = self.writer.written, utc_now()
        status = render_status(
            self._inventory, outcome, self._allocations, previous=previous, now=now
        )
        mdev = self.mdev_status() if self.mdev_status is not None else None
        if mdev is not None:
            status["mdev"] = mdev
        return with_blockers(
            status, self._blockers, previous=previous, generation=outcome.generation, now=now
        )

    def _find_blockers(self) -> None:
        """Who holds what the last sync could not change."""
        refusals = self._outcome.refusals if self._outcome is not None else ()
        self._blockers = find_blockers(refusals, self._allocations)
        before, self._waiting_on = self._waiting_on, blocking_pods(self._blockers)
        if self._blockers and self._waiting_on != before:
            holders = ", ".join(f"{ns}/{pod}" for ns, pod in sorted(self._waiting_on))
            log.info("NodeState %s: waiting for %s", self.name, holders or "unknown holders")

    def _guarded_sync(self) -> None:
        """A bug in one sync must not end the agent: report it, try again at the next resync."""
        try:
            self.sync_once()
        except Exception as e:
            log.exception("NodeState %s: sync failed unexpectedly", self.name)
            self._synced_generation = generation_of(self._obj or {})
            if self._inventory is not None:
                failed = SyncOutcome(
                    FAILED,
                    self._synced_generation,
                    f"internal error: {type(e).__name__}: {e}",
                    resources=_flat(self._served or {}),
                    finished_at=utc_now(),
                )
                self._outcome = failed
                self.writer.submit(self._render(failed))

    def sync_once(self) -> None:
        """Apply the current object's spec and report it."""
        obj = self._obj
        assert obj is not None
        generation = generation_of(obj)
        served = _flat(self._served or {})
        if self._inventory is None:
            self._inventory = self.syncer.discover()
        if generation != self._synced_generation:
            # A new spec: say so (a slow apply shows InProgress; a fast one is batched away).
            # A periodic re-sync of the same spec says nothing unless its result differs.
            self.writer.submit(self._render(SyncOutcome(IN_PROGRESS, generation, resources=served)))
        result = self.syncer.sync(obj)
        outcome = result.outcome
        if result.serve is not None and (
            result.serve != self._served or result.dra != self._dra or result.mdevs != self._mdevs
        ):
            try:
                if result.mdevs:
                    self.sink.apply(result.serve, result.dra, mdevs=result.mdevs)
                else:
                    self.sink.apply(result.serve, result.dra)
                self._served, self._dra = result.serve, result.dra
                self._mdevs = result.mdevs
            except Exception as e:
                log.exception(
                    "NodeState %s: the device plugins did not take the resources", self.name
                )
                outcome = replace(
                    outcome,
                    state=FAILED,
                    error=(outcome.error + "; " if outcome.error else "") + f"device plugins: {e}",
                )
        if result.serve is None or self._served != result.serve or self._dra != result.dra:
            outcome = replace(outcome, resources=_flat(self._served or {}))
        self._inventory = result.inventory
        self._outcome = outcome
        self._synced_generation = generation
        self.syncs += 1
        self._allocations = self._read_allocations(result.inventory)
        self._waiting_on = frozenset()
        self._find_blockers()
        self.writer.submit(self._render(outcome))

    def refresh(self) -> None:
        """Health and allocations may change without a sync: re-read and report them."""
        assert self._outcome is not None
        live = self.live_inventory() if self.live_inventory is not None else None
        self._inventory = live if live is not None else self.syncer.discover()
        self._allocations = self._read_allocations(self._inventory)
        if self._allocations is not None:
            holding = {(r.namespace, r.pod) for r in self._allocations}
            if self._waiting_on - holding:
                # The kubelet no longer lists a blocking pod: it let go; apply again now.
                self._replan = True
            self._find_blockers()  # (unknown allocations: the blockers stay as they were)
        self.writer.submit(self._render(self._outcome))
        self.refreshes += 1

    def _read_allocations(self, inventory: Inventory) -> tuple[AllocationRow, ...] | None:
        if self.allocation_source is None:
            return None
        try:
            return self.allocation_source.read(self._served or {}, inventory)
        except Exception as e:
            log.warning("NodeState %s: cannot read allocations: %s", self.name, e)
            return None
