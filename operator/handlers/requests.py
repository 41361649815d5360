"""PassthroughRequest handlers: capacity check, VM spec patch (finalizer-protected), status."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

from hostdev.operator import metrics
from hostdev.operator.cluster import Cluster, now, values
from hostdev.operator.dra import delete_claim_template, sync_claim_template
from hostdev.operator.kopf_plain import kopf
from hostdev.operator.kube import (
    GROUP,
    KUBEVIRT_GROUP,
    KUBEVIRT_VERSION,
    VERSION,
    Api,
    ConflictError,
    NotFoundError,
)
from hostdev.operator.refresher import Refresher, waiting_for_capacity
from hostdev.policy.conditions import Condition, merge_conditions, same_conditions
from hostdev.policy.request import (
    OWNERS_ANNOTATION,
    Request,
    RequestError,
    RequestStatus,
    VmChange,
    apply_to_vm,
    check_request,
    needs_restart,
    remove_from_vm,
    running_status,
)

PLURAL = "passthroughrequests"
CONFLICT_RETRIES = 8
RETRY_REFUSED_S = 60.0  # a VM that conflicts with the request (someone else's entries)
RETRY_PENDING_S = 10.0  # the VM does not exist yet
RETRY_MAX_S = 600.0

log = logging.getLogger("hostdev.operator.requests")


@kopf.index(KUBEVIRT_GROUP, KUBEVIRT_VERSION, "virtualmachineinstances")
async def vmis_idx(
    *, name: str, namespace: str | None, body: kopf.Body, **_: Any
) -> dict[Any, Any]:
    devices = ((body.get("spec") or {}).get("domain") or {}).get("devices") or {}
    return {
        (namespace, name): {
            "metadata": {"uid": body.get("metadata", {}).get("uid")},
            "spec": {
                "domain": {
                    "devices": {
                        f: [{"name": e.get("name")} for e in devices.get(f) or ()]
                        for f in ("hostDevices", "gpus")
                    }
                }
            },
            "status": {"phase": (body.get("status") or {}).get("phase")},
        }
    }


@kopf.index(KUBEVIRT_GROUP, KUBEVIRT_VERSION, "virtualmachines")
async def vms_idx(
    *, name: str, namespace: str | None, annotations: kopf.Annotations, **_: Any
) -> dict[Any, Any]:
    """Per VM only the requests its ownership annotation lists (small even for big VMs)."""
    try:
        owners = json.loads(annotations.get(OWNERS_ANNOTATION) or "{}")
    except ValueError:
        owners = {}
    return {(namespace, name): tuple(sorted(owners)) if isinstance(owners, dict) else ()}


def _owners(vms_idx: kopf.Index[Any, Any], namespace: str, name: str) -> tuple[str, ...] | None:
    """The requests the VM lists (vms_idx), None when there is no such VM."""
    return next(iter(vms_idx.get((namespace, name), ())), None)


def _vmi(vmis_idx: kopf.Index[Any, Any], namespace: str, name: str) -> dict[str, Any] | None:
    for v in vmis_idx.get((namespace, name), ()):
        return dict(v)
    return None


def _locks(memo: Any) -> dict[tuple[str, str], asyncio.Lock]:
    locks: dict[tuple[str, str], asyncio.Lock] = memo["vm_locks"]  # shared: made at startup
    return locks


def _set_status(
    patch: kopf.Patch,
    status: Mapping[str, Any],
    generation: int | None,
    fields: Mapping[str, Any],
    conditions: list[Condition],
) -> bool:
    """Fill kopf's patch with the status (only when it changes); True when it changed."""
    merged = merge_conditions(
        status.get("conditions"), conditions, generation=generation, now=now()
    )
    changed = {k: v for k, v in fields.items() if status.get(k) != v}
    if (
        not changed
        and status.get("observedGeneration") == generation
        and same_conditions(status.get("conditions"), merged)
    ):
        return False
    for k, v in changed.items():
        patch.status[k] = v
    patch.status["observedGeneration"] = generation
    patch.status["conditions"] = merged
    if "phase" in changed:
        metrics.REQUEST_PHASES.labels(str(fields["phase"])).inc()
    return True


