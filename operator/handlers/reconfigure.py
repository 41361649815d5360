"""Indexes the day-2 evictions need (hostdev.operator.reconfigure): VMIs' eviction rules, the
cluster's default evictionStrategy, and which nodes are cordoned (and by whom)."""

from __future__ import annotations

from typing import Any

from hostdev.operator.kopf_plain import kopf
from hostdev.operator.kube import KUBEVIRT_GROUP, KUBEVIRT_VERSION
from hostdev.operator.reconfigure import CORDON_ANNOTATION, vmi_facts


@kopf.index(KUBEVIRT_GROUP, KUBEVIRT_VERSION, "virtualmachineinstances")
async def reconfigure_vmis_idx(
    *, name: str, namespace: str | None, body: kopf.Body, **_: Any
) -> dict[Any, Any]:
    return {(namespace, name): vmi_facts(body)}


@kopf.index(KUBEVIRT_GROUP, KUBEVIRT_VERSION, "kubevirts")
async def eviction_defaults_idx(*, spec: kopf.Spec, **_: Any) -> dict[Any, Any]:
    strategy = (spec.get("configuration") or {}).get("evictionStrategy")
    return {"default": strategy} if strategy else {}


@kopf.index("", "v1", "nodes")
async def cordon_idx(
    *, name: str, spec: kopf.Spec, annotations: kopf.Annotations, **_: Any
) -> dict[str, Any]:
    return {
        name: {
            "name": name,
            "unschedulable": bool(spec.get("unschedulable")),
            "cordonedFor": annotations.get(CORDON_ANNOTATION),
        }
    }
