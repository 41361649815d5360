"""Cluster-level reconciliation: policies + nodes -> PassthroughNodeStates, policy status and
the KubeVirt CR. Event handlers only mark the state dirty; one task recomputes everything from
kopf's in-memory indexes (no listing per event) and writes only what differs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Protocol, cast

from hostdev.operator import metrics
from hostdev.operator.dra import CONDITION as DEVICE_CLASS_CONDITION
from hostdev.operator.dra import not_dra_condition, reconcile_device_classes
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
from hostdev.policy.conditions import Condition, merge_conditions, same_conditions
from hostdev.policy.kubevirt import desired_entries, desired_gates, merge_kubevirt
from hostdev.policy.nodestate import (
    ENV_COLLISION,
    NodePlan,
    Policy,
    PolicyError,
    Rendered,
    policy_outcomes,
    rerender,
)
from hostdev.policy.nodestatus import multi_function_condition
from hostdev.policy.reconfigure import HolderState, Reconfigure, status_fields
from hostdev.policy.reported import ReportedNode, read_node_state
from hostdev.policy.request import Capacity

log = logging.getLogger("hostdev.operator.cluster")

ATTRIBUTION_ANNOTATION = "hostdev.io/policies"
MANAGED_BY = {"app.kubernetes.io/managed-by": "hostdev-operator"}
DEBOUNCE_S = 0.2
# NodeState writes in flight at once (a policy edit can change thousands: one after the other
# they take a round trip each; the API client's pool has 32 threads).
NODESTATE_WRITERS = 16
RETRY_S = 15.0


async def concurrently(writes: Sequence[Awaitable[None]], limit: int) -> None:
    """Await ``writes``, at most ``limit`` at a time; every one runs to its end, then the first
    error (if any) is raised (the pass is then repeated, see Cluster.run)."""
    gate = asyncio.Semaphore(limit)

    async def one(write: Awaitable[None]) -> None:
        async with gate:
            await write

    results = await asyncio.gather(*(one(w) for w in writes), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def values(index: Mapping[Any, Iterable[Any]]) -> list[Any]:
    """Flatten a kopf index (key -> store of values) into its values."""
    return [v for key in list(index) for v in index.get(key, ())]


@dataclass(frozen=True)
class Snapshot:
    policies: tuple[Policy, ...]
    invalid: Mapping[str, str]  # policy name -> what to fix
    plans: Mapping[str, NodePlan]
    reported: Mapping[str, ReportedNode]
    settings: Mapping[str, Reconfigure] = field(default_factory=dict)  # policy -> day-2 rules

    @cached_property
    def capacity(self) -> Capacity:
        # Cached: every waiting request re-checks against the same snapshot after a change.
        return Capacity.build(self.policies, self.plans, self.reported)


class Reconfiguring(Protocol):
    """Day-2 evictions (hostdev.operator.reconfigure.Reconfigurer): policy -> blocked VMs."""

    async def run(
        self, snap: Snapshot, indexes: Mapping[str, Mapping[Any, Iterable[Any]]]
    ) -> Mapping[str, Sequence[HolderState]]: ...


def post_event(obj: Mapping[str, Any], type: str, *, reason: str, message: str) -> None:
    """A Kubernetes Event on ``obj`` through kopf's poster (needs a kopf handler context)."""
    kopf.event(cast(kopf.Body, obj), type=type, reason=reason, message=message)


