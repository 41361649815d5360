"""Indexes and watches feeding the cluster reconciler (policies, nodes, node states, KubeVirt)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hostdev.operator.cluster import ATTRIBUTION_ANNOTATION, MANAGED_BY, RETRY_S, Cluster
from hostdev.operator.kopf_plain import kopf
from hostdev.operator.kube import GROUP, KUBEVIRT_GROUP, KUBEVIRT_VERSION, VERSION


def _meta(body: Mapping[str, Any]) -> dict[str, Any]:
    m = body.get("metadata") or {}
    keep = ("name", "namespace", "uid", "generation", "creationTimestamp", "resourceVersion")
    return {k: m[k] for k in keep if k in m}


@kopf.index(GROUP, VERSION, "passthroughpolicies")
async def policies_idx(*, name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {
        name: {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "metadata": _meta(body),
            "spec": dict(body.get("spec") or {}),
            "status": dict(body.get("status") or {}),
        }
    }


@kopf.index("", "v1", "nodes")
async def nodes_idx(*, name: str, labels: kopf.Labels, **_: Any) -> dict[str, Any]:
    return {name: {"name": name, "labels": dict(labels)}}


@kopf.index(GROUP, VERSION, "passthroughnodestates")
async def nodestates_idx(
    *, name: str, body: kopf.Body, labels: kopf.Labels, annotations: kopf.Annotations, **_: Any
) -> dict[str, Any]:
    return {
        name: {
            "name": name,
            "spec": dict(body.get("spec") or {}),
            "status": dict(body.get("status") or {}),
            "attribution": annotations.get(ATTRIBUTION_ANNOTATION),
            "managed": all(labels.get(k) == v for k, v in MANAGED_BY.items()),
        }
    }


@kopf.index("resource.k8s.io", "v1", "deviceclasses", labels=MANAGED_BY)
async def deviceclasses_idx(
    *, name: str, body: kopf.Body, labels: kopf.Labels, **_: Any
) -> dict[str, Any]:
    """The DeviceClasses this operator made (DRA policies)."""
    return {
        name: {
            "metadata": {
                "name": name,
                "labels": dict(body.get("metadata", {}).get("labels") or {}),
            },
            "spec": dict(body.get("spec") or {}),
        }
    }


@kopf.on.event("resource.k8s.io", "v1", "deviceclasses", labels=MANAGED_BY)
async def deviceclass_changed(*, memo: Any, **_: Any) -> None:
    _cluster(memo).mark()  # e.g. deleted by someone: make it again


@kopf.index(KUBEVIRT_GROUP, KUBEVIRT_VERSION, "kubevirts")
async def kubevirts_idx(*, name: str, namespace: str | None, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): {"metadata": {"name": name, "namespace": namespace}}}


def _cluster(memo: Any) -> Cluster:
    cluster: Cluster = memo["cluster"]
    return cluster


@kopf.on.event(GROUP, VERSION, "passthroughpolicies")
async def policy_changed(*, memo: Any, **_: Any) -> None:
    _cluster(memo).mark()


@kopf.on.event(GROUP, VERSION, "passthroughnodestates")
async def nodestate_changed(*, memo: Any, **_: Any) -> None:
    _cluster(memo).mark()


@kopf.on.event(KUBEVIRT_GROUP, KUBEVIRT_VERSION, "kubevirts")
async def kubevirt_changed(*, memo: Any, **_: Any) -> None:
    _cluster(memo).mark()


@kopf.on.event("", "v1", "nodes")
async def node_changed(
    *, memo: Any, name: str, labels: kopf.Labels, type: str | None, **_: Any
) -> None:
    # Nodes change status every few seconds: only label changes (and add/remove) matter here.
    seen: dict[str, dict[str, str]] = memo["node_labels"]  # shared: made at startup
    if type == "DELETED":
        seen.pop(name, None)
    elif seen.get(name) == dict(labels):
        return
    else:
        seen[name] = dict(labels)
    _cluster(memo).mark()


@kopf.timer(GROUP, VERSION, "passthroughpolicies", interval=RETRY_S, initial_delay=RETRY_S)
async def retry_cluster(*, memo: Any, **_: Any) -> None:
    """Repeat a cluster pass that asked for it (no KubeVirt CR yet, transient API error)."""
    cluster = _cluster(memo)
    if cluster.retry_needed:
        cluster.mark()
