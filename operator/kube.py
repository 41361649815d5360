"""The operator's API calls: the kubernetes client's transport (plain dicts), run in threads
so the event loop stays free.

Every write goes through here so it is counted (metric hostdev_operator_api_writes_total).
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import kubernetes

from hostdev.operator.metrics import API_WRITES

GROUP, VERSION = "hostdev.io", "v1alpha1"
KUBEVIRT_GROUP, KUBEVIRT_VERSION = "kubevirt.io", "v1"
MERGE_PATCH = "application/merge-patch+json"


class ConflictError(Exception):
    """HTTP 409: someone else changed the object since we read it."""


class NotFoundError(Exception):
    """HTTP 404 on a write: the object went away since we read it (e.g. deleted meanwhile)."""


def client_configuration() -> kubernetes.client.Configuration:
    """In-cluster service account, else $KUBECONFIG (what kopf.login_via_client uses too)."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=config)  # type: ignore[no-untyped-call]
    return config


def _path(group: str, version: str, plural: str, namespace: str | None, *rest: str) -> str:
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    ns = f"/namespaces/{quote(namespace, safe='')}" if namespace else ""
    return f"{base}{ns}/{plural}" + "".join(f"/{quote(r, safe='')}" for r in rest)


class Api:
    """Thin async facade over the kubernetes client's transport (``ApiClient``: configuration,
    auth, pooled connections), objects as plain dicts.

    The generated API classes are not used: each call validates its arguments through pydantic
    (a few ms of CPU per write, which a 2,000-NodeState policy edit pays 2,000 times) and
    ``CoreV1Api`` alone loads ~19 MiB of pydantic models for the two core calls made here.
    """

    def __init__(
        self, client: kubernetes.client.ApiClient | None = None, concurrency: int = 32
    ) -> None:
        if client is None:
            config = client_configuration()
            # One pooled connection per thread.
            config.connection_pool_maxsize = concurrency
            client = kubernetes.client.ApiClient(config)
        self.client = client
        # Own pool: asyncio's default has min(32, CPUs + 4) threads, which caps concurrent
        # API calls at 6 on a 2-CPU node while every call mostly waits on the network.
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="hostdev-api")

    def _request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        """One call, in a pool thread: the answer's JSON, ApiException on an error status."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = self.client.param_serialize(
            method=method,
            resource_path=path,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.client.call_api(*params)
        data = resp.read()  # type: ignore[no-untyped-call]
        if not 200 <= resp.status <= 299:
            raise kubernetes.client.ApiException.from_response(
                http_resp=resp, body=data.decode("utf-8", "replace"), data=None
            )
        return json.loads(data) if data else None

    async def _call(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self.pool, functools.partial(self._request, method, path, body, content_type)
            )
        except kubernetes.client.ApiException as e:
            if e.status == 409:
                raise ConflictError(str(e.reason)) from e
            if e.status == 404:
                raise NotFoundError(str(e.reason)) from e
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
        except kubernetes.client.ApiException as e:
            if e.status is not None and 400 <= e.status < 600:
                return f"HTTP {e.status}: {_message(e)}"
            raise
        return None

    async def patch_node(self, name: str, body: Mapping[str, Any]) -> None:
        await self.api.patch("", "v1", "nodes", name, body)


def _message(e: kubernetes.client.ApiException) -> str:
    """The Status message of an API error (what the server says is in the way)."""
    try:
        return str(json.loads(e.body or "{}").get("message") or e.reason)
    except ValueError:
        return str(e.reason)
