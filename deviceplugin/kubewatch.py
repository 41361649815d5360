"""A Kubernetes watch as a plain iterator of events, shared by the agent's API clients (its
NodeState, its ResourceSlices): typed events, bookmarks passed on (their resourceVersion
counts), an expired resourceVersion (HTTP 410) as :class:`WatchExpiredError`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from hostdev.kube.client import ApiClient, ApiError

GONE = 410
KINDS = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK")


class WatchExpiredError(Exception):
    """The resourceVersion we watched from is too old (HTTP 410): list again."""


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK (only its resourceVersion counts)
    obj: Mapping[str, Any]


def watch_events(
    api: ApiClient,
    path: str,
    *,
    resource_version: str,
    timeout_seconds: int,
    **query: object,
) -> Iterator[Event]:
    """Events after ``resource_version`` until the server ends the watch (the timeout)."""
    q = {**query, "resourceVersion": resource_version, "allowWatchBookmarks": True}
    try:
        for ev in api.watch(path, q, timeout_seconds):
            kind, obj = ev.get("type"), ev.get("object")
            if kind in KINDS and isinstance(obj, Mapping):
                yield Event(str(kind), obj)
    except ApiError as e:
        if e.status == GONE:
            raise WatchExpiredError(e.message) from e
        raise
