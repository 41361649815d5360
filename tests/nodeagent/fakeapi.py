"""An in-memory stand-in for NodeStateClient: one object, test-fed watch events."""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from hostdev.deviceplugin.nodestate.kube import Event, WatchExpiredError


class FakeApi:
    """One NodeState in memory; watch events are whatever the test puts in ``events``."""

    name = "node-1"

    def __init__(self) -> None:
        self.obj: dict[str, Any] | None = None
        self.events: queue.Queue[Event] = queue.Queue()
        self.lists = 0
        self.expire_next_watch = False
        self.patches: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def put(self, spec: Mapping[str, Any], *, generation: int, uid: str = "u1") -> None:
        with self.lock:
            status = (self.obj or {}).get("status") if self.obj and self.uid == uid else None
            self.obj = {
                "metadata": {
                    "name": self.name,
                    "uid": uid,
                    "generation": generation,
                    "resourceVersion": str(generation),
                },
                "spec": dict(spec),
            }
            if status:
                self.obj["status"] = status
            self.events.put(Event("MODIFIED", copy.deepcopy(self.obj)))

    @property
    def uid(self) -> str | None:
        return None if self.obj is None else self.obj["metadata"]["uid"]

    def delete(self) -> None:
        with self.lock:
            assert self.obj is not None
            self.events.put(Event("DELETED", copy.deepcopy(self.obj)))
            self.obj = None

    # ---- the NodeStateClient surface ------------------------------------------------------
    def list(self) -> tuple[Mapping[str, Any] | None, str]:
        with self.lock:
            self.lists += 1
            return copy.deepcopy(self.obj), "1"

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[Event]:
        if self.expire_next_watch:
            self.expire_next_watch = False
            raise WatchExpiredError("too old resource version")
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            try:
                yield self.events.get(timeout=0.05)
            except queue.Empty:
                continue

    def patch_status(self, status: Mapping[str, Any]) -> Mapping[str, Any]:
        with self.lock:
            self.patches.append(copy.deepcopy(dict(status)))
            if self.obj is not None:
                self.obj["status"] = {**(self.obj.get("status") or {}), **status}
            return copy.deepcopy(self.obj or {})

    def status(self) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy((self.obj or {}).get("status") or {})