async def _patch_vm(
    api: Api, memo: Any, namespace: str, vm_name: str, compute: Any
) -> tuple[dict[str, Any] | None, VmChange | None]:
    """Read-compute-patch the VM under a per-VM lock, retrying on optimistic-lock conflicts.

    The VM as our last patch returned it is kept: the next request for the same VM patches
    from it without a GET. It is only a guess; the resourceVersion in the patch turns a stale
    guess into a 409 (then we GET), and "nothing to do" is only ever decided on a fresh read.
    """
    key = (namespace, vm_name)
    cache: dict[tuple[str, str], dict[str, Any]] = memo["vm_cache"]
    async with _locks(memo).setdefault(key, asyncio.Lock()):
        for _attempt in range(CONFLICT_RETRIES):
            vm = cache.pop(key, None)
            fresh = vm is None
            if vm is None:
                vm = await api.get(
                    KUBEVIRT_GROUP, KUBEVIRT_VERSION, "virtualmachines", vm_name, namespace
                )
            if vm is None:
                return None, None
            change: VmChange = compute(vm)
            if change.patch is None:
                if not fresh:
                    continue  # decide "already right" on a fresh read only
                return vm, change
            try:
                cache[key] = await api.patch(
                    KUBEVIRT_GROUP,
                    KUBEVIRT_VERSION,
                    "virtualmachines",
                    vm_name,
                    change.patch,
                    namespace,
                )
            except ConflictError:
                metrics.API_CONFLICTS.labels("virtualmachines").inc()
                continue
            except NotFoundError:
                continue  # the VM was deleted meanwhile: the next GET says so
            return vm, change
    raise kopf.TemporaryError(f"VM {namespace}/{vm_name} kept changing under us", delay=1)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def apply_request(
    *,
    body: kopf.Body,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: Any,
    **kwargs: Any,
) -> None:
    retry = int(kwargs.get("retry") or 0)
    await _apply(body, status, patch, memo, kwargs["vmis_idx"], retry=retry)


def _backoff(base: float, retry: int) -> float:
    """Each kopf retry writes its progress annotation: back off so a request that waits long
    (agents down, no capacity) costs few writes."""
    return float(min(base * 2 ** min(retry, 10), RETRY_MAX_S))


