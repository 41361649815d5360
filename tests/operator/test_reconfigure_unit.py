"""Day-2 reconfiguration: the pure decisions and the Reconfigurer over kopf-like indexes with a
recording API double (cordon, restart, back-off)."""

from __future__ import annotations

from typing import Any

import pytest

from hostdev.host import PciAddress
from hostdev.operator.cluster import Cluster
from hostdev.operator.reconfigure import CORDON_ANNOTATION, Reconfigurer, vmi_facts
from hostdev.policy.blockers import Blocker
from hostdev.policy.nodestate import Policy, PolicyError, render_node
from hostdev.policy.reconfigure import (
    Holder,
    Reconfigure,
    VmiFacts,
    decide,
    holders,
    not_evictable,
)
from tests.operator.helpers import policy

A = PciAddress.parse
NIC, GPU = "vendor.example/nic", "vendor.example/gpu"


def holder(pod: str, policy: str | None = "p", node: str = "n1", vmi: str | None = None) -> Holder:
    return Holder(node, "ns", pod, vmi if vmi is not None else pod, ("0000:3b:02.0",), policy)


def test_settings_parse_and_say_what_to_fix() -> None:
    assert Reconfigure.from_object(policy("p")) == Reconfigure("Wait", 1, False)
    obj = policy("p")
    obj["spec"].update(reconfigure="EvictVMs", maxUnavailable=3, cordonNodes=True)
    assert Reconfigure.from_object(obj) == Reconfigure("EvictVMs", 3, True)
    for key, value, text in (
        ("maxUnavailable", 0, "spec.maxUnavailable must be at least 1"),
        ("maxUnavailable", -1, "to evict none, set reconfigure: Wait"),
        ("maxUnavailable", True, "spec.maxUnavailable must be at least 1"),
        ("reconfigure", "Drain", "spec.reconfigure must be Wait or EvictVMs"),
        ("cordonNodes", "yes", "spec.cordonNodes must be true or false"),
    ):
        bad = policy("p")
        bad["spec"][key] = value
        with pytest.raises(PolicyError, match=text):
            Reconfigure.from_object(bad)


def test_holders_are_attributed_to_the_policy_whose_change_they_block() -> None:
    nic, gpu = Policy.from_object(policy("nic", NIC)), Policy.from_object(policy("gpu", GPU))
    plan = render_node("n1", [nic, gpu])
    blockers = {"n1": [
        Blocker(A("0000:3b:02.0"), "restore iavf", "r", "ns", "virt-launcher-a-1", "a", NIC),
        Blocker(A("0000:3b:02.1"), "restore iavf", "r", "ns", "virt-launcher-a-1", "a", NIC),
        Blocker(A("0000:17:00.0"), "restore nvidia", "r", "ns", "virt-launcher-g-1", "g", GPU),
        Blocker(A("0000:18:00.0"), "restore x", "r", "ns", "virt-launcher-o-1", "o", "x.io/old"),
        Blocker(A("0000:19:00.0"), "restore x", "r (a running VM owns the group)"),
    ]}  # fmt: skip
    got = {h.pod: (h.policy, h.devices, h.vmi) for h in holders([nic, gpu], {"n1": plan},
                                                                blockers)}  # fmt: skip
    assert got == {
        "virt-launcher-a-1": ("nic", ("0000:3b:02.0", "0000:3b:02.1"), "a"),
        "virt-launcher-g-1": ("gpu", ("0000:17:00.0",), "g"),
        # served as a resource no policy has any more (deleted policy): nobody evicts it
        "virt-launcher-o-1": (None, ("0000:18:00.0",), "o"),
        "": (None, ("0000:19:00.0",), None),
    }


def test_decide_keeps_max_unavailable_per_policy() -> None:
    hs = [holder(p) for p in ("c", "a", "b")] + [holder("w", policy="waits")]
    settings = {"p": Reconfigure("EvictVMs", 2), "waits": Reconfigure()}
    (d,) = decide(hs, settings, evicting=[], blocked={})
    assert (d.policy, [h.pod for h in d.candidates], d.slots) == ("p", ["a", "b", "c"], 2)
    (d,) = decide(hs, settings, evicting=[("ns", "a")], blocked={("ns", "b"): "no"})
    assert ([h.pod for h in d.candidates], d.slots) == (["c"], 1)
    (d,) = decide(hs, settings, evicting=[("ns", "a"), ("ns", "c")], blocked={})
    assert d.slots == 0


def test_eviction_strategy_is_respected() -> None:
    h = holder("virt-launcher-a-1", vmi="a")
    assert not_evictable(h, VmiFacts(None, False), None) is None  # default None: evict
    assert not_evictable(h, VmiFacts("LiveMigrateIfPossible", False), None) is None
    assert not_evictable(h, VmiFacts("External", False), None) is None  # KubeVirt decides
    assert not_evictable(h, VmiFacts(None, True), "LiveMigrate") is None  # it can migrate
    why = not_evictable(h, VmiFacts(None, False), "LiveMigrate")
    assert why and "cannot live-migrate" in why and "set its evictionStrategy" in why
    assert "not found yet" in (not_evictable(h, None, None) or "")
    assert "not a KubeVirt VM" in (not_evictable(holder("web-1", vmi=""), None, None) or "")
    assert "outside Kubernetes" in (not_evictable(holder("", vmi=""), None, None) or "")
    facts = vmi_facts({"spec": {"evictionStrategy": "LiveMigrate"}, "status": {
        "conditions": [{"type": "LiveMigratable", "status": "False"}]}})  # fmt: skip
    assert facts == {"evictionStrategy": "LiveMigrate", "migratable": False}