@dataclass
class Cluster:
    """Holds kopf's indexes (handed over at startup) and the reconcile task's state."""

    api: Api
    post: Callable[..., None] = post_event
    indexes: dict[str, Mapping[Any, Iterable[Any]]] = field(default_factory=dict)
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    _snapshot: Snapshot | None = None
    _stale: bool = True
    # What the last snapshot parsed and rendered, by name: reused while its inputs are the
    # same objects (or equal), rebuilt from the live indexes on every snapshot so nothing of a
    # deleted object stays.
    _policies: dict[str, tuple[Mapping[str, Any], Policy | str, Reconfigure | None]] = field(
        default_factory=dict
    )
    _reported: dict[str, tuple[Mapping[str, Any] | None, ReportedNode]] = field(
        default_factory=dict
    )
    _rendered: dict[str, Rendered] = field(default_factory=dict)
    renders: int = 0  # NodeState specs rendered so far (the rest were reused)
    kubevirt_missing: bool = False
    # Set when a pass must be repeated later (KubeVirt CR missing, API error). A kopf timer
    # (handlers.cluster.retry_cluster) turns it into a pass; a standby replica runs no kopf
    # at all (Lease leader election), so it never writes from stale indexes.
    retry_needed: bool = False

    reconfigurer: Reconfiguring | None = None
    _task: asyncio.Task[None] | None = None
    # Set (and replaced) on every change of the indexes: the request refresher wakes on it
    # (requests waiting for capacity are checked again) instead of polling.
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def mark(self) -> None:
        """Call from async handlers: the first call starts the reconcile task there, so it
        inherits kopf's handler context (which kopf.info/kopf.warn need to post Events)."""
        self._stale = True
        self.dirty.set()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="hostdev-cluster")

    def next_change(self) -> asyncio.Event:
        """An event set by the next change of policies, nodes or NodeStates (take it before
        looking at the snapshot, then wait on it: no change can slip in between)."""
        return self._changed

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def use(self, **indexes: Mapping[Any, Iterable[Any]]) -> None:
        self.indexes.update(indexes)

    def snapshot(self) -> Snapshot:
        """The desired state from the indexes as they are now (recomputed only when stale;
        only what changed is parsed or rendered again, see hostdev.policy.nodestate.rerender)."""
        if self._snapshot is not None and not self._stale:
            return self._snapshot
        self._stale = False
        policies: list[Policy] = []
        invalid: dict[str, str] = {}
        settings: dict[str, Reconfigure] = {}
        parsed: dict[str, tuple[Mapping[str, Any], Policy | str, Reconfigure | None]] = {}
        for obj in values(self.indexes.get("policies_idx", {})):
            name = str(obj["metadata"]["name"])
            was = self._policies.get(name)
            if was is not None and was[0] is obj:
                parsed[name] = was  # kopf keeps the index entry until the object changes
                continue
            try:
                policy = Policy.from_object(obj)
                parsed[name] = (obj, policy, Reconfigure.from_object(obj))
            except PolicyError as e:
                parsed[name] = (obj, str(e), None)
        for name, (_, policy_or_error, reconfigure) in parsed.items():
            if isinstance(policy_or_error, str):
                invalid[name] = policy_or_error
            else:
                policies.append(policy_or_error)
                settings[name] = cast(Reconfigure, reconfigure)
        self._policies = parsed
        nodes = {str(n["name"]): n["labels"] for n in values(self.indexes.get("nodes_idx", {}))}
        reported: dict[str, ReportedNode] = {}
        seen: dict[str, tuple[Mapping[str, Any] | None, ReportedNode]] = {}
        for s in values(self.indexes.get("nodestates_idx", {})):
            name, status = str(s["name"]), s.get("status")
            had = self._reported.get(name)
            if had is not None and (had[0] is status or had[0] == status):
                seen[name] = had  # e.g. our own spec write: the status is what it was
            else:
                seen[name] = (status, read_node_state(name, status))
            reported[name] = seen[name][1]
        self._reported = seen
        before = self._rendered
        self._rendered = rerender(policies, nodes, reported, before)
        rendered = sum(1 for n, r in self._rendered.items() if before.get(n) is not r)
        self.renders += rendered
        metrics.NODESTATE_RENDERS.inc(rendered)
        plans = {n: r.plan for n, r in self._rendered.items()}
        self._snapshot = Snapshot(tuple(policies), invalid, plans, reported, settings)
        return self._snapshot

    async def run(self) -> None:
        while True:
            await self.dirty.wait()
            await asyncio.sleep(DEBOUNCE_S)  # coalesce bursts of events into one pass
            self.dirty.clear()
            self.retry_needed = False
            try:
                await self.reconcile()
                metrics.RECONCILES.labels("cluster", "ok").inc()
            except ConflictError:
                metrics.API_CONFLICTS.labels("cluster").inc()
                self.mark()
            except NotFoundError:
                self.mark()  # something we were writing was deleted meanwhile: recompute
            except Exception:
                metrics.RECONCILES.labels("cluster", "error").inc()
                log.exception("cluster reconcile failed; retrying")
                self._later()

    def _later(self) -> None:
        self.retry_needed = True

    async def reconcile(self) -> None:
        snap = self.snapshot()
        await self._node_states(snap)
        kubevirt = await self._kubevirt(snap)
        classes = await reconcile_device_classes(
            self.api,
            snap.policies,
            {
                str(o["metadata"]["name"]): o
                for o in values(self.indexes.get("deviceclasses_idx", {}))
            },
        )
        held = await self.reconfigurer.run(snap, self.indexes) if self.reconfigurer else {}
        await self._policy_status(snap, kubevirt, classes, held)

    # ---- PassthroughNodeStates -------------------------------------------------------------
    async def _node_states(self, snap: Snapshot) -> None:
        current = {str(s["name"]): s for s in values(self.indexes.get("nodestates_idx", {}))}
        writes: list[Awaitable[None]] = []
        for node, plan in snap.plans.items():
            attribution = json.dumps(plan.attribution(), sort_keys=True, separators=(",", ":"))
            have = current.get(node)
            if have is None:
                writes.append(self._create_node_state(node, plan, attribution))
            elif have.get("spec") != plan.spec or have.get("attribution") != attribution:
                writes.append(self._patch_node_state(node, plan, attribution))
        for node, have in current.items():
            if node not in snap.plans and have.get("managed"):
                writes.append(self._delete_node_state(node))
        await concurrently(writes, NODESTATE_WRITERS)
        metrics.NODESTATES.set(len(snap.plans))

    async def _create_node_state(self, node: str, plan: NodePlan, attribution: str) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "PassthroughNodeState",
            "metadata": {
                "name": node,
                "labels": MANAGED_BY,
                "annotations": {ATTRIBUTION_ANNOTATION: attribution},
            },
            "spec": dict(plan.spec),
        }
        obj = await self.api.create_cluster(GROUP, VERSION, "passthroughnodestates", body)
        self.post(obj, "Normal", reason="Created", message=f"policies: {', '.join(plan.policies)}")
        log.info("PassthroughNodeState %s created (policies %s)", node, plan.policies)

    async def _patch_node_state(self, node: str, plan: NodePlan, attribution: str) -> None:
        await self.api.patch(
            GROUP,
            VERSION,
            "passthroughnodestates",
            node,
            # pfs/devices are lists: a merge patch replaces them whole, as intended.
            {
                "metadata": {"annotations": {ATTRIBUTION_ANNOTATION: attribution}},
                "spec": dict(plan.spec),
            },
        )
        log.info("PassthroughNodeState %s spec updated", node)

    async def _delete_node_state(self, node: str) -> None:
        if await self.api.delete(GROUP, VERSION, "passthroughnodestates", node):
            log.info("PassthroughNodeState %s deleted: no policy selects the node", node)

    # ---- KubeVirt CR --------------------------------------------------------------------
    async def _kubevirt(self, snap: Snapshot) -> Condition:
        crs = sorted(
            (k["metadata"]["namespace"], k["metadata"]["name"])
            for k in values(self.indexes.get("kubevirts_idx", {}))
        )
        if not crs:
            if snap.policies:
                self._later()
            self.kubevirt_missing = True
            return Condition(
                "KubeVirtConfigured",
                "False",
                "KubeVirtNotFound",
                f"no KubeVirt CR (kubevirt.io/v1 KubeVirt) found; retrying every {int(RETRY_S)} s",
            )
        self.kubevirt_missing = False
        # KubeVirt honours one CR per cluster; should there be more, each gets the same merge
        # (ownership-tracked, so harmless) rather than guessing which one virt-operator uses.
        wanted = desired_entries(snap.policies, snap.plans)
        gates = desired_gates(snap.policies)
        blocked: set[str] = set()
        for namespace, name in crs:
            where = f"{namespace}/{name}"
            fresh = await self.api.get(
                KUBEVIRT_GROUP, KUBEVIRT_VERSION, "kubevirts", name, namespace
            )
            if fresh is None:
                continue  # deleted meanwhile: its deletion event brings the next pass
            change = merge_kubevirt(fresh, wanted, gates)
            blocked.update(change.blocked)
            if change.patch is None:
                continue
            await self.api.patch(
                KUBEVIRT_GROUP, KUBEVIRT_VERSION, "kubevirts", name, change.patch, namespace
            )
            log.info("KubeVirt %s: added %s, removed %s", where, change.added, change.removed)
            self.post(
                fresh,
                "Normal",
                reason="HostDevicesSynced",
                message=f"hostdev added {list(change.added)}, removed {list(change.removed)}",
            )
        names = ", ".join(f"{ns}/{n}" for ns, n in crs)
        if blocked:
            return Condition(
                "KubeVirtConfigured",
                "False",
                "FeatureGateDisabled",
                f"KubeVirt {names} lists {', '.join(sorted(blocked))} in disabledFeatureGates: "
                "VMs with DRA gpus/hostDevices are refused until the admin enables it",
            )
        return Condition(
            "KubeVirtConfigured", "True", "PermittedHostDevices", f"KubeVirt {names} permits it"
        )

    # ---- policy status ----------------------------------------------------------------
    async def _policy_status(
        self,
        snap: Snapshot,
        kubevirt: Condition,
        classes: dict[str, Condition],
        held: Mapping[str, Sequence[HolderState]] | None = None,
    ) -> None:
        outcomes = policy_outcomes(snap.policies, snap.plans)
        objs = {str(o["metadata"]["name"]): o for o in values(self.indexes.get("policies_idx", {}))}
        conflicts = 0
        for name, obj in objs.items():
            gen = obj["metadata"].get("generation")
            old = obj.get("status") or {}
            if name in snap.invalid:
                fields: dict[str, Any] = {}
                conds = [Condition("Ready", "False", "InvalidPolicy", snap.invalid[name])]
            else:
                out = outcomes[name]
                conflicts += len(out.conflicts)
                fields = out.status()
                waiting = (
                    f"; {len(out.unreported)} node(s) not reported yet" if out.unreported else ""
                )
                # The worst conflict first: a colliding resource name renders nothing there.
                worst = sorted(out.conflicts, key=lambda c: c.reason != ENV_COLLISION)
                conds = [
                    Condition(
                        "Ready",
                        "True",
                        "Rendered",
                        f"rendered into {len(out.nodes)} PassthroughNodeState(s){waiting}",
                    ),
                    Condition(
                        "Conflicted",
                        "True" if worst else "False",
                        worst[0].reason if worst else "NoConflict",
                        worst[0].message if worst else "no other policy wins here",
                    ),
                    kubevirt,
                    multi_function_condition(out.multi_function),
                ]
                if name in classes:
                    conds.append(classes[name])
                elif any(
                    c.get("type") == DEVICE_CLASS_CONDITION for c in old.get("conditions") or ()
                ):
                    conds.append(not_dra_condition())
                blocked = (held or {}).get(name, ())
                if blocked or old.get("blockedVMs"):
                    # Once a change was blocked, the fields stay (empty) so a patch clears them.
                    fields.update(status_fields(blocked))
                    conds.append(reconfigured_condition(blocked))
            conditions = merge_conditions(old.get("conditions"), conds, generation=gen, now=now())
            same = all(old.get(k) == v for k, v in fields.items())
            if (
                same
                and old.get("observedGeneration") == gen
                and same_conditions(old.get("conditions"), conditions)
            ):
                continue
            body = {"status": {**fields, "observedGeneration": gen, "conditions": conditions}}
            try:
                await self.api.patch(GROUP, VERSION, "passthroughpolicies", name, body, status=True)
            except NotFoundError:
                continue  # deleted meanwhile; its deletion event brings the next pass
            if fields.get("conflictCount") and fields.get("conflictCount") != old.get(
                "conflictCount"
            ):
                self.post(obj, "Warning", reason="Conflict", message=conds[1].message)
        metrics.POLICY_CONFLICTS.set(conflicts)


def reconfigured_condition(blocked: Sequence[HolderState]) -> Condition:
    if not blocked:
        return Condition(
            "Reconfigured", "True", "NothingBlocks", "no VM holds a device this policy changes"
        )
    evicting = sum(1 for b in blocked if b.state == "Evicting")
    stuck = [b for b in blocked if b.state in ("NotEvictable", "EvictionRefused")]
    who = ", ".join(f"{b.holder.label} on {b.holder.node}" for b in blocked)
    reason = "EvictingVMs" if evicting else "BlockedByVMs"
    message = f"{len(blocked)} VM(s) hold devices this policy's change needs: {who}"
    if stuck:
        message += f"; {stuck[0].holder.label}: {stuck[0].message}"
    return Condition("Reconfigured", "False", reason, message)
