"""The operator's API calls: the kubernetes client, run in threads so the event loop stays free.

Every write goes through here so it is counted (metric hostdev_operator_api_writes_total).
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kubernetes

from hostdev.operator.metrics import API_WRITES

GROUP, VERSION = "hostdev.io", "v1alpha1"
KUBEVIRT_GROUP, KUBEVIRT_VERSION = "kubevirt.io", "v1"


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


class Api:
    """Thin async facade over ``kubernetes.client.CustomObjectsApi``."""

    def __init__(
        self, client: kubernetes.client.ApiClient | None = None, concurrency: int = 32
    ) -> None:
        if client is None:
            config = client_configuration()
            # One pooled connection per thread.
            config.connection_pool_maxsize = concurrency
            client = kubernetes.client.ApiClient(config)
        self.objects = kubernetes.client.CustomObjectsApi(client)
        # Own pool: asyncio's default has min(32, CPUs + 4) threads, which caps concurrent
        # API calls at 6 on a 2-CPU node while every call mostly waits on the network.
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="hostdev-api")

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))
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
            if namespace is None:
                obj = await self._call(
                    self.objects.get_cluster_custom_object, group, version, plural, name
                )
            else:
                obj = await self._call(
                    self.objects.get_namespaced_custom_object,
                    group,
                    version,
                    namespace,
                    plural,
                    name,
                )
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
        """JSON merge patch (the client's default content type for custom objects)."""
        API_WRITES.labels(plural + ("/status" if status else ""), "patch").inc()
        o = self.objects
        if namespace is None:
            cfn = o.patch_cluster_custom_object_status if status else o.patch_cluster_custom_object
            return dict(await self._call(cfn, group, version, plural, name, dict(body)))
        nfn = (
            o.patch_namespaced_custom_object_status if status else o.patch_namespaced_custom_object
        )
        return dict(await self._call(nfn, group, version, namespace, plural, name, dict(body)))

    async def create_cluster(
        self, group: str, version: str, plural: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        API_WRITES.labels(plural, "create").inc()
        return dict(
            await self._call(
                self.objects.create_cluster_custom_object, group, version, plural, dict(body)
            )
        )

    async def create_namespaced(
        self, group: str, version: str, plural: str, namespace: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        API_WRITES.labels(plural, "create").inc()
        return dict(
            await self._call(
                self.objects.create_namespaced_custom_object,
                group,
                version,
                namespace,
                plural,
                dict(body),
            )
        )

    async def delete(
        self, group: str, version: str, plural: str, name: str, namespace: str | None = None
    ) -> bool:
        """False when it was already gone."""
        API_WRITES.labels(plural, "delete").inc()
        try:
            if namespace is None:
                await self._call(
                    self.objects.delete_cluster_custom_object, group, version, plural, name
                )
            else:
                await self._call(
                    self.objects.delete_namespaced_custom_object,
                    group,
                    version,
                    namespace,
                    plural,
                    name,
                )
        except NotFoundError:
            return False
        return True


class Core:
    """The few core/v1 calls of day-2 reconfiguration: evict a pod, cordon a node. Counted
    like every other write."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.core = kubernetes.client.CoreV1Api(api.objects.api_client)

    async def evict(self, namespace: str, pod: str) -> str | None:
        """Evict through the Eviction API (policy/v1), so PodDisruptionBudgets and KubeVirt's
        eviction webhook decide; never a plain delete. None: accepted (or the pod is gone);
        else the API server's reason for refusing (HTTP 429 from a PDB, KubeVirt's denial)."""
        API_WRITES.labels("pods/eviction", "create").inc()
        body = kubernetes.client.V1Eviction(
            api_version="policy/v1",
            kind="Eviction",
            metadata=kubernetes.client.V1ObjectMeta(name=pod, namespace=namespace),
        )
        try:
            await self.api._call(self.core.create_namespaced_pod_eviction, pod, namespace, body)
        except NotFoundError:
            return None
        except kubernetes.client.ApiException as e:
            if e.status is not None and 400 <= e.status < 600:
                return f"HTTP {e.status}: {_message(e)}"
            raise
        return None

    async def patch_node(self, name: str, body: Mapping[str, Any]) -> None:
        API_WRITES.labels("nodes", "patch").inc()
        await self.api._call(self.core.patch_node, name, dict(body))


def _message(e: kubernetes.client.ApiException) -> str:
    """The Status message of an API error (what the server says is in the way)."""
    try:
        return str(json.loads(e.body or "{}").get("message") or e.reason)
    except ValueError:
        return str(e.reason)
