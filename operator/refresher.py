"""One task that keeps every applied PassthroughRequest's status current (Running/Allocated from
the VMIs and the agents' reports; a VM that lost a request's entries gets them again).

It replaces a kopf timer per request: each timer was an asyncio task with its own stopper and
the last full body kopf saw (managedFields included), ~135 objects per request. Here a request
costs a compact index entry (handlers.requests.requests_idx) and two floats.

When a request is looked at (``due``): once it has been unchanged for ``settle`` seconds (so
kopf's own handlers for that change are done, as kopf's ``idle`` did for the timer), then every
``interval`` seconds, and at once when its VMI changed, its VM appeared, went or stopped
listing it (``vm_owners``), or the cluster view changed (an agent's report). A request
waiting for capacity does not wait to settle: it is looked at as soon as it starts waiting
(capacity may have appeared while it was being refused) and at each change of the cluster
view (which may be that capacity); the capacity check turned it away, so there is nothing of
kopf's in flight for that change that a look could overtake.
(This replaced a kopf daemon per waiting request, which made kopf keep the last full body of
every request, ~15 MiB per 1,000.) What a look does is the caller's (``look``); this module only
decides when.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("hostdev.operator.refresher")

Key = tuple[str, str]  # (namespace, request name)
VmKey = tuple[str, str]  # (namespace, VM name)

STATUS_SETTLE_S = 5.0  # first look once a request has been unchanged this long
STATUS_INTERVAL_S = 15.0  # then every this long, besides the looks changes ask for
DEBOUNCE_S = 0.2  # coalesce a burst of changes into one pass
# After a change of the cluster view: sooner (a waiting request applies as soon as capacity
# appears); such changes come from agents' reports, nodes and policies, not in bursts of
# thousands as request changes do.
CLUSTER_DEBOUNCE_S = 0.05


WAITING = frozenset({"Pending", "Refused"})


def waiting_for_capacity(status: Mapping[str, Any]) -> bool:
    """The capacity check turned the request away (Accepted=False): it waits for capacity."""
    conds = {c.get("type"): c for c in status.get("conditions") or () if isinstance(c, Mapping)}
    accepted = conds.get("Accepted") or {}
    return status.get("phase") in WAITING and accepted.get("status") == "False"


@dataclass(frozen=True, slots=True)
class Item:
    """What the scheduler needs of one request (from the index entry)."""

    key: Key
    vm: VmKey
    version: str  # resourceVersion: a new one is a change of the request
    waiting: bool = False  # for capacity: looked at without waiting for it to settle


def item_of(view: Mapping[str, Any]) -> Item:
    meta = view.get("metadata") or {}
    ns = str(meta.get("namespace") or "")
    return Item(
        (ns, str(meta.get("name") or "")),
        (ns, str((view.get("spec") or {}).get("vmName") or "")),
        str(meta.get("resourceVersion") or ""),
        waiting_for_capacity(view.get("status") or {}),
    )


@dataclass
class Schedule:
    """Per request: the version last seen and since when, and when it was last looked at."""

    seen: dict[Key, tuple[str, float]] = field(default_factory=dict)
    looked: dict[Key, float] = field(default_factory=dict)


def due(
    items: Iterable[Item],
    sched: Schedule,
    *,
    vms: set[VmKey],
    everything: bool,
    now: float,
    settle: float = STATUS_SETTLE_S,
    interval: float = STATUS_INTERVAL_S,
) -> tuple[list[Key], float | None]:
    """The requests to look at now, and when the next one is due without any further change
    (None: none is). Updates ``sched``'s record of versions (and forgets gone requests); the
    caller records the looks."""
    out: list[Key] = []
    nxt: float | None = None
    present: set[Key] = set()
    for it in items:
        present.add(it.key)
        seen = sched.seen.get(it.key)
        if seen is None or seen[0] != it.version:
            seen = sched.seen[it.key] = (it.version, now)
        at: float
        if now - seen[1] < settle and not it.waiting:
            at = seen[1] + settle  # still changing (or just changed): wait for it to settle
        else:
            last = sched.looked.get(it.key)
            if (
                last is not None
                and last >= seen[1]  # not changed since the last look
                and not everything
                and it.vm not in vms
                and now - last < interval
            ):
                at = last + interval
            else:
                out.append(it.key)
                at = now + interval
        nxt = at if nxt is None else min(nxt, at)
    for gone in [k for k in sched.seen if k not in present]:
        del sched.seen[gone]
        sched.looked.pop(gone, None)
    return out, nxt


@dataclass
class Refresher:
    """The task and what wakes it. Handlers call ``request_changed`` / ``vm_changed``; the
    cluster view's changes arrive through ``changes`` (an event set by the next change)."""

    look: Callable[[Sequence[Mapping[str, Any]]], Awaitable[None]]
    requests: Mapping[Any, Iterable[Mapping[str, Any]]]  # kopf index: key -> compact views
    changes: Callable[[], asyncio.Event] | None = None
    settle: float = STATUS_SETTLE_S
    interval: float = STATUS_INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    sched: Schedule = field(default_factory=Schedule)
    _vms: set[VmKey] = field(default_factory=set)
    _owners: dict[VmKey, tuple[str, ...]] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def request_changed(self) -> None:
        self._poke()

    def vm_changed(self, namespace: str, name: str) -> None:
        self._vms.add((namespace, name))
        self._poke()

    def vm_owners(self, namespace: str, name: str, owners: tuple[str, ...] | None) -> bool:
        """A VM's event, with the requests its ownership annotation lists (None: deleted);
        True when it asks for a look at the VM's requests. Of the VM a look reads only
        whether it exists and lists the request, so only a VM that appears, goes, or stops
        listing a request that still has something to refresh does (a request being deleted
        has left the index before its release takes its entries off). Each created or deleted
        request patches its VM once, and a look at all the VM's other requests after each
        found nothing to do. The VMI's changes still ask through ``vm_changed``."""
        key = (namespace, name)
        old = self._owners.pop(key, None)
        if owners is not None:
            self._owners[key] = owners
        if old is None and owners is None:
            return False  # never seen, or seen deleted already
        if old is not None and owners is not None:
            lost = set(old).difference(owners)
            if not any((namespace, r) in self.requests for r in lost):
                return False
        self.vm_changed(namespace, name)
        return True

    def _poke(self) -> None:
        """Call from kopf handlers only: the first call starts the task there, so it inherits
        kopf's handler context (kopf.info needs it for Events) and starts only once kopf has
        filled its indexes (handlers run after that)."""
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name="hostdev-request-refresher"
            )

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        changed: asyncio.Event | None = None  # the cluster's next-change event at the last pass
        while True:
            # Coalesce a burst of changes into one pass; a change of the cluster view during
            # the longer wait cuts it short.
            if changed is not None and not changed.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), DEBOUNCE_S - CLUSTER_DEBOUNCE_S)
            await asyncio.sleep(CLUSTER_DEBOUNCE_S)
            self._wake.clear()
            # Set by any change of the cluster view since the last pass began (during it, the
            # wait after it or this one), e.g. an agent's report: Allocated may change, a
            # waiting request may fit now. Read here, not only when a wait ends, so a change
            # that comes after a wait ended for a request or VM change is not lost.
            everything = changed is not None and changed.is_set()
            # Take the change flags and the cluster's next-change event before reading the
            # indexes: a change during the pass then brings another pass.
            vms, self._vms = self._vms, set()
            changed = self.changes() if self.changes is not None else None
            views = {}
            for key in list(self.requests):
                for view in self.requests.get(key, ()):
                    views[item_of(view)] = view
            now = self.clock()
            keys, nxt = due(views, self.sched, vms=vms, everything=everything, now=now,
                            settle=self.settle, interval=self.interval)  # fmt: skip
            if keys:
                wanted = set(keys)
                try:
                    await self.look([v for it, v in views.items() if it.key in wanted])
                except Exception:
                    # Never let the one refresher die: the next interval looks again.
                    log.exception("refreshing request status failed")
                for k in keys:
                    self.sched.looked[k] = now
            await self._sleep(nxt, changed)

    async def _sleep(self, until: float | None, changed: asyncio.Event | None) -> None:
        """Until poked, the cluster view changes, or the next request is due."""
        waits = [asyncio.ensure_future(self._wake.wait())]
        if changed is not None:
            waits.append(asyncio.ensure_future(changed.wait()))
        timeout = None if until is None else max(0.0, until - self.clock())
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await w
