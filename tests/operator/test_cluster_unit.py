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
