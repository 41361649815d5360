"""Where kopf keeps its bookkeeping on PassthroughRequests, chosen so that acting on a request
is one status write (the handler's status and kopf's diff base together), not also a write of
the request object itself."""

from __future__ import annotations

import logging
from typing import Any

from hostdev.operator.kopf_plain import kopf

log = logging.getLogger(__name__)

PREFIX = "hostdev.io"
DIFFBASE_FIELD = "status.lastHandledConfiguration"
# Where operators before the status field kept the diff base: read, never written, so
# requests they handled are not taken for new ones after an upgrade.
LEGACY_DIFFBASE_KEY = "last-handled-configuration"


class DiffBase(kopf.StatusDiffBaseStorage):
    """``status.lastHandledConfiguration`` (declared in the PassthroughRequest schema), falling
    back to the legacy annotation when reading."""

    def __init__(self) -> None:
        super().__init__(field=DIFFBASE_FIELD)
        self._legacy = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key=LEGACY_DIFFBASE_KEY)

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        # The progress annotations carry no marker (see Progress), so kopf would count them
        # as the request's own: keep every hostdev.io/ annotation out of the essence.
        essence = super().build(body=body, extra_fields=extra_fields)
        annotations = essence.get("metadata", {}).get("annotations", {})
        for key in [k for k in annotations if k.startswith(f"{PREFIX}/")]:
            del annotations[key]
        self.remove_empty_stanzas(essence)
        return essence

    def fetch(self, *, body: kopf.Body) -> Any:
        try:
            found = super().fetch(body=body)
            return found if found is not None else self._legacy.fetch(body=body)
        except ValueError:
            # Edited by hand into something that is not JSON: act on the request as new (the
            # handlers are idempotent) instead of failing on every event.
            meta = body.get("metadata", {})
            log.warning(
                "PassthroughRequest %s/%s: %s is not JSON; handling the request as new",
                meta.get("namespace"),
                meta.get("name"),
                DIFFBASE_FIELD,
            )
            return None


class Progress(kopf.AnnotationsProgressStorage):
    """Handler progress in ``hostdev.io/*`` annotations, without kopf's ``kopf-managed`` marker
    annotation. The marker (written on the first handled change) lets other kopf operators
    recognise these keys; it cost every request a write of its own, and progress is only ever
    stored when a handler is retried (otherwise it is stored and purged in the same patch)."""

    def __init__(self) -> None:
        super().__init__(prefix=PREFIX)

    def _store_marker(self, prefix: str, patch: Any, body: Any) -> None:
        return None