async def _apply(
    body: Mapping[str, Any],
    status: Mapping[str, Any],
    patch: kopf.Patch,
    memo: Any,
    vmis_idx: kopf.Index[Any, Any],
    *,
    retry: int = 0,
) -> None:
    # Called with kopf's body, or with the refresher's compact view of it: Events need only
    # apiVersion, kind and metadata, which both have.
    obj = cast(kopf.Body, body)
    generation = body.get("metadata", {}).get("generation")
    try:
        req = Request.from_object(body)
    except RequestError as e:
        _set_status(
            patch,
            status,
            generation,
            {"phase": "Failed", "message": str(e)},
            [Condition("Accepted", "False", "Invalid", str(e))],
        )
        metrics.RECONCILES.labels("request", "invalid").inc()
        raise kopf.PermanentError(str(e)) from None

    cluster: Cluster = memo["cluster"]
    verdict = check_request(req, cluster.snapshot().capacity)
    if not verdict.accepted:
        phase = "Refused" if verdict.final else "Pending"
        if _set_status(
            patch,
            status,
            generation,
            {"phase": phase, "message": verdict.message},
            [Condition("Accepted", "False", verdict.reason, verdict.message)],
        ):
            (kopf.warn if verdict.final else kopf.info)(obj, reason=phase, message=verdict.message)
        metrics.RECONCILES.labels("request", phase.lower()).inc()
        # Capacity can appear (new node, new policy, an agent's report): the refresher looks
        # again as soon as the cluster view changes. No kopf retry: each would be a write.
        return

    api: Api = memo["api"]
    # DRA entries: the claim template first, so the VM never names a missing one.
    refusal = await sync_claim_template(
        api, req, body.get("metadata", {}).get("uid"), verdict.devices
    )
    if refusal is not None:
        _set_status(
            patch,
            status,
            generation,
            {"phase": "Refused", "message": refusal},
            [
                Condition("Accepted", "True", verdict.reason, verdict.message),
                Condition("Applied", "False", "ClaimTemplateConflict", refusal),
            ],
        )
        kopf.warn(obj, reason="Refused", message=refusal)
        raise kopf.TemporaryError(refusal, delay=_backoff(RETRY_REFUSED_S, retry))
    vm, change = await _patch_vm(
        api,
        memo,
        req.namespace,
        req.vm_name,
        lambda vm: apply_to_vm(vm, req, verdict.devices, verdict.pin_node),
    )
    if vm is None or change is None:
        msg = f"VirtualMachine {req.namespace}/{req.vm_name} not found; waiting for it"
        _set_status(
            patch,
            status,
            generation,
            {"phase": "Pending", "message": msg},
            [
                Condition("Accepted", "True", verdict.reason, verdict.message),
                Condition("Applied", "False", "VmNotFound", msg),
            ],
        )
        raise kopf.TemporaryError(msg, delay=_backoff(RETRY_PENDING_S, retry))
    if change.refusal is not None:
        _set_status(
            patch,
            status,
            generation,
            {"phase": "Refused", "message": change.refusal},
            [
                Condition("Accepted", "True", verdict.reason, verdict.message),
                Condition("Applied", "False", "VmConflict", change.refusal),
            ],
        )
        kopf.warn(obj, reason="Refused", message=change.refusal)
        raise kopf.TemporaryError(change.refusal, delay=_backoff(RETRY_REFUSED_S, retry))

    names = list(change.entries)
    if change.patch is not None:
        log.info(
            "PassthroughRequest %s/%s: VM %s %s now has %s",
            req.namespace,
            req.name,
            req.vm_name,
            req.placement,
            ", ".join(names),
        )
    vmi = _vmi(vmis_idx, req.namespace, req.vm_name)
    restarted = status.get("restartedVmiUid")
    if needs_restart(req, vmi, names, restarted):
        assert vmi is not None
        uid = vmi["metadata"]["uid"]
        await api.delete(
            KUBEVIRT_GROUP, KUBEVIRT_VERSION, "virtualmachineinstances", req.vm_name, req.namespace
        )
        kopf.info(obj, reason="Restarted", message=f"deleted VMI {req.vm_name} ({uid}) once")
        patch.status["restartedVmiUid"] = uid
        vmi = None
    st = running_status(req, names, vmi, _allocations(cluster), change.eviction)
    fields = {**st.fields(), "vmEntries": names}
    if (
        _set_status(patch, status, generation, fields, list(st.conditions))
        and status.get("phase") != st.phase
    ):
        kopf.info(obj, reason=st.phase, message=st.message)
    metrics.RECONCILES.labels("request", "applied").inc()


def _allocations(cluster: Cluster) -> list[Any]:
    return [a for r in cluster.snapshot().reported.values() for a in r.allocations]


REFRESHED = frozenset({"Applied", "Running", "Allocated"})
# What a look at a request needs of its status (not kopf's diff base: the largest field).
VIEW_STATUS = ("phase", "message", "node", "pciAddresses", "allocated", "vmEntries",
               "conditions", "observedGeneration", "restartedVmiUid")  # fmt: skip
REFRESH_WRITERS = 16  # status writes of one refresh pass in flight at once


