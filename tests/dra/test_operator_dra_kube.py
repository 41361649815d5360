"""The operator for DRA policies against the real API server: the DeviceClass it owns (made,
remade when deleted, removed when the policy stops being DRA), a foreign DeviceClass of the same
name left alone and reported, and the KubeVirt CR's DRA gates (never over an admin's
disable)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.fixtures.kube import Cluster
from tests.fixtures.operator import GROUP, KV_GROUP, Objects, OperatorProcess, wait_for

pytestmark = pytest.mark.kube

RS = ("resource.k8s.io", "v1")


def _policy(name: str, resource: str, allocation: str, pool: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "PassthroughPolicy",
        "metadata": {"name": name},
        "spec": {
            "resourceName": resource,
            "allocation": allocation,
            "nodeSelector": {"matchLabels": {"hostdev.io/pool": pool}},
            "selector": {"vendors": ["10de"]},
        },
    }


def _class(api: k8s.CustomObjectsApi, name: str) -> dict[str, Any] | None:
    try:
        return dict(api.get_cluster_custom_object(*RS, "deviceclasses", name))
    except k8s.ApiException as e:
        if e.status == 404:
            return None
        raise


def _condition(o: Objects, policy: str, kind: str) -> dict[str, Any] | None:
    for c in (o.policy(policy).get("status") or {}).get("conditions") or ():
        if c["type"] == kind:
            return dict(c)
    return None


def test_device_classes_and_dra_gates(
    kube_apiserver: Cluster,
    hostdev_operator: OperatorProcess,
    kube_objects: Objects,
    kube_namespace: str,
) -> None:
    o, ns = kube_objects, kube_namespace
    api = k8s.CustomObjectsApi(kube_apiserver.admin)
    sfx = uuid.uuid4().hex[:6]
    o.create(KV_GROUP, "kubevirts", ns, {
        "apiVersion": "kubevirt.io/v1", "kind": "KubeVirt", "metadata": {"name": "kubevirt"},
        "spec": {"configuration": {"developerConfiguration": {
            "featureGates": ["Snapshot"], "disabledFeatureGates": ["GPUsWithDRA"]}}},
    })  # fmt: skip
    o.create_node(f"d-{sfx}", {"hostdev.io/pool": sfx})
    ours, taken = f"gpus-{sfx}", f"taken-{sfx}"
    api.create_cluster_custom_object(
        *RS,
        "deviceclasses",
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": taken},
            "spec": {"selectors": [{"cel": {"expression": "device.driver == 'x.example.com'"}}]},
        },
    )
    o.cleanup.append(lambda: api.delete_cluster_custom_object(*RS, "deviceclasses", taken))
    o.create_policy(_policy(ours, f"example.com/gpu-{sfx}", "DRA", sfx))
    o.create_policy(_policy(taken, f"example.com/other-{sfx}", "DRA", sfx))

    dc = wait_for("our DeviceClass", lambda: _class(api, ours))
    assert dc["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "hostdev-operator"}
    [owner] = dc["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "PassthroughPolicy",
        ours,
        o.policy(ours)["metadata"]["uid"],
    )
    assert (
        f'resourceName == "example.com/gpu-{sfx}"'
        in dc["spec"]["selectors"][0]["cel"]["expression"]
    )
    ready = wait_for("DeviceClassReady", lambda: _condition(o, ours, "DeviceClassReady"))
    assert ready["status"] == "True"
    clash = wait_for("the clash reported", lambda: _condition(o, taken, "DeviceClassReady"))
    assert clash["status"] == "False" and clash["reason"] == "DeviceClassNotOurs"
    assert _class(api, taken)["spec"]["selectors"][0]["cel"]["expression"] == (  # type: ignore[index]
        "device.driver == 'x.example.com'"
    )  # untouched

    def gates() -> list[str]:
        kv = o.get(KV_GROUP, "kubevirts", ns, "kubevirt")
        assert kv is not None
        return list(kv["spec"]["configuration"]["developerConfiguration"]["featureGates"])

    wait_for("the DRA gate", lambda: "HostDevicesWithDRA" in gates())
    assert gates() == ["Snapshot", "HostDevicesWithDRA"]  # GPUsWithDRA: the admin said no
    kv_cond = wait_for(
        "KubeVirtConfigured=False",
        lambda: (c := _condition(o, ours, "KubeVirtConfigured")) and c["status"] == "False" and c,
    )
    assert kv_cond["reason"] == "FeatureGateDisabled" and "GPUsWithDRA" in kv_cond["message"]

    # Deleted by someone: made again.
    api.delete_cluster_custom_object(*RS, "deviceclasses", ours)
    wait_for("our DeviceClass again", lambda: _class(api, ours))

    # The policy moves to the device plugin: its class goes, the condition says why.
    o.api.patch_cluster_custom_object(
        GROUP, "v1alpha1", "passthroughpolicies", ours, {"spec": {"allocation": "DevicePlugin"}}
    )
    wait_for("our DeviceClass deleted", lambda: _class(api, ours) is None)
    cond = wait_for(
        "DeviceClassReady=False",
        lambda: (c := _condition(o, ours, "DeviceClassReady")) and c["status"] == "False" and c,
    )
    assert cond["reason"] == "DevicePluginAllocation"
    # Both DRA policies gone: the gate we added goes, the admin's settings stay.
    o.api.delete_cluster_custom_object(GROUP, "v1alpha1", "passthroughpolicies", taken)
    wait_for("the DRA gate removed", lambda: "HostDevicesWithDRA" not in gates())
    # (the device-plugin policy wants no permittedHostDevices entry yet: nothing reported)
    assert gates() == ["Snapshot"]
