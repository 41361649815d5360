"""Keeps this node's ResourceSlices equal to what the DRA front end wants, writing only changes.

Two threads (the API client blocks): a watcher lists and watches this node's slices
of the driver (field selector ``spec.nodeName``, ``spec.driver``; nothing else is ever seen,
so nothing else is ever touched) and a writer that reconciles the newest wanted content
against them. Pool generation follows the upstream resourceslice controller: kept when one
update suffices (a unit turning unhealthy changes one slice), bumped when slices are created or
several change, so consumers never mix two versions of the pool. Failed writes are retried
with back-off (doubling up to ``backoff_max``); slices deleted by someone else (the kubelet
wipes them when the plugin is gone too long) come back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from hostdev.deviceplugin.dra.kube import (
    MANAGED_BY,
    DraApi,
    WatchExpiredError,
)
from hostdev.kube.client import ApiError
from hostdev.policy.dra import API_VERSION, DRIVER, SliceContent

log = logging.getLogger(__name__)


def _generation(obj: Mapping[str, Any]) -> int:
    g = ((obj.get("spec") or {}).get("pool") or {}).get("generation")
    return g if isinstance(g, int) else 0


def _devices(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The devices as compared: name and attributes (what this driver sets)."""
    return [
        {"name": d.get("name"), "attributes": d.get("attributes") or {}}
        for d in (obj.get("spec") or {}).get("devices") or ()
    ]


