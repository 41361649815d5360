"""Day-2 reconfiguration, the I/O side: evict exactly the VMs in the way of a policy's change.

Runs inside the cluster pass (:class:`hostdev.operator.cluster.Cluster`): the node agents'
``status.blockers`` say which pods hold which devices; :mod:`hostdev.policy.reconfigure` decides
who to evict; this module calls the Eviction API (never a delete), remembers what it evicted
until the agents report the devices released, cordons nodes only when the policy asks, and
returns each policy's ``blockedVMs`` status. Evictions the API server refuses (a
PodDisruptionBudget, KubeVirt's eviction rules) are tried again with back-off; everything else
happens when the indexes change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hostdev.operator.cluster import Snapshot, values
from hostdev.operator.kube import Core
from hostdev.policy.blockers import read_blockers
from hostdev.policy.reconfigure import (
    Holder,
    HolderState,
    Reconfigure,
    VmiFacts,
    decide,
    holders,
    not_evictable,
)

log = logging.getLogger("hostdev.operator.reconfigure")

CORDON_ANNOTATION = "hostdev.io/cordoned-for-policy"
RETRY_FIRST_S = 2.0
RETRY_MAX_S = 30.0


def vmi_facts(body: Mapping[str, Any]) -> dict[str, Any]:
    """The VMI index entry: its evictionStrategy and whether KubeVirt says it can migrate."""
    spec = body.get("spec") or {}
    conds = (body.get("status") or {}).get("conditions") or ()
    migratable = any(
        isinstance(c, Mapping) and c.get("type") == "LiveMigratable" and c.get("status") == "True"
        for c in conds
    )
    return {"evictionStrategy": spec.get("evictionStrategy"), "migratable": migratable}


@dataclass
class Reconfigurer:
    core: Core
    post: Callable[..., None]
    wake: Callable[[], None]  # another cluster pass (for retries)
    evicting: dict[tuple[str, str], str] = field(default_factory=dict)  # pod -> policy
    refused: dict[tuple[str, str], str] = field(default_factory=dict)  # pod -> API's reason
    # pod -> (monotonic time of the next try, current back-off) after a refused eviction
    backoff: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    _seeded: bool = False
    _retry: asyncio.TimerHandle | None = None

    async def run(
        self, snap: Snapshot, indexes: Mapping[str, Mapping[Any, Iterable[Any]]]
    ) -> dict[str, list[HolderState]]:
        policy_objs = {
            str(o["metadata"]["name"]): o for o in values(indexes.get("policies_idx", {}))
        }
        if not self._seeded:
            self._seed(policy_objs.values())
        blockers = {
            str(s["name"]): read_blockers(s.get("status"))
            for s in values(indexes.get("nodestates_idx", {}))
        }
        found = holders(snap.policies, snap.plans, {n: b for n, b in blockers.items() if b})
        keys = {h.key for h in found}
        self._released(keys, policy_objs)
        self.refused = {k: v for k, v in self.refused.items() if k in keys}
        self.backoff = {k: v for k, v in self.backoff.items() if k in keys}
        settings = snap.settings
        vmis = indexes.get("reconfigure_vmis_idx", {})
        default = next(iter(values(indexes.get("eviction_defaults_idx", {}))), None)
        blocked: dict[tuple[str, str], str] = {}
        for h in found:
            facts = next(iter(vmis.get((h.namespace, h.vmi), ())), None) if h.vmi else None
            reason = not_evictable(
                h,
                VmiFacts(facts["evictionStrategy"], facts["migratable"]) if facts else None,
                default,
            )
            if reason is not None:
                blocked[h.key] = reason
        now = time.monotonic()
        nodes = {str(n["name"]): n for n in values(indexes.get("cordon_idx", {}))}
        cordoned: set[str] = {name for name, n in nodes.items() if n.get("unschedulable")}
        for d in decide(found, settings, self.evicting, blocked):
            slots = d.slots
            for h in d.candidates:
                if slots <= 0:
                    break
                if h.key in self.backoff and now < self.backoff[h.key][0]:
                    continue  # refused a moment ago: its retry comes (takes no slot meanwhile)
                if settings[d.policy].cordon and h.node not in cordoned:
                    await self._cordon(h.node, d.policy)
                    cordoned.add(h.node)
                refusal = await self.core.evict(h.namespace, h.pod)
                if refusal is None:
                    slots -= 1
                    self.evicting[h.key] = d.policy
                    self.refused.pop(h.key, None)
                    self.backoff.pop(h.key, None)
                    msg = f"evicting {h.label} on node {h.node}: it holds {', '.join(h.devices)}"
                    log.info("PassthroughPolicy %s: %s", d.policy, msg)
                    self._event(policy_objs, d.policy, "Normal", "Evicting", msg)
                    continue
                delay = min(self.backoff.get(h.key, (0.0, RETRY_FIRST_S / 2))[1] * 2, RETRY_MAX_S)
                self.backoff[h.key] = (now + delay, delay)
                if self.refused.get(h.key) != refusal:
                    msg = f"eviction of {h.label} on node {h.node} refused: {refusal}"
                    log.info("PassthroughPolicy %s: %s", d.policy, msg)
                    self._event(policy_objs, d.policy, "Warning", "EvictionRefused", msg)
                self.refused[h.key] = refusal
        # A VMI the index has not seen yet may be evictable in a moment: look again then.
        lookup = any(
            "not found yet" in blocked.get(h.key, "")
            for h in found
            if h.policy and settings.get(h.policy, Reconfigure()).evicts
        )
        due = [t for t, _ in self.backoff.values()] + ([now + RETRY_FIRST_S] if lookup else [])
        await self._uncordon(found, nodes)
        self._schedule(min(due) - now if due else None)
        return self._states(found, settings, blocked)

    # ---- bookkeeping ----------------------------------------------------------------------
    def _seed(self, policies: Iterable[Mapping[str, Any]]) -> None:
        """After a restart: what the last run was evicting (from the policies' status)."""
        self._seeded = True
        for p in policies:
            for row in (p.get("status") or {}).get("blockedVMs") or ():
                if row.get("state") == "Evicting" and row.get("pod"):
                    key = (str(row.get("namespace")), str(row["pod"]))
                    self.evicting[key] = str(p["metadata"]["name"])

    def _released(self, holding: set[tuple[str, str]], objs: Mapping[str, Any]) -> None:
        for key, policy in list(self.evicting.items()):
            if key in holding:
                continue
            del self.evicting[key]
            msg = f"pod {key[0]}/{key[1]} released its devices; the node applies the change"
            log.info("PassthroughPolicy %s: %s", policy, msg)
            self._event(objs, policy, "Normal", "Released", msg)

    def _event(
        self, objs: Mapping[str, Any], policy: str, kind: str, reason: str, msg: str
    ) -> None:
        obj = objs.get(policy)
        if obj is not None:
            self.post(obj, kind, reason=reason, message=msg)

    def _schedule(self, delay: float | None) -> None:
        """Another pass after ``delay`` seconds: back-off only for refused evictions and VMIs
        not seen yet (nothing else would wake a pass for them)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if delay is not None:
            self._retry = asyncio.get_running_loop().call_later(max(delay, 0.05), self.wake)

    # ---- cordon ------------------------------------------------------------------------------
    async def _cordon(self, node: str, policy: str) -> None:
        """(A node cordoned already, by us or the admin, is left as it is.)"""
        await self.core.patch_node(
            node,
            {"metadata": {"annotations": {CORDON_ANNOTATION: policy}},
             "spec": {"unschedulable": True}},
        )  # fmt: skip
        log.info("node %s cordoned while policy %s evicts VMs from it", node, policy)

    async def _uncordon(self, found: Sequence[Holder], nodes: Mapping[str, Any]) -> None:
        busy = {(h.node, h.policy) for h in found}
        for name, n in nodes.items():
            policy = n.get("cordonedFor")
            if not policy or (name, policy) in busy:
                continue
            await self.core.patch_node(
                name,
                {"metadata": {"annotations": {CORDON_ANNOTATION: None}},
                 "spec": {"unschedulable": False}},
            )  # fmt: skip
            log.info("node %s uncordoned: policy %s has no VM left to evict there", name, policy)

    # ---- status ------------------------------------------------------------------------------
    def _states(
        self,
        found: Sequence[Holder],
        settings: Mapping[str, Reconfigure],
        blocked: Mapping[tuple[str, str], str],
    ) -> dict[str, list[HolderState]]:
        out: dict[str, list[HolderState]] = {}
        for h in found:
            if h.policy is None:
                continue
            s = settings.get(h.policy, Reconfigure())
            if not s.evicts:
                st = HolderState(h, "Waiting", "reconfigure is Wait: the change applies once it "
                                 "lets go of the devices")  # fmt: skip
            elif h.key in self.evicting:
                st = HolderState(h, "Evicting", "evicted; waiting for the devices to be released")
            elif h.key in blocked:
                st = HolderState(h, "NotEvictable", blocked[h.key])
            elif h.key in self.refused:
                st = HolderState(h, "EvictionRefused", self.refused[h.key] + "; retrying")
            else:
                st = HolderState(h, "Queued", f"waits for one of maxUnavailable "
                                 f"{s.max_unavailable} evictions to finish")  # fmt: skip
            out.setdefault(h.policy, []).append(st)
        return out
