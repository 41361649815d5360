"""This node's ``PassthroughNodeState`` through the API server: list, watch, patch status; and
the virt-launcher pods on this node (for the VMI names in the allocation report).

Thin on purpose: the loop decides, this module only talks HTTP through the ``kubernetes``
client. Objects are plain dicts (the CRD has no generated model).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from hostdev.deviceplugin.kubewatch import GONE, Event, WatchExpiredError, watch_events
from hostdev.policy.nodestatus import LAUNCHER_LABEL, vmi_of_pod

log = logging.getLogger(__name__)

GROUP = "hostdev.io"
VERSION = "v1alpha1"
PLURAL = "passthroughnodestates"
FIELD_MANAGER = "hostdev-node"

__all__ = ["Event", "LauncherPods", "NodeStateClient", "WatchExpiredError"]


class NodeStateClient:
    """One named ``PassthroughNodeState`` (cluster-scoped)."""

    def __init__(self, api_client: client.ApiClient, name: str) -> None:
        self.api = client.CustomObjectsApi(api_client)
        self.name = name

    def list(self) -> tuple[Mapping[str, Any] | None, str]:
        """The object (None when it does not exist yet) and the list's resourceVersion."""
        resp: Mapping[str, Any] = self.api.list_cluster_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, PLURAL, field_selector=f"metadata.name={self.name}"
        )
        items = resp.get("items") or []
        rv = str((resp.get("metadata") or {}).get("resourceVersion", ""))
        return (items[0] if items else None), rv

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[Event]:
        """Events after ``resource_version`` until the server ends the watch (the timeout)."""
        return watch_events(
            self.api.list_cluster_custom_object,
            GROUP,
            VERSION,
            PLURAL,
            field_selector=f"metadata.name={self.name}",
            resource_version=resource_version,
            timeout_seconds=timeout_seconds,
        )

    def patch_status(self, status: Mapping[str, Any]) -> Mapping[str, Any]:
        """JSON merge patch of the status subresource (keys not in ``status`` are kept)."""
        result: Mapping[str, Any] = self.api.patch_cluster_custom_object_status(  # type: ignore[assignment]
            GROUP,
            VERSION,
            PLURAL,
            self.name,
            {"status": dict(status)},
            field_manager=FIELD_MANAGER,
        )
        return result


class LauncherPods:
    """VMI names of the virt-launcher pods on this node. When RBAC says no, allocations are
    reported without VMI names and the pods read is tried again only every ``denied_retry``
    seconds (an admin may grant it later)."""

    def __init__(
        self, api_client: client.ApiClient, node_name: str, *, denied_retry: float = 300.0
    ) -> None:
        self.core = client.CoreV1Api(api_client)
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
            pods = self.core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={self.node_name}",
                label_selector=f"{LAUNCHER_LABEL[0]}={LAUNCHER_LABEL[1]}",
            )
        except ApiException as e:
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
        for pod in pods.items:
            if pod.metadata is None:
                continue
            meta = self.core.api_client.sanitize_for_serialization(pod.metadata)
            vmi = vmi_of_pod(meta)
            if vmi:
                out[(str(pod.metadata.namespace), str(pod.metadata.name))] = vmi
        return out


class LauncherPodWatch:
    """Watches the virt-launcher pods on this node and calls ``gone(namespace, pod)`` when one
    is deleted or has finished (its VM let go of its devices). Without RBAC for it (an older
    chart) it says so once and tries again every ``denied_retry`` seconds."""

    def __init__(
        self,
        api_client: client.ApiClient,
        node_name: str,
        *,
        timeout_seconds: int = 300,
        backoff: float = 5.0,
        denied_retry: float = 300.0,
    ) -> None:
        self.core = client.CoreV1Api(api_client)
        self.node_name = node_name
        self.timeout_seconds = timeout_seconds
        self.backoff = backoff
        self.denied_retry = denied_retry
        self._selectors: dict[str, Any] = {
            "field_selector": f"spec.nodeName={node_name}",
            "label_selector": f"{LAUNCHER_LABEL[0]}={LAUNCHER_LABEL[1]}",
        }

    def run(self, stop: threading.Event, gone: Callable[[str, str], None]) -> None:
        rv: str | None = None
        warned = False
        while not stop.is_set():
            try:
                if rv is None:
                    listed = self.core.list_pod_for_all_namespaces(limit=1, **self._selectors)
                    rv = str(listed.metadata.resource_version if listed.metadata else "")
                rv = self._watch(rv, stop, gone)
            except ApiException as e:
                if e.status == GONE:
                    rv = None
                    continue
                denied = e.status in (401, 403)
                if not (denied and warned):
                    log.warning(
                        "cannot watch pods on node %s (%s %s): a VM letting go of devices a "
                        "change waits for is noticed at the next allocation read instead",
                        self.node_name,
                        e.status,
                        e.reason,
                    )
                warned = warned or denied
                rv = None
                stop.wait(self.denied_retry if denied else self.backoff)
            except Exception as e:  # network errors: urllib3 raises many kinds
                if stop.is_set():
                    return
                log.warning("pod watch on node %s failed: %s", self.node_name, e)
                rv = None
                stop.wait(self.backoff)

    def _watch(self, rv: str, stop: threading.Event, gone: Callable[[str, str], None]) -> str:
        w = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for ev in w.stream(  # type: ignore[no-untyped-call]
                self.core.list_pod_for_all_namespaces,
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=self.timeout_seconds,
                _request_timeout=self.timeout_seconds + 10,
                **self._selectors,
            ):
                pod = ev.get("object")
                meta = getattr(pod, "metadata", None)
                if meta is None:
                    continue
                rv = str(meta.resource_version or rv)
                phase = getattr(getattr(pod, "status", None), "phase", None)
                if ev.get("type") == "DELETED" or (
                    ev.get("type") == "MODIFIED" and phase in ("Succeeded", "Failed")
                ):
                    gone(str(meta.namespace), str(meta.name))
                if stop.is_set():
                    break
        finally:
            w.stop()  # type: ignore[no-untyped-call]
        return rv
