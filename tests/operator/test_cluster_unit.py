"""The cluster reconcile pass over kopf-like indexes, with an in-memory API double."""

from __future__ import annotations

from typing import Any

from hostdev.operator.cluster import Cluster
from tests.operator.helpers import policy


class RecordingApi:
    """Records writes; holds no objects (the pass reads only the indexes and the KubeVirt CR)."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str, str, dict[str, Any]]] = []

    async def get(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        return None

    async def patch(
        self, group: str, version: str, plural: str, name: str, body: dict[str, Any],
        namespace: str | None = None, *, status: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        self.writes.append(("patch", plural + ("/status" if status else ""), name, body))
        return body

    async def create_cluster(
        self, group: str, version: str, plural: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        self.writes.append(("create", plural, body["metadata"]["name"], body))
        return {**body, "metadata": {**body["metadata"], "uid": "u1"}}

    async def delete(self, *args: Any, **kwargs: Any) -> bool:
        self.writes.append(("delete", args[2], args[3], {}))
        return True


def index(**items: Any) -> dict[Any, list[Any]]:
    return {k: [v] for k, v in items.items()}


async def test_no_kubevirt_cr_is_a_condition_and_a_retry_not_an_error() -> None:
    api = RecordingApi()
    events: list[tuple[str, str]] = []

    def post(obj: Any, type: str, *, reason: str, message: str) -> None:
        events.append((type, reason))

    cluster = Cluster(api, post=post)  # type: ignore[arg-type]
    p = policy("p1", "vendor.example/nic", node_selector={"matchLabels": {"pool": "a"}})
    p.update(apiVersion="hostdev.io/v1alpha1", kind="PassthroughPolicy")
    cluster.use(
        policies_idx=index(p1=p),
        nodes_idx=index(
            n1={"name": "n1", "labels": {"pool": "a"}}, n2={"name": "n2", "labels": {}}
        ),
        nodestates_idx=index(
            n2={"name": "n2", "spec": {}, "status": {}, "attribution": None, "managed": True}
        ),
        kubevirts_idx={},
    )  # fmt: skip
    await cluster.reconcile()
    kinds = [(verb, plural, name) for verb, plural, name, _ in api.writes]
    assert kinds == [
        ("create", "passthroughnodestates", "n1"),
        ("delete", "passthroughnodestates", "n2"),  # no policy selects n2 any more
        ("patch", "passthroughpolicies/status", "p1"),
    ]
    status = api.writes[-1][3]["status"]
    kv = next(c for c in status["conditions"] if c["type"] == "KubeVirtConfigured")
    assert (kv["status"], kv["reason"]) == ("False", "KubeVirtNotFound")
    assert cluster.retry_needed
    assert status["matchedNodes"] == ["n1"]
    assert events == [("Normal", "Created")]


async def test_a_colliding_resource_name_is_a_conflict_in_the_losers_status() -> None:
    api = RecordingApi()
    cluster = Cluster(api, post=lambda *a, **k: None)  # type: ignore[arg-type]
    first = policy("first", "example.com/vf.a", priority=1)
    second = policy("second", "Example.com/VF_a")
    cluster.use(
        policies_idx=index(first=first, second=second),
        nodes_idx=index(n1={"name": "n1", "labels": {}}),
        nodestates_idx={},
        kubevirts_idx={},
    )
    await cluster.reconcile()
    created = next(body for verb, _, name, body in api.writes if verb == "create")
    assert [d["resourceName"] for d in created["spec"]["devices"]] == ["example.com/vf.a"]
    statuses = {
        name: body["status"] for verb, plural, name, body in api.writes if plural.endswith("status")
    }
    conflicted = {c["type"]: c for c in statuses["second"]["conditions"]}["Conflicted"]
    assert (conflicted["status"], conflicted["reason"]) == ("True", "EnvVarCollision")
    assert (
        "example.com/vf.a and Example.com/VF_a both become PCI_RESOURCE_EXAMPLE_COM_VF_A"
        in (conflicted["message"])
    )
    assert statuses["second"]["conflicts"] == [
        {
            "node": "n1",
            "target": "PCI_RESOURCE_EXAMPLE_COM_VF_A",
            "winner": "first",
            "message": conflicted["message"],
        }
    ]
    first_cond = {c["type"]: c for c in statuses["first"]["conditions"]}["Conflicted"]
    assert first_cond["status"] == "False"
    multi = {c["type"]: c for c in statuses["first"]["conditions"]}["MultiFunctionUnits"]
    assert (multi["status"], multi["reason"]) == ("False", "OneFunctionPerUnit")


async def test_only_what_a_change_can_affect_is_rendered_and_nothing_unchanged_written() -> None:
    """A NodeState status change renders nothing (allocations) or that node (devices); a
    policy edit renders the nodes it selects; a label change that node; none writes a NodeState
    that stays the same. Nothing of a deleted node stays in the render memo."""
    api = RecordingApi()
    cluster = Cluster(api, post=lambda *a, **k: None)  # type: ignore[arg-type]
    pa = policy("pa", "vendor.example/a", node_selector={"matchLabels": {"pool": "a"}})
    pb = policy("pb", "vendor.example/b", node_selector={"matchLabels": {"pool": "b"}})
    nodes = {f"n{i}": {"name": f"n{i}", "labels": {"pool": "ab"[i % 2]}} for i in range(6)}
    states: dict[str, Any] = {}
    cluster.use(
        policies_idx=index(pa=pa, pb=pb), nodes_idx=index(**nodes),
        nodestates_idx=states, kubevirts_idx={},
    )  # fmt: skip
    await cluster.reconcile()
    assert cluster.renders == 6

    def nodestate_writes() -> list[str]:
        """The NodeStates written, each echoed into the index as kopf's watch would."""
        got = []
        for verb, plural, name, body in api.writes:
            if plural != "passthroughnodestates":
                continue
            got.append(name)
            if verb in ("create", "patch"):
                states[name] = [{
                    **(states.get(name) or [{"status": {}, "managed": True}])[0],
                    "name": name, "spec": body["spec"],
                    "attribution": body["metadata"]["annotations"]["hostdev.io/policies"],
                }]  # fmt: skip
        api.writes.clear()
        return got

    assert len(nodestate_writes()) == 6

    async def step() -> tuple[int, list[str]]:
        before = cluster.renders
        cluster._stale = True  # what mark() does, without starting the task
        await cluster.reconcile()
        return cluster.renders - before, nodestate_writes()

    assert await step() == (0, [])  # our own writes came back: nothing to do

    # An agent reports allocations only: no render, no write.
    alloc = {"pciAddress": "0000:3b:02.0", "resourceName": "vendor.example/a",
             "namespace": "ns", "pod": "virt-launcher-vm-x", "vmi": "vm"}  # fmt: skip
    states["n0"] = [{**states["n0"][0], "status": {"allocations": [alloc]}}]
    assert await step() == (0, [])
    assert cluster.snapshot().reported["n0"].allocations[0].vmi == "vm"  # yet it is read

    # An agent reports devices: that node is rendered again (conflicts may need it), no write.
    dev = {"pciAddress": "0000:3b:02.0", "vendor": "8086", "device": "154c", "driver": "iavf"}
    states["n0"] = [{**states["n0"][0], "status": {"devices": [dev]}}]
    assert await step() == (1, [])

    # A policy edit renders the nodes it selects (n1, n3, n5) and writes each once.
    pb2 = policy("pb", "vendor.example/b", node_selector={"matchLabels": {"pool": "b"}},
                 num_vfs=4)  # fmt: skip
    pb2["spec"]["selector"]["pfNames"] = ["ens1f0"]
    cluster.use(policies_idx=index(pa=pa, pb=pb2))
    renders, written = await step()
    assert (renders, sorted(written)) == (3, ["n1", "n3", "n5"])

    # A node changes pool: that node alone.
    nodes["n0"] = {"name": "n0", "labels": {"pool": "b"}}
    cluster.use(nodes_idx=index(**nodes))
    assert await step() == (1, ["n0"])

    # A node goes: its NodeState is deleted, nothing of it stays in the memos.
    del nodes["n2"]
    cluster.use(nodes_idx=index(**nodes))
    assert await step() == (0, ["n2"])
    del states["n2"]
    await step()
    assert "n2" not in cluster._rendered and "n2" not in cluster._reported
