"""The DRA front end's API calls (``resource.k8s.io/v1``): this node's ResourceSlices of driver
``pci.hostdev.io`` and the ResourceClaims the kubelet asks to prepare. Thin on purpose: plain
dicts over :mod:`hostdev.kube.client`; callers decide."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from hostdev.deviceplugin.kubewatch import Event, WatchExpiredError, watch_events
from hostdev.deviceplugin.metrics import Metrics
from hostdev.kube.client import ApiClient, ApiError
from hostdev.policy.dra import API_VERSION, DRIVER

log = logging.getLogger(__name__)

GROUP, VERSION = API_VERSION.split("/")
SLICES = "resourceslices"
CLAIMS = "resourceclaims"
MANAGED_BY = {"app.kubernetes.io/managed-by": "hostdev-node"}
SLICES_PATH = f"/apis/{GROUP}/{VERSION}/{SLICES}"

__all__ = ["MANAGED_BY", "DraApi", "Event", "WatchExpiredError"]


@dataclass
class WriteCounts:
    create: int = 0
    update: int = 0
    delete: int = 0

    @property
    def total(self) -> int:
        return self.create + self.update + self.delete


class DraApi:
    """This node's view of the DRA API. Thread-safe counters of the writes it made."""

    def __init__(self, api: ApiClient, node: str, metrics: Metrics | None = None) -> None:
        self.api = api
        self.node = node
        self.metrics = metrics
        self.writes = WriteCounts()
        self._lock = threading.Lock()

    def _wrote(self, verb: str) -> None:
        with self._lock:
            setattr(self.writes, verb, getattr(self.writes, verb) + 1)
        if self.metrics is not None:
            self.metrics.dra_slice_writes.labels(verb).inc()

    @property
    def selector(self) -> str:
        return f"spec.nodeName={self.node},spec.driver={DRIVER}"

    # ---- claims -------------------------------------------------------------------------
    def get_claim(self, namespace: str, name: str) -> Mapping[str, Any]:
        obj: Mapping[str, Any] = self.api.get(
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{CLAIMS}/{name}"
        )
        return obj

    # ---- slices -------------------------------------------------------------------------
    def list_slices(self) -> tuple[list[Mapping[str, Any]], str]:
        resp = self.api.get(SLICES_PATH, fieldSelector=self.selector)
        rv = str((resp.get("metadata") or {}).get("resourceVersion", ""))
        return list(resp.get("items") or []), rv

    def watch_slices(self, resource_version: str, timeout_seconds: int) -> Iterator[Event]:
        return watch_events(
            self.api,
            SLICES_PATH,
            fieldSelector=self.selector,
            resource_version=resource_version,
            timeout_seconds=timeout_seconds,
        )

    def get_slice(self, name: str) -> Mapping[str, Any] | None:
        try:
            obj: Mapping[str, Any] = self.api.get(f"{SLICES_PATH}/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return obj

    def create_slice(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        obj: Mapping[str, Any] = self.api.request("POST", SLICES_PATH, body=dict(body))
        self._wrote("create")
        return obj

    def replace_slice(self, name: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """PUT with the body's resourceVersion: a concurrent change is a 409, not overwritten."""
        obj: Mapping[str, Any] = self.api.request("PUT", f"{SLICES_PATH}/{name}", body=dict(body))
        self._wrote("update")
        return obj

    def delete_slice(self, name: str, uid: str | None, resource_version: str | None) -> bool:
        """False when it was gone already."""
        pre = {k: v for k, v in (("uid", uid), ("resourceVersion", resource_version)) if v}
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": pre}
        try:
            self.api.request("DELETE", f"{SLICES_PATH}/{name}", body=body)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        self._wrote("delete")
        return True

    # ---- node ---------------------------------------------------------------------------
    def node_uid(self) -> str | None:
        """The Node's UID (slices are owned by it, so they go with a deleted node); None when
        the agent may not read its Node."""
        try:
            node = self.api.get(f"/api/v1/nodes/{self.node}")
        except ApiError as e:
            if e.status in (401, 403, 404):
                log.warning(
                    "cannot read Node %s (%s): ResourceSlices are created without an owner",
                    self.node,
                    e.message,
                )
                return None
            raise
        uid = (node.get("metadata") or {}).get("uid")
        return None if uid is None else str(uid)
