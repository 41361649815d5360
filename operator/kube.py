"""The operator's API calls over the shared client (:mod:`hostdev.kube.client`: plain dicts,
a keep-alive connection per thread), run in threads so the event loop stays free.

Every write goes through here so it is counted (metric hostdev_operator_api_writes_total).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

from hostdev.kube.client import (
    ApiClient,
    ApiError,
    ConfigError,
    Credentials,
    from_kubeconfig,
    in_cluster,
)
from hostdev.operator.metrics import API_WRITES

GROUP, VERSION = "hostdev.io", "v1alpha1"
KUBEVIRT_GROUP, KUBEVIRT_VERSION = "kubevirt.io", "v1"
MERGE_PATCH = "application/merge-patch+json"
USER_AGENT = "hostdev-operator"


class ConflictError(Exception):
    """HTTP 409: someone else changed the object since we read it."""


class NotFoundError(Exception):
    """HTTP 404 on a write: the object went away since we read it (e.g. deleted meanwhile)."""


@functools.cache
def credentials() -> Credentials:
    """In-cluster service account, else $KUBECONFIG (``--kubeconfig`` sets it), else
    ~/.kube/config: for kopf's session, the own calls and the Lease alike. Read once per
    process (a token file is re-read by each user as it rotates)."""
    try:
        return in_cluster()
    except ConfigError as e:
        # Only the first file of a $KUBECONFIG list: merging kubeconfigs is not supported.
        paths = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
        path = paths[0] if paths else os.path.expanduser("~/.kube/config")
        if not os.path.exists(path):
            raise ConfigError(f"{e}; no kubeconfig at {path} either") from None
        return from_kubeconfig(path)


def _path(group: str, version: str, plural: str, namespace: str | None, *rest: str) -> str:
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    ns = f"/namespaces/{quote(namespace, safe='')}" if namespace else ""
    return f"{base}{ns}/{plural}" + "".join(f"/{quote(r, safe='')}" for r in rest)


class Api:
    """Thin async facade over the shared client, objects as plain dicts."""

    def __init__(self, client: ApiClient | None = None, concurrency: int = 32) -> None:
        # One keep-alive connection per pool thread.
        self.client = client or ApiClient(credentials(), user_agent=USER_AGENT)
        # Own pool: asyncio's default has min(32, CPUs + 4) threads, which caps concurrent
        # API calls at 6 on a 2-CPU node while every call mostly waits on the network.
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="hostdev-api")

    async def _call(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        """One call in a pool thread: the answer's JSON. ConflictError (409), NotFoundError
        (404), else ApiError (status 0: the API server was not reached)."""
        loop = asyncio.get_running_loop()
        call = functools.partial(
            self.client.request, method, path, body=body, content_type=content_type
        )
        try:
            return await loop.run_in_executor(self.pool, call)
        except ApiError as e:
            if e.status == 409:
                raise ConflictError(e.message) from e
            if e.status == 404:
                raise NotFoundError(e.message) from e
            raise

    async def get(
        self, group: str, version: str, plural: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        try:
            obj = await self._call("GET", _path(group, version, plural, namespace, name))
        except NotFoundError:
            return None
        return dict(obj)

    async def patch(  # noqa: PLR0917  (mirrors the client's positional API)
        self,
        group: str,
        version: str,
        plural: str,
        name: str,
        body: Mapping[str, Any],
        namespace: str | None = None,
        *,
        status: bool = False,
    ) -> dict[str, Any]:
        """JSON merge patch (what the client sends for custom objects, and for the node)."""
        API_WRITES.labels(plural + ("/status" if status else ""), "patch").inc()
        rest = (name, "status") if status else (name,)
        path = _path(group, version, plural, namespace, *rest)
        return dict(await self._call("PATCH", path, dict(body), MERGE_PATCH))

    async def create_cluster(
        self, group: str, version: str, plural: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        API_WRITES.labels(plural, "create").inc()
        return dict(await self._call("POST", _path(group, version, plural, None), dict(body)))

    async def create_namespaced(
        self, group: str, version: str, plural: str, namespace: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        API_WRITES.labels(plural, "create").inc()
        path = _path(group, version, plural, namespace)
        return dict(await self._call("POST", path, dict(body)))

    async def delete(
        self, group: str, version: str, plural: str, name: str, namespace: str | None = None
    ) -> bool:
        """False when it was already gone."""
        API_WRITES.labels(plural, "delete").inc()
        try:
            await self._call("DELETE", _path(group, version, plural, namespace, name))
        except NotFoundError:
            return False
        return True


class Core:
    """The few core/v1 calls of day-2 reconfiguration: evict a pod, cordon a node. Counted
    like every other write."""

    def __init__(self, api: Api) -> None:
        self.api = api

    async def evict(self, namespace: str, pod: str) -> str | None:
        """Evict through the Eviction API (policy/v1), so PodDisruptionBudgets and KubeVirt's
        eviction webhook decide; never a plain delete. None: accepted (or the pod is gone);
        else the API server's reason for refusing (HTTP 429 from a PDB, KubeVirt's denial)."""
        API_WRITES.labels("pods/eviction", "create").inc()
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod, "namespace": namespace},
        }
        try:
            await self.api._call("POST", _path("", "v1", "pods", namespace, pod, "eviction"), body)
        except NotFoundError:
            return None
        except ApiError as e:
            if 400 <= e.status < 600:
                return f"HTTP {e.status}: {_message(e)}"
            raise
        return None

    async def patch_node(self, name: str, body: Mapping[str, Any]) -> None:
        await self.api.patch("", "v1", "nodes", name, body)


def _message(e: ApiError) -> str:
    """The Status message of an API error (what the server says is in the way)."""
    try:
        doc = json.loads(e.body or "{}")
    except ValueError:
        return e.reason
    return str((doc.get("message") if isinstance(doc, dict) else None) or e.reason)
