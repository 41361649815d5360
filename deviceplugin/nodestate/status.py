"""Batched, change-only status writes.

``submit`` hands over the newest full status; a background thread sends it once it has been
pending for ``coalesce`` seconds (so a burst of submissions costs one write), and only when it
differs from what was last written (timestamps aside). A write is a merge patch of the
top-level keys that changed, not the whole status. A failed write is retried with the then
newest status.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from hostdev.kube.client import ApiError
from hostdev.policy.nodestatus import status_changed, status_patch

log = logging.getLogger(__name__)

NOT_FOUND = 404


class StatusWriter:
    def __init__(
        self,
        patch: Callable[[Mapping[str, Any]], object],
        *,
        name: str,
        coalesce: float = 1.0,
        retry: float = 5.0,
    ) -> None:
        self._patch = patch
        self.name = name
        self.coalesce = coalesce
        self.retry = retry
        self._cv = threading.Condition()
        self._written: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None
        self._due = 0.0
        self._inflight: dict[str, Any] | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.writes = 0  # successful PATCH calls (for logs and the benchmark)
        self.sent_bytes = 0  # JSON bytes of their bodies (the benchmark)

    # ---- state ------------------------------------------------------------------------------
    @property
    def written(self) -> dict[str, Any] | None:
        with self._cv:
            return None if self._written is None else dict(self._written)

    def reset(self, written: Mapping[str, Any] | None) -> None:
        """What the object's status is now (first sight, or the object was re-created)."""
        with self._cv:
            self._written = dict(written) if written else {}
            self._pending = None

    def _baseline(self) -> dict[str, Any] | None:
        if self._inflight is None:
            return self._written
        return {**(self._written or {}), **self._inflight}

    def submit(self, status: Mapping[str, Any]) -> None:
        with self._cv:
            if not status_changed(self._baseline(), status):
                self._pending = None  # e.g. InProgress then back to what is written: no write
                return
            if self._pending is None:
                self._due = time.monotonic() + self.coalesce
            self._pending = dict(status)
            self._cv.notify_all()

    @property
    def idle(self) -> bool:
        with self._cv:
            return self._pending is None and self._inflight is None

    # ---- the writer thread ------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"status-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, *, flush: bool = True, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            if flush and self._pending is not None:
                self._due = 0.0
            elif not flush:
                self._pending = None
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._pending is not None:
                        wait = self._due - time.monotonic()
                        if wait <= 0:
                            break
                        self._cv.wait(wait)
                    elif self._stopping:
                        return
                    else:
                        self._cv.wait()
                body, self._pending, self._inflight = self._pending, None, self._pending
                patch = status_patch(self._written, body)
            ok = self._write(patch)
            with self._cv:
                self._inflight = None
                if ok:
                    self._written = {**(self._written or {}), **body}
                    self.sent_bytes += len(json.dumps(patch, separators=(",", ":")))
                elif self._pending is None and not self._stopping:
                    # Retry later with this body unless a newer one arrives meanwhile.
                    self._pending = body
                    self._due = time.monotonic() + self.retry

    def _write(self, body: dict[str, Any]) -> bool:
        if not body:
            return True  # nothing differs after all
        try:
            self._patch(body)
        except ApiError as e:
            if e.status == NOT_FOUND:
                log.warning("NodeState %s is gone: status not written", self.name)
                return True  # nothing to retry until the object comes back (reset)
            log.warning("NodeState %s: status write failed (%s)", self.name, e)
            return False
        except Exception as e:  # whatever the injected patch call raised: retried later
            log.warning("NodeState %s: status write failed: %s", self.name, e)
            return False
        self.writes += 1
        log.info(
            "NodeState %s: status written (%s; syncStatus %s, generation %s)",
            self.name,
            ", ".join(sorted(body)),
            body.get("syncStatus", "unchanged"),
            body.get("observedGeneration", "unchanged"),
        )
        return True
