"""This node's ``PassthroughNodeState`` through the API server: list, watch, patch status; and
the virt-launcher pods on this node (for the VMI names in the allocation report).

Thin on purpose: the loop decides, this module only talks HTTP (:mod:`hostdev.kube.client`).
Objects are plain dicts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from hostdev.deviceplugin.kubewatch import Event, WatchExpiredError, watch_events
from hostdev.kube.client import MERGE_PATCH, ApiClient, ApiError
from hostdev.policy.launcher import LAUNCHER_LABEL, vmi_of_pod

log = logging.getLogger(__name__)

GROUP = "hostdev.io"
VERSION = "v1alpha1"
PLURAL = "passthroughnodestates"
FIELD_MANAGER = "hostdev-node"
PATH = f"/apis/{GROUP}/{VERSION}/{PLURAL}"

__all__ = ["Event", "LauncherPods", "NodeStateClient", "WatchExpiredError"]


class NodeStateClient:
    """One named ``PassthroughNodeState`` (cluster-scoped)."""

    def __init__(self, api: ApiClient, name: str) -> None:
        self.api = api
        self.name = name

    def get(self) -> Mapping[str, Any] | None:
        """The object (None when it does not exist yet)."""
        try:
            obj: Mapping[str, Any] = self.api.get(f"{PATH}/{self.name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return obj

    def list(self) -> tuple[Mapping[str, Any] | None, str]:
        """The object (None when it does not exist yet) and the list's resourceVersion."""
        resp = self.api.get(PATH, fieldSelector=f"metadata.name={self.name}")
        items = resp.get("items") or []
        rv = str((resp.get("metadata") or {}).get("resourceVersion", ""))
        return (items[0] if items else None), rv

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[Event]:
        """Events after ``resource_version`` until the server ends the watch (the timeout)."""
        return watch_events(
            self.api,
            PATH,
            fieldSelector=f"metadata.name={self.name}",
            resource_version=resource_version,
            timeout_seconds=timeout_seconds,
        )

    def patch_status(self, status: Mapping[str, Any]) -> Mapping[str, Any]:
        """JSON merge patch of the status subresource (keys not in ``status`` are kept)."""
        result: Mapping[str, Any] = self.api.request(
            "PATCH",
            f"{PATH}/{self.name}/status",
            query={"fieldManager": FIELD_MANAGER},
            body={"status": dict(status)},
            content_type=MERGE_PATCH,
        )
        return result


class LauncherPods:
    """VMI names of the virt-launcher pods on this node. When RBAC says no, allocations are
    reported without VMI names and the pods read is tried again only every ``denied_retry``
    seconds (an admin may grant it later)."""

    def __init__(self, api: ApiClient, node_name: str, *, denied_retry: float = 300.0) -> None:
        self.api = api
        self.node_name = node_name
        self.denied_retry = denied_retry
        self._denied_until: float | None = None

    @property
    def allowed(self) -> bool:
        return self._denied_until is None

    def vmis(self) -> dict[tuple[str, str], str]:
        if self._denied_until is not None and time.monotonic() < self._denied_until:
            return {}
        try:
            pods = self.api.get(
                "/api/v1/pods",
                fieldSelector=f"spec.nodeName={self.node_name}",
                labelSelector=f"{LAUNCHER_LABEL[0]}={LAUNCHER_LABEL[1]}",
            )
        except ApiError as e:
            if e.status in (401, 403):
                if self._denied_until is None:
                    log.warning(
                        "cannot list pods on node %s (%s): allocations are reported without "
                        "VMI names; grant the agent 'list pods' to get them",
                        self.node_name,
                        e.reason,
                    )
                self._denied_until = time.monotonic() + self.denied_retry
                return {}
            raise
        if self._denied_until is not None:
            log.info("listing pods on node %s is allowed now: VMI names are back", self.node_name)
            self._denied_until = None
        out: dict[tuple[str, str], str] = {}
        for pod in pods.get("items") or ():
            meta = pod.get("metadata") or {}
            vmi = vmi_of_pod(meta)
            if vmi:
                out[(str(meta.get("namespace")), str(meta.get("name")))] = vmi
        return out


class LauncherPodWatch:
    """Watches the virt-launcher pods on this node and calls ``gone(namespace, pod)`` when one
    is deleted or has finished (its VM let go of its devices). Without RBAC for it (an older
    chart) it says so once and tries again every ``denied_retry`` seconds."""

    def __init__(
        self,
        api: ApiClient,
        node_name: str,
        *,
        timeout_seconds: int = 300,
        backoff: float = 5.0,
        denied_retry: float = 300.0,
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.timeout_seconds = timeout_seconds
        self.backoff = backoff
        self.denied_retry = denied_retry
        self._selectors: dict[str, object] = {
            "fieldSelector": f"spec.nodeName={node_name}",
            "labelSelector": f"{LAUNCHER_LABEL[0]}={LAUNCHER_LABEL[1]}",
        }

    def run(self, stop: threading.Event, gone: Callable[[str, str], None]) -> None:
        rv: str | None = None
        warned = False
        while not stop.is_set():
            try:
                if rv is None:
                    listed = self.api.request(
                        "GET", "/api/v1/pods", query={**self._selectors, "limit": 1}
                    )
                    rv = str((listed.get("metadata") or {}).get("resourceVersion") or "")
                rv = self._watch(rv, stop, gone)
            except WatchExpiredError:
                rv = None
            except ApiError as e:
                if stop.is_set():
                    return
                denied = e.status in (401, 403)
                if not (denied and warned):
                    log.warning(
                        "cannot watch pods on node %s (%s): a VM letting go of devices a "
                        "change waits for is noticed at the next allocation read instead",
                        self.node_name,
                        e,
                    )
                warned = warned or denied
                rv = None
                stop.wait(self.denied_retry if denied else self.backoff)

    def _watch(self, rv: str, stop: threading.Event, gone: Callable[[str, str], None]) -> str:
        for ev in watch_events(
            self.api,
            "/api/v1/pods",
            resource_version=rv,
            timeout_seconds=self.timeout_seconds,
            **self._selectors,
        ):
            meta = ev.obj.get("metadata") or {}
            rv = str(meta.get("resourceVersion") or rv)
            phase = (ev.obj.get("status") or {}).get("phase")
            if ev.type == "DELETED" or (ev.type == "MODIFIED" and phase in ("Succeeded", "Failed")):
                gone(str(meta.get("namespace")), str(meta.get("name")))
            if stop.is_set():
                break
        return rv