class FakeCore:
    def __init__(self, refuse: set[str] | None = None) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.refuse = refuse or set()

    async def evict(self, namespace: str, pod: str) -> str | None:
        self.calls.append(("evict", pod, None))
        return "HTTP 429: Cannot evict pod" if pod in self.refuse else None

    async def patch_node(self, name: str, body: dict[str, Any]) -> None:
        self.calls.append(("patch_node", name, body))


def index(**items: Any) -> dict[Any, list[Any]]:
    return {k: [v] for k, v in items.items()}


def cluster_with(
    spec: dict[str, Any],
    blockers: list[dict[str, Any]],
    status: Any = None,
    unschedulable: bool = False,
    cordoned_for: str | None = None,
) -> Cluster:
    p = policy("p", NIC, node_selector={"matchLabels": {"pool": "a"}})
    p["spec"].update(spec)
    p.update(apiVersion="hostdev.io/v1alpha1", kind="PassthroughPolicy", status=status or {})
    cluster = Cluster(api=None)  # type: ignore[arg-type]
    cluster.use(
        policies_idx=index(p=p),
        nodes_idx=index(n1={"name": "n1", "labels": {"pool": "a"}}),
        nodestates_idx=index(n1={"name": "n1", "spec": {}, "status": {"blockers": blockers}}),
        reconfigure_vmis_idx={("ns", v): [{"evictionStrategy": None, "migratable": False}]
                              for v in ("a", "b")},
        cordon_idx=index(n1={"name": "n1", "unschedulable": unschedulable,
                             "cordonedFor": cordoned_for}),
    )  # fmt: skip
    return cluster


def blocker(vmi: str, addr: str) -> dict[str, Any]:
    return {"pciAddress": addr, "action": "restore iavf", "reason": "r", "namespace": "ns",
            "pod": f"virt-launcher-{vmi}-1", "vmi": vmi, "resourceName": NIC}  # fmt: skip


async def test_cordon_evict_then_uncordon_and_restart_resumes() -> None:
    events: list[tuple[str, str]] = []
    core = FakeCore()
    spec = {"reconfigure": "EvictVMs", "maxUnavailable": 1, "cordonNodes": True}
    blocking = [blocker("a", "0000:3b:02.0"), blocker("b", "0000:3b:02.1")]
    cluster = cluster_with(spec, blocking)
    r = Reconfigurer(core, lambda o, t, *, reason, message: events.append((reason, message)),
                     wake=lambda: None)  # type: ignore[arg-type]  # fmt: skip
    states = await r.run(cluster.snapshot(), cluster.indexes)
    assert core.calls == [
        ("patch_node", "n1", {"metadata": {"annotations": {CORDON_ANNOTATION: "p"}},
                              "spec": {"unschedulable": True}}),
        ("evict", "virt-launcher-a-1", None),
    ]  # fmt: skip
    assert [(s.holder.vmi, s.state) for s in states["p"]] == [("a", "Evicting"), ("b", "Queued")]
    # A restarted operator knows a is still being evicted (policy status), so b waits.
    status = {"blockedVMs": [s.to_status() for s in states["p"]]}
    again = cluster_with(spec, blocking, status, unschedulable=True, cordoned_for="p")
    r2 = Reconfigurer(FakeCore(), lambda *a, **k: None, wake=lambda: None)  # type: ignore[arg-type]
    states = await r2.run(again.snapshot(), again.indexes)
    assert r2.core.calls == []  # type: ignore[attr-defined]
    assert [s.state for s in states["p"]] == ["Evicting", "Queued"]
    # a let go: b goes next; once nothing blocks, the node is uncordoned.
    again = cluster_with(spec, blocking[1:], status, unschedulable=True, cordoned_for="p")
    await r2.run(again.snapshot(), again.indexes)
    assert r2.core.calls == [("evict", "virt-launcher-b-1", None)]  # type: ignore[attr-defined]
    done = cluster_with(spec, [], status, unschedulable=True, cordoned_for="p")
    assert await r2.run(done.snapshot(), done.indexes) == {}
    assert r2.core.calls[-1] == (
        "patch_node",
        "n1",
        {  # type: ignore[attr-defined]
            "metadata": {"annotations": {CORDON_ANNOTATION: None}},
            "spec": {"unschedulable": False},
        },
    )
    assert [e for e, _ in events] == ["Evicting"]


async def test_refused_eviction_takes_no_slot_and_backs_off() -> None:
    woken: list[int] = []
    core = FakeCore(refuse={"virt-launcher-a-1"})
    spec = {"reconfigure": "EvictVMs", "maxUnavailable": 1}
    cluster = cluster_with(spec, [blocker("a", "0000:3b:02.0"), blocker("b", "0000:3b:02.1")])
    r = Reconfigurer(core, lambda *a, **k: None, wake=lambda: woken.append(1))  # type: ignore[arg-type]
    states = await r.run(cluster.snapshot(), cluster.indexes)
    assert [c[1] for c in core.calls] == ["virt-launcher-a-1", "virt-launcher-b-1"]
    assert [(s.holder.vmi, s.state) for s in states["p"]] == [("a", "EvictionRefused"),
                                                             ("b", "Evicting")]  # fmt: skip
    assert r._retry is not None  # a retry of a is scheduled, not a busy loop
    # A pass right away (another NodeState event) does not ask again before the back-off.
    await r.run(cluster.snapshot(), cluster.indexes)
    assert len(core.calls) == 2
    r._schedule(None)