def _same(obj: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    spec = obj.get("spec") or {}
    return bool(
        spec.get("driver") == want["driver"]
        and spec.get("nodeName") == want["nodeName"]
        and spec.get("pool") == want["pool"]
        and _devices(obj) == want["devices"]
    )


class SlicePublisher:
    def __init__(
        self,
        api: DraApi,
        *,
        backoff: float = 0.2,
        backoff_max: float = 30.0,
        watch_timeout: int = 300,
    ) -> None:
        self.api = api
        self.node = api.node
        self.backoff, self.backoff_max = backoff, backoff_max
        self.watch_timeout = watch_timeout
        self._cv = threading.Condition()
        self._desired: tuple[SliceContent, ...] | None = None
        self._actual: dict[str, Mapping[str, Any]] = {}
        self._listed = False
        self._dirty = False
        self._stop = threading.Event()
        self._retry_at = 0.0
        self._threads: list[threading.Thread] = []
        self._owner: list[dict[str, Any]] | None = None
        # name -> (content, generation, slice count, resourceVersion) of our last write of it:
        # a slice still at that resourceVersion needs no deep comparison (a 4,096-unit pool
        # has 32 slices; one unit flipping should cost one slice's work).
        self._written: dict[str, tuple[SliceContent, int, int, str]] = {}
        # name -> DELETED events the watch has seen: an API answer read before a deletion the
        # watch reports after it must not bring the slice back into ``_actual`` (nothing would
        # ever say it is gone again, and the pool would stay a slice short).
        self._deletions: dict[str, int] = {}
        self.synced_version = 0  # bumped whenever actual == desired after a reconcile
        self.submitted_version = 0
        self.last_error: str | None = None
        self.reconciles = 0

    # ---- interface ------------------------------------------------------------------------
    def start(self) -> None:
        for target, name in ((self._watch, "dra-slices-watch"), (self._write, "dra-slices")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)

    def submit(self, slices: Sequence[SliceContent]) -> None:
        """The slices wanted now (thread-safe; the newest wins)."""
        with self._cv:
            new = tuple(slices)
            if new == self._desired:
                return
            self._desired = new
            self.submitted_version += 1
            self._dirty = True
            self._retry_at = 0.0
            self._cv.notify_all()

    def wait_synced(self, timeout: float) -> bool:
        """True once the slices equal the last submission (tests, benches)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.synced_version < self.submitted_version or self._dirty:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    @property
    def actual(self) -> dict[str, Mapping[str, Any]]:
        with self._cv:
            return dict(self._actual)

    # ---- watcher --------------------------------------------------------------------------
    def _watch(self) -> None:
        rv: str | None = None
        delay = self.backoff
        while not self._stop.is_set():
            try:
                if rv is None:
                    items, rv = self.api.list_slices()
                    with self._cv:
                        self._actual = {str(o["metadata"]["name"]): o for o in items}
                        self._listed = True
                        self._dirty = True
                        self._cv.notify_all()
                    delay = self.backoff
                for ev in self.api.watch_slices(rv, self.watch_timeout):
                    rv = str((ev.obj.get("metadata") or {}).get("resourceVersion") or rv)
                    if ev.type == "BOOKMARK":
                        continue
                    name = str((ev.obj.get("metadata") or {}).get("name"))
                    with self._cv:
                        if ev.type == "DELETED":
                            self._deletions[name] = self._deletions.get(name, 0) + 1
                            if self._actual.pop(name, None) is not None:
                                log.info("DRA: ResourceSlice %s was deleted", name)
                                self._dirty = True
                        else:
                            old = self._actual.get(name)
                            if old is None or _rv(old) != _rv(ev.obj):
                                self._actual[name] = ev.obj
                                self._dirty = True
                        if self._dirty:
                            self._cv.notify_all()
                    if self._stop.is_set():
                        return
            except WatchExpiredError:
                rv = None
            except Exception as e:
                if self._stop.is_set():
                    return
                log.warning("DRA: list/watch of ResourceSlices failed: %s", _reason(e))
                rv = None
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff_max)

    # ---- writer ---------------------------------------------------------------------------
    def _write(self) -> None:
        delay = self.backoff
        while not self._stop.is_set():
            with self._cv:
                while not self._stop.is_set():
                    ready = self._listed and self._dirty and self._desired is not None
                    wait = self._retry_at - time.monotonic()
                    if ready and wait <= 0:
                        break
                    self._cv.wait(wait if ready else None)
                if self._stop.is_set():
                    return
                desired = self._desired
                version = self.submitted_version
                self._dirty = False
                actual = dict(self._actual)
            assert desired is not None
            try:
                self._reconcile(desired, actual)
            except Exception as e:
                why = _reason(e)
                if why != self.last_error:
                    log.error("DRA: ResourceSlices of node %s not written: %s", self.node, why)
                self.last_error = why
                with self._cv:
                    self._dirty = True
                    self._retry_at = time.monotonic() + delay
                delay = min(delay * 2, self.backoff_max)
                continue
            delay = self.backoff
            if self.last_error is not None:
                log.info("DRA: ResourceSlices of node %s written again", self.node)
            self.last_error = None
            with self._cv:
                self.reconciles += 1
                if version == self.submitted_version and not self._dirty:
                    self.synced_version = version
                self._cv.notify_all()

    def _owner_refs(self) -> list[dict[str, Any]]:
        if self._owner is None:
            uid = self.api.node_uid()
            self._owner = (
                [{"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": uid}] if uid else []
            )
        return self._owner

    def _reconcile(
        self, desired: tuple[SliceContent, ...], actual: dict[str, Mapping[str, Any]]
    ) -> None:
        count = len(desired)
        names = {s.name for s in desired}
        generation = max((_generation(o) for o in actual.values()), default=0)
        stale = [o for n, o in actual.items() if n not in names]
        new = [s for s in desired if s.name not in actual]
        changed = [
            s
            for s in desired
            if s.name in actual and not self._same(actual[s.name], s, generation, count)
        ]
        if new or len(changed) > 1:
            generation += 1  # consumers use only the newest generation of a pool
            changed = [s for s in desired if s.name in actual]
        for o in stale:
            meta = o.get("metadata") or {}
            name = str(meta["name"])
            try:
                self.api.delete_slice(name, meta.get("uid"), meta.get("resourceVersion"))
            except ApiError as e:
                if e.status == 409:
                    self._refresh(name)  # changed meanwhile: look again, retry
                raise
            self._record(name, None)
            log.info("DRA: ResourceSlice %s deleted (no longer needed)", name)
        for s in changed:
            body = dict(actual[s.name])
            body["spec"] = s.spec(self.node, generation, count)
            seen = self._deletions_of(s.name)
            try:
                obj = self.api.replace_slice(s.name, body)
                self._record(s.name, obj, (s, generation, count), seen)
            except ApiError as e:
                if e.status in (404, 409):
                    self._refresh(s.name)  # changed or deleted meanwhile: look again, retry
                raise
        for s in new:
            body = {
                "apiVersion": API_VERSION,
                "kind": "ResourceSlice",
                "metadata": {
                    "name": s.name,
                    "labels": dict(MANAGED_BY),
                    "ownerReferences": self._owner_refs(),
                },
                "spec": s.spec(self.node, generation, count),
            }
            seen = self._deletions_of(s.name)
            try:
                self._record(s.name, self.api.create_slice(body), (s, generation, count), seen)
            except ApiError as e:
                if e.status == 409:
                    self._refresh(s.name)
                raise
        if stale or changed or new:
            log.info(
                "DRA: node %s pool generation %d: %d slice(s) with %d device(s); wrote %d, "
                "deleted %d",
                self.node,
                generation,
                count,
                sum(len(s.devices) for s in desired),
                len(changed) + len(new),
                len(stale),
            )

    def _same(
        self, obj: Mapping[str, Any], want: SliceContent, generation: int, count: int
    ) -> bool:
        mine = self._written.get(want.name)
        if mine is not None and mine[3] == _rv(obj):
            # Unchanged since our write: compare what we wrote (the same device objects).
            return mine[:3] == (want, generation, count)
        return _same(obj, want.spec(self.node, generation, count))

    def _deletions_of(self, name: str) -> int:
        with self._cv:
            return self._deletions.get(name, 0)

    def _record(
        self,
        name: str,
        obj: Mapping[str, Any] | None,
        wrote: tuple[SliceContent, int, int] | None = None,
        seen: int | None = None,
    ) -> None:
        """Take an API answer for ``name`` into ``_actual``. ``seen``: the deletions of it the
        watch had reported before the call; if it reported one since, the answer is older than
        that deletion and only the watch knows what is there: look again."""
        with self._cv:
            if obj is not None and seen is not None and self._deletions.get(name, 0) != seen:
                self._written.pop(name, None)
                self._dirty = True
                self._cv.notify_all()
                return
            if obj is None:
                self._actual.pop(name, None)
            else:
                self._actual[name] = obj
            if obj is None or wrote is None:
                self._written.pop(name, None)
            else:
                self._written[name] = (*wrote, _rv(obj))

    def _refresh(self, name: str) -> None:
        seen = self._deletions_of(name)
        try:
            self._record(name, self.api.get_slice(name), seen=seen)
        except Exception as e:
            log.warning("DRA: cannot re-read ResourceSlice %s: %s", name, _reason(e))


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _reason(e: BaseException) -> str:
    if isinstance(e, ApiError):
        return str(e)[:300]
    return f"{type(e).__name__}: {e}"


__all__ = ["DRIVER", "SlicePublisher"]
