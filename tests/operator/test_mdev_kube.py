"""mdev policies through the operator process on the real API server (KubeVirt's real CRD
schemas): NodeState spec.mdevs, and KubeVirt's permittedHostDevices.mediatedDevices merged
beside an admin's entry and removed again (only ours)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures.operator import GROUP, KV_GROUP, Objects, OperatorProcess, wait_for
from tests.operator.test_operator_kube import suffix

pytestmark = pytest.mark.kube


def test_mdev_policy_renders_nodestate_and_kubevirt_mediated_devices(
    hostdev_operator: OperatorProcess, kube_objects: Objects, kube_namespace: str
) -> None:
    o, sfx = kube_objects, suffix(kube_namespace)
    foreign = {"mdevNameSelector": "GRID T4-1Q", "resourceName": "nvidia.com/GRID_T4-1Q"}
    o.create(KV_GROUP, "kubevirts", kube_namespace, {
        "apiVersion": "kubevirt.io/v1", "kind": "KubeVirt", "metadata": {"name": "kubevirt"},
        "spec": {"configuration": {"permittedHostDevices": {"mediatedDevices": [foreign]}}},
    })  # fmt: skip
    node, resource = f"m-{sfx}", f"vendor.example/mtty-{sfx}"
    o.create_node(node, {"hostdev.io/pool": sfx})
    o.create_policy({
        "apiVersion": "hostdev.io/v1alpha1", "kind": "PassthroughPolicy",
        "metadata": {"name": f"mtty-{sfx}"},
        "spec": {
            "resourceName": resource,
            "nodeSelector": {"matchLabels": {"hostdev.io/pool": sfx}},
            "mdev": {"type": "mtty-2", "count": 3, "parents": ["mtty"]},
        },
    })  # fmt: skip
    state = wait_for("the NodeState", lambda: o.nodestate(node))
    assert state["spec"]["mdevs"] == [
        {"resourceName": resource, "type": "mtty-2", "count": 3, "parents": ["mtty"],
         "placement": "spread"}
    ]  # fmt: skip
    assert state["spec"]["devices"] == []

    def mediated() -> list[dict[str, Any]]:
        kv = o.get(KV_GROUP, "kubevirts", kube_namespace, "kubevirt")
        assert kv is not None
        return list(kv["spec"]["configuration"]["permittedHostDevices"].get("mediatedDevices", []))

    ours = {"mdevNameSelector": "mtty-2", "resourceName": resource,
            "externalResourceProvider": True}  # fmt: skip
    wait_for("our mediatedDevices entry", lambda: ours in mediated())
    assert mediated() == [foreign, ours]
    o.api.delete_cluster_custom_object(GROUP, "v1alpha1", "passthroughpolicies", f"mtty-{sfx}")
    wait_for("our entry removed", lambda: ours not in mediated())
    assert mediated() == [foreign]