def _waiting_for_vm(status: Mapping[str, Any]) -> bool:
    """Accepted, but its VM did not exist when it was applied (e.g. deleted and recreated)."""
    return status.get("phase") == "Pending" and any(
        c.get("type") == "Applied" and c.get("reason") == "VmNotFound"
        for c in status.get("conditions") or ()
        if isinstance(c, Mapping)
    )


def refresh_view(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The part of a request the refresher reads, or None when there is nothing to refresh
    (not handled yet, failed, being deleted): then it holds no index entry at all."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    if meta.get("deletionTimestamp"):
        return None
    if not (
        status.get("phase") in REFRESHED or _waiting_for_vm(status) or waiting_for_capacity(status)
    ):
        return None
    keep = ("name", "namespace", "uid", "generation", "resourceVersion")
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in keep if k in meta},
        "spec": dict(body.get("spec") or {}),
        "status": {k: status[k] for k in VIEW_STATUS if k in status},
    }


@kopf.index(GROUP, VERSION, PLURAL)
async def requests_idx(
    *, name: str, namespace: str | None, body: kopf.Body, **_: Any
) -> dict[Any, Any]:
    view = refresh_view(body)
    return {} if view is None else {(namespace, name): view}


def _refresher(memo: Any) -> Refresher:
    refresher: Refresher = memo["refresher"]  # shared: made at startup
    return refresher


# These only wake the one refresher (hostdev.operator.refresher); it decides what to look at.
@kopf.on.event(GROUP, VERSION, PLURAL)
async def request_changed(*, memo: Any, **_: Any) -> None:
    _refresher(memo).request_changed()


@kopf.on.event(KUBEVIRT_GROUP, KUBEVIRT_VERSION, "virtualmachineinstances")
async def vmi_changed(*, memo: Any, name: str, namespace: str | None, **_: Any) -> None:
    _refresher(memo).vm_changed(str(namespace), name)  # a VMI is named after its VM


@kopf.on.event(KUBEVIRT_GROUP, KUBEVIRT_VERSION, "virtualmachines")
async def vm_changed(*, memo: Any, name: str, namespace: str | None, **kwargs: Any) -> None:
    # kopf updates its indexes before the handlers run, and drops a deleted VM from them.
    ns = str(namespace)
    _refresher(memo).vm_owners(ns, name, _owners(kwargs["vms_idx"], ns, name))


def _eviction(status: Mapping[str, Any]) -> Condition | None:
    return next(
        (
            Condition("EvictionSafe", c["status"], c.get("reason", ""), c.get("message", ""))
            for c in status.get("conditions") or ()
            if c.get("type") == "EvictionSafe"
        ),
        None,
    )


async def refresh(
    memo: Any,
    vmis_idx: kopf.Index[Any, Any],
    vms_idx: kopf.Index[Any, Any],
    views: Sequence[Mapping[str, Any]],
) -> None:
    """The refresher's look at these requests (compact views from requests_idx): status from
    the VMI and the agents' reports, one status write only when it changed; a VM that lost a
    request's entries gets them again through the apply path.

    The decisions are made here, synchronously, for all of them; only the few that need a
    write get a coroutine (a pass after a burst looks at every request, and a coroutine per
    request would raise the operator's peak memory for nothing)."""
    cluster: Cluster = memo["cluster"]
    allocations = _allocations(cluster)  # once per pass, not once per request
    jobs: list[tuple[Mapping[str, Any], Request, kopf.Patch | None, RequestStatus | None]] = []
    for view in views:
        try:
            req = Request.from_object(view)
        except RequestError:
            continue
        job = _look(view, req, vmis_idx, vms_idx, allocations)
        if job is not None:
            jobs.append((view, req, *job))
    queue = iter(jobs)

    async def writer() -> None:
        for view, req, patch, st in queue:
            await _refresh_one(memo, vmis_idx, view, req, patch=patch, st=st)

    await asyncio.gather(*(writer() for _ in range(min(REFRESH_WRITERS, len(jobs)))))


