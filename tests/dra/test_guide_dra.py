"""docs/guide.md's DRA quick start, run: examples/4-dra-policy.yaml, 5-dra-vm.yaml and
6-dra-request.yaml applied in order against the real API server with the operator running. The
node agent's part (its ResourceSlice, the metadata file) is done by its own publisher and
writer; the scheduler's allocator (dra-harness) allocates the example claim; KubeVirt v1.9.0's
own DRA reader takes the example VM's gpus entry to the unit's address."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from hostdev.deviceplugin.dra.kube import DraApi
from hostdev.deviceplugin.dra.publisher import SlicePublisher
from hostdev.host import PciAddress
from hostdev.policy.allocation import AllocUnit
from hostdev.policy.dra import (
    ClaimRef,
    MetadataDevice,
    PoolEntry,
    dra_device,
    metadata_container_path,
    metadata_stream,
    plan_slices,
    qualified,
)
from tests.chart.test_guide import shell_blocks
from tests.fixtures.dra import RS, create_claim
from tests.fixtures.draharness import DRAHarness
from tests.fixtures.kube import Cluster, light_client
from tests.fixtures.kubevirt import KubeVirtLauncher
from tests.fixtures.operator import GROUP, Objects, OperatorProcess, wait_for

pytestmark = [pytest.mark.kube, pytest.mark.dra, pytest.mark.kubevirt]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def test_the_guide_applies_the_dra_examples_in_this_order() -> None:
    [block] = [b for b in shell_blocks() if any("4-dra-policy" in c for c in b.commands)]
    files = [c.split(" -f ")[1] for c in block.commands if " -f " in c]
    assert files == ["examples/4-dra-policy.yaml", "examples/5-dra-vm.yaml"]


def test_dra_quick_start(
    kube_apiserver: Cluster,
    hostdev_operator: OperatorProcess,
    kube_objects: Objects,
    kube_namespace: str,
    dra_harness: DRAHarness,
    kubevirt_launcher: KubeVirtLauncher,
    tmp_path: Path,
) -> None:
    o, ns = kube_objects, kube_namespace
    api = k8s.CustomObjectsApi(kube_apiserver.admin)
    node = f"dra-ex-{uuid.uuid4().hex[:6]}"
    o.create_node(node, {"hostdev.io/dra": "true"})

    # kubectl apply -f examples/4-dra-policy.yaml
    [policy] = _docs("4-dra-policy.yaml")
    kube_apiserver.apply(policy)
    o.cleanup.append(lambda: o._delete_cluster("passthroughpolicies", policy))
    cls = policy["metadata"]["name"]
    wait_for("the example's DeviceClass", lambda: _get(api, "deviceclasses", cls))
    state = wait_for("the NodeState", lambda: o.nodestate(node))
    assert state["spec"]["devices"][0]["allocation"] == "DRA"
    wait_for(
        "DeviceClassReady",
        lambda: any(
            c["type"] == "DeviceClassReady" and c["status"] == "True"
            for c in o.policy(cls).get("status", {}).get("conditions", [])
        ),
    )

    # The agent's part: the node's A10 unit published under the policy's resource.
    a = PciAddress.parse("0000:17:00.0")
    unit = AllocUnit(str(a), (a, PciAddress.parse("0000:17:00.1")), 40, 0, None)
    device = dra_device(unit, policy["spec"]["resourceName"], None)
    o.report(
        node,
        {
            "syncStatus": "Succeeded",
            "devices": [
                {
                    "pciAddress": str(f),
                    "vendor": "10de",
                    "device": dev,
                    "class": cls_code,
                    "iommuGroup": 40,
                    "driver": "vfio-pci",
                    "resourceName": policy["spec"]["resourceName"],
                    "health": "Healthy",
                }
                for f, dev, cls_code in zip(
                    unit.addresses, ("2236", "1aef"), ("030200", "040300"), strict=True
                )
            ],
        },
    )
    pub = SlicePublisher(DraApi(light_client(kube_apiserver.admin), node))
    pub.start()
    try:
        pub.submit(plan_slices(node, [PoolEntry(device, True)]))
        assert pub.wait_synced(60), pub.last_error
    finally:
        pub.stop()
        pub.api.api.close()

    # kubectl apply -n demo -f examples/5-dra-vm.yaml
    template, vm = _docs("5-dra-vm.yaml")
    kube_apiserver.apply([template, vm], ns)
    stored_vm = o.vm(ns, vm["metadata"]["name"])
    tspec = stored_vm["spec"]["template"]["spec"]
    [pod_claim] = tspec["resourceClaims"]
    # The resource claim controller's part: the claim of the launcher pod, from the template.
    claim = f"virt-launcher-gpu-vm-x-{pod_claim['name']}-abcde"
    create_claim(api, ns, claim, template["spec"]["spec"], pod_claim=pod_claim["name"])
    out = dra_harness.allocate(kube_apiserver.kubeconfig, ns, claim, node)
    assert [(d["request"], d["device"]) for d in out["devices"]] == [("gpu", device.name)]

    # The agent's metadata file for that claim, where the CDI mount puts it in the container.
    got = api.get_namespaced_custom_object(*RS, ns, "resourceclaims", claim)
    ref = ClaimRef(ns, claim, got["metadata"]["uid"], pod_claim["name"])
    path = metadata_container_path(ref, "gpu").removeprefix(
        "/var/run/kubernetes.io/dra-device-attributes/"
    )
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_bytes(
        metadata_stream(
            ref, "gpu", [MetadataDevice(node, device.name, qualified(device.attributes))]
        )
    )
    vmi = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": vm["metadata"]["name"], "namespace": ns},
        "spec": tspec,
    }
    kv = kubevirt_launcher.run(vmi, dra_metadata_dir=tmp_path)
    assert kv["error"] is None, kv["error"]
    assert [(g["alias"], g["pciAddress"]) for g in kv["gpus"]] == [
        ("ua-dra-gpu-gpu0", "0000:17:00.0")
    ]

    # The operator's way: examples/2-vm.yaml + 6-dra-request.yaml.
    [plain_vm] = _docs("2-vm.yaml")
    [request] = _docs("6-dra-request.yaml")
    kube_apiserver.apply([plain_vm, request], ns)
    name = request["metadata"]["name"]
    o.cleanup.append(lambda: o._forget(GROUP, "passthroughrequests", ns, name))
    applied = wait_for(
        "the request's claim in the VM",
        lambda: (
            v
            if (v := o.vm(ns, plain_vm["metadata"]["name"]))["spec"]["template"]["spec"].get(
                "resourceClaims"
            )
            else None
        ),
        timeout=60,
    )
    assert applied["spec"]["template"]["spec"]["domain"]["devices"]["gpus"] == [
        {"name": "fast-vm-gpu-gpu-0", "claimName": name, "requestName": "gpu-0"}
    ]
    made = _get(api, "resourceclaimtemplates", name, ns)
    assert made is not None
    assert made["spec"]["spec"]["devices"]["requests"][0]["exactly"]["deviceClassName"] == cls


def _get(
    api: k8s.CustomObjectsApi, plural: str, name: str, ns: str | None = None
) -> dict[str, Any] | None:
    try:
        if ns is None:
            return dict(api.get_cluster_custom_object(*RS, plural, name))
        return dict(api.get_namespaced_custom_object(*RS, ns, plural, name))
    except k8s.ApiException as e:
        if e.status == 404:
            return None
        raise
