"""A Kubernetes watch as a plain iterator of events, shared by the agent's API clients (its
NodeState, its ResourceSlices): typed events, bookmarks passed on (their resourceVersion
counts), an expired resourceVersion (HTTP 410) as :class:`WatchExpiredError`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import watch
from kubernetes.client.exceptions import ApiException

GONE = 410
KINDS = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK")


class WatchExpiredError(Exception):
    """The resourceVersion we watched from is too old (HTTP 410): list again."""


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK (only its resourceVersion counts)
    obj: Mapping[str, Any]


def watch_events(
    list_fn: Callable[..., Any],
    *args: Any,
    resource_version: str,
    timeout_seconds: int,
    **kwargs: Any,
) -> Iterator[Event]:
    """Events after ``resource_version`` until the server ends the watch (the timeout)."""
    w = watch.Watch()  # type: ignore[no-untyped-call]
    try:
        for ev in w.stream(  # type: ignore[no-untyped-call]
            list_fn,
            *args,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_seconds,
            _request_timeout=timeout_seconds + 10,
            **kwargs,
        ):
            kind, obj = ev.get("type"), ev.get("object")
            if kind in KINDS and isinstance(obj, Mapping):
                yield Event(str(kind), obj)
    except ApiException as e:
        if e.status == GONE:
            raise WatchExpiredError(str(e.reason)) from e
        raise
    finally:
        w.stop()  # type: ignore[no-untyped-call]