def _look(
    view: Mapping[str, Any],
    req: Request,
    vmis_idx: kopf.Index[Any, Any],
    vms_idx: kopf.Index[Any, Any],
    allocations: Sequence[Any],
) -> tuple[kopf.Patch | None, RequestStatus | None] | None:
    """None: nothing to do; (None, None): apply again; else the status patch to write."""
    status: Mapping[str, Any] = view.get("status") or {}
    if waiting_for_capacity(status):
        # The capacity check again (in memory; a write only if its answer changed).
        return None, None
    owners = _owners(vms_idx, req.namespace, req.vm_name)
    if _waiting_for_vm(status):
        # Still no VM: nothing to do, its creation wakes the refresher.
        return None if owners is None else (None, None)
    if owners is None or req.name not in owners:
        log.info(
            "PassthroughRequest %s/%s: VM %s lacks its entries; applying again",
            req.namespace,
            req.name,
            req.vm_name,
        )
        return None, None
    names = list(status.get("vmEntries") or ())
    vmi = _vmi(vmis_idx, req.namespace, req.vm_name)
    st = running_status(req, names, vmi, allocations, _eviction(status))
    patch = kopf.Patch()
    generation = (view.get("metadata") or {}).get("generation")
    if not _set_status(patch, status, generation, st.fields(), list(st.conditions)):
        return None
    return patch, st


async def _refresh_one(
    memo: Any,
    vmis_idx: kopf.Index[Any, Any],
    view: Mapping[str, Any],
    req: Request,
    *,
    patch: kopf.Patch | None,
    st: RequestStatus | None,
) -> None:
    status: Mapping[str, Any] = view.get("status") or {}
    if patch is None:
        patch = kopf.Patch()
        try:
            await _apply(view, status, patch, memo, vmis_idx)
        except (kopf.TemporaryError, kopf.PermanentError):
            pass  # the status in the patch says why; the next look (or a change) tries again
        except Exception:
            log.exception("PassthroughRequest %s/%s: applying again failed", req.namespace,
                          req.name)  # fmt: skip
            return
        if not patch:
            return
    api: Api = memo["api"]
    # Based on the version looked at: should the request have changed meanwhile (kopf's own
    # handlers), the write is refused and the change brings a new look instead.
    rv = (view.get("metadata") or {}).get("resourceVersion")
    body = {**dict(patch), "metadata": {"resourceVersion": rv}}
    try:
        await api.patch(GROUP, VERSION, PLURAL, req.name, body, req.namespace, status=True)
    except (ConflictError, NotFoundError):
        return
    except Exception:
        log.exception("PassthroughRequest %s/%s: status write failed", req.namespace, req.name)
        return
    if st is not None and status.get("phase") != st.phase:
        kopf.info(cast(kopf.Body, view), reason=st.phase, message=st.message)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def release_request(*, body: kopf.Body, memo: Any, **_: Any) -> None:
    """Remove exactly this request's VM entries; the finalizer goes only after that worked."""
    meta = body.get("metadata", {})
    name, namespace = str(meta.get("name")), str(meta.get("namespace"))
    vm_name = (body.get("spec") or {}).get("vmName")
    if not vm_name:
        return
    api: Api = memo["api"]
    vm, change = await _patch_vm(
        api, memo, namespace, str(vm_name), lambda vm: remove_from_vm(vm, name)
    )
    if vm is not None and change is not None and change.patch is not None:
        log.info(
            "PassthroughRequest %s/%s: removed its entries from VM %s", namespace, name, vm_name
        )
    await delete_claim_template(api, namespace, name, meta.get("uid"))
    metrics.RECONCILES.labels("request", "released").inc()


__all__ = [
    "apply_request",
    "refresh",
    "release_request",
    "request_changed",
    "requests_idx",
    "values",
    "vm_changed",
    "vmi_changed",
    "vmis_idx",
    "vms_idx",
]
