"""DeviceClasses of DRA policies: one per policy with ``allocation: DRA``, named after it,
selecting the policy's resource among the devices of driver ``pci.hostdev.io``.

Owned by the operator (label ``app.kubernetes.io/managed-by: hostdev-operator`` and an
ownerReference to the policy): created, kept equal to what the policy says, and deleted when
the policy goes or stops being DRA. A DeviceClass of the same name that someone else made is
never touched; the policy's DeviceClassReady condition says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hostdev.operator.kube import Api, ConflictError, NotFoundError
from hostdev.policy.conditions import Condition
from hostdev.policy.dra import device_class
from hostdev.policy.nodestate import Policy
from hostdev.policy.request import Request, VmDevice
from hostdev.policy.request_dra import claim_template, owned_by, template_name

log = logging.getLogger("hostdev.operator.dra")

GROUP, VERSION, PLURAL = "resource.k8s.io", "v1", "deviceclasses"
MANAGED_BY = {"app.kubernetes.io/managed-by": "hostdev-operator"}
CONDITION = "DeviceClassReady"


def _managed(obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in MANAGED_BY.items())


def _ready(name: str, resource: str) -> Condition:
    return Condition(
        CONDITION,
        "True",
        "DeviceClassSynced",
        f"DeviceClass {name} selects the pci.hostdev.io devices of {resource}: claim them "
        f"with deviceClassName: {name}",
    )


async def reconcile_device_classes(
    api: Api, policies: Iterable[Policy], managed: Mapping[str, Mapping[str, Any]]
) -> dict[str, Condition]:
    """Make the managed DeviceClasses (``managed``: name -> object, from the index) match the
    DRA policies; the DeviceClassReady condition of each DRA policy."""
    conditions: dict[str, Condition] = {}
    wanted = {p.name: p for p in policies if p.dra}
    for name, p in sorted(wanted.items()):
        body = device_class(name, p.resource_name, labels=MANAGED_BY, owner_uid=p.uid or None)
        have = managed.get(name)
        if have is None:
            try:
                await api.create_cluster(GROUP, VERSION, PLURAL, body)
                log.info("DeviceClass %s created for policy %s", name, name)
            except ConflictError:
                have = await api.get(GROUP, VERSION, PLURAL, name)
                if have is None or not _managed(have):
                    conditions[name] = Condition(
                        CONDITION,
                        "False",
                        "DeviceClassNotOurs",
                        f"a DeviceClass named {name} exists and is not managed by hostdev: "
                        "delete it or rename the policy",
                    )
                    continue
        if (
            have is not None
            and (have.get("spec") or {}).get("selectors") != body["spec"]["selectors"]
        ):
            try:
                await api.patch(GROUP, VERSION, PLURAL, name, {"spec": body["spec"]})
                log.info("DeviceClass %s updated (resource %s)", name, p.resource_name)
            except NotFoundError:
                await api.create_cluster(GROUP, VERSION, PLURAL, body)
        conditions[name] = _ready(name, p.resource_name)
    for name in sorted(set(managed) - set(wanted)):
        if await api.delete(GROUP, VERSION, PLURAL, name):
            log.info("DeviceClass %s deleted: no DRA policy %s any more", name, name)
    return conditions


def not_dra_condition() -> Condition:
    """For a policy that was DRA and is not any more (its class is gone)."""
    return Condition(
        CONDITION,
        "False",
        "DevicePluginAllocation",
        "allocation is DevicePlugin: the policy has no DeviceClass",
    )


TEMPLATES = "resourceclaimtemplates"


async def sync_claim_template(
    api: Api, req: Request, uid: str | None, devices: Sequence[VmDevice]
) -> str | None:
    """Make the request's ResourceClaimTemplate match its DRA entries (none: no template).
    Returns why the request cannot have it (a template of that name that is not its own)."""
    name = template_name(req.name)
    have = await api.get(GROUP, VERSION, TEMPLATES, name, req.namespace)
    wanted = any(d.dra for d in devices)
    if have is not None and not owned_by(have, req.name, uid):
        if not wanted:
            return None
        return (
            f"a ResourceClaimTemplate {req.namespace}/{name} exists that this request does not "
            "own: delete it or rename the request"
        )
    if not wanted:
        if have is not None and await api.delete(GROUP, VERSION, TEMPLATES, name, req.namespace):
            log.info("ResourceClaimTemplate %s/%s deleted (no DRA entries)", req.namespace, name)
        return None
    body = claim_template(req.namespace, req.name, uid, devices, MANAGED_BY)
    if have is not None and have.get("spec") == body["spec"]:
        return None
    if have is not None:
        # The spec of a template is immutable: replace it. Running VMs keep their claims.
        await api.delete(GROUP, VERSION, TEMPLATES, name, req.namespace)
    # A 409 (deleted but not gone yet, or created meanwhile) fails this pass: kopf retries.
    await api.create_namespaced(GROUP, VERSION, TEMPLATES, req.namespace, body)
    log.info(
        "ResourceClaimTemplate %s/%s %s for PassthroughRequest %s",
        req.namespace,
        name,
        "replaced" if have is not None else "created",
        req.name,
    )
    return None


async def delete_claim_template(api: Api, namespace: str, request: str, uid: str | None) -> None:
    name = template_name(request)
    have = await api.get(GROUP, VERSION, TEMPLATES, name, namespace)
    if have is not None and owned_by(have, request, uid):
        await api.delete(GROUP, VERSION, TEMPLATES, name, namespace)
        log.info("ResourceClaimTemplate %s/%s deleted with its request", namespace, name)
