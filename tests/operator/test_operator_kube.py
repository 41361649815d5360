"""The operator as a process against the real API server (KubeVirt's real CRD schemas)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.kube import Cluster
from tests.fixtures.operator import GROUP, KV_GROUP, Objects, OperatorProcess, wait_for

pytestmark = pytest.mark.kube

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
OWNERS = "hostdev.io/passthrough-requests"


def suffix(ns: str) -> str:
    return ns.rsplit("-", 1)[-1]


def policy(name: str, resource: str, selector: dict[str, Any], pool: str, **spec: Any) -> dict:
    return {
        "apiVersion": "hostdev.io/v1alpha1",
        "kind": "PassthroughPolicy",
        "metadata": {"name": name},
        "spec": {
            "resourceName": resource,
            "nodeSelector": {"matchLabels": {"hostdev.io/pool": pool}},
            "selector": selector,
            **spec,
        },
    }


def vf(addr: str, index: int, resource: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "pciAddress": addr,
        "vendor": "8086",
        "device": "154c",
        "class": "020000",
        "physfn": "0000:3b:00.0",
        "vfIndex": index,
        "driver": "vfio-pci",
        "health": "Healthy",
    }
    if resource:
        out["resourceName"] = resource
    return out


def inventory(*devices: dict[str, Any], allocations: list[dict[str, Any]] | None = None) -> dict:
    return {
        "syncStatus": "Succeeded",
        "iommu": {"enabled": True, "vendor": "intel"},
        "deviceCount": len(devices),
        "devices": list(devices),
        "allocations": allocations or [],
        "allocationCount": len(allocations or []),
    }


def vm_body(name: str, host_devices: list[dict[str, str]] | None = None) -> dict[str, Any]:
    vm = yaml.safe_load((EXAMPLES / "2-vm.yaml").read_text())
    vm["metadata"]["name"] = name
    if host_devices is not None:
        vm["spec"]["template"]["spec"]["domain"]["devices"]["hostDevices"] = host_devices
    return vm


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or ():
        if c["type"] == kind:
            return dict(c)
    return None


def comparable(vm: dict[str, Any]) -> dict[str, Any]:
    """What a restored VM must equal: spec and annotations (server bookkeeping aside)."""
    return {
        "spec": vm["spec"],
        "annotations": vm["metadata"].get("annotations") or {},
        "labels": vm["metadata"].get("labels") or {},
    }


def test_policies_render_nodestates_conflicts_and_node_selection(
    hostdev_operator: OperatorProcess, kube_objects: Objects, kube_namespace: str
) -> None:
    o, sfx = kube_objects, suffix(kube_namespace)
    n1, n2 = f"a-{sfx}", f"b-{sfx}"
    o.create_node(n1, {"hostdev.io/pool": sfx})
    o.create_node(n2, {"hostdev.io/pool": sfx})
    o.create_policy(policy(f"wide-{sfx}", "vendor.example/any-intel", {"vendors": ["8086"]}, sfx))
    o.create_policy(
        policy(f"narrow-{sfx}", "vendor.example/vf", {"devices": ["154c"]}, sfx, priority=5)
    )

    def rules(node: str) -> list[str] | None:
        ns = o.nodestate(node)
        got = ns and [d["resourceName"] for d in ns["spec"]["devices"]]
        return got if got and len(got) == 2 else None

    for node in (n1, n2):
        got = wait_for(f"{node} spec", lambda n=node: rules(n))
        assert got == ["vendor.example/vf", "vendor.example/any-intel"]
    state = o.nodestate(n1)
    assert state is not None
    assert state["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "hostdev-operator"
    # kopf posts Events of cluster-scoped objects in the "default" namespace
    wait_for("a Created event for the NodeState", lambda: [
        e for e in o.core.list_namespaced_event("default").items
        if e.involved_object.name == n1 and e.reason == "Created"
    ])  # fmt: skip
    assert json.loads(state["metadata"]["annotations"]["hostdev.io/policies"])["policies"] == [
        f"narrow-{sfx}",
        f"wide-{sfx}",
    ]

    # The agent reports two VFs both policies match: the higher priority wins each, and the
    # spec pins them explicitly so the agent's own resolution agrees.
    o.report(n1, inventory(vf("0000:3b:02.0", 0), vf("0000:3b:02.1", 1)))
    wide = wait_for(
        "the losing policy's conflicts",
        lambda: (p := o.policy(f"wide-{sfx}")).get("status", {}).get("conflictCount") == 2 and p,
    )
    assert {c["target"] for c in wide["status"]["conflicts"]} == {"0000:3b:02.0", "0000:3b:02.1"}
    assert all(c["winner"] == f"narrow-{sfx}" for c in wide["status"]["conflicts"])
    assert condition(wide, "Conflicted")["status"] == "True"  # type: ignore[index]
    # The policies' statuses are written one after the other, in no set order.
    narrow = wait_for(
        "the winning policy's device count",
        lambda: (p := o.policy(f"narrow-{sfx}")).get("status", {}).get("deviceCount") == 2 and p,
    )
    assert narrow["status"]["matchedNodes"] == sorted([n1, n2])
    assert condition(narrow, "Ready")["status"] == "True"  # type: ignore[index]
    explicit = [d for d in (o.nodestate(n1) or {})["spec"]["devices"] if "pciAddress" in d]
    assert explicit == [
        {"pciAddress": a, "driver": "vfio-pci", "resourceName": "vendor.example/vf"}
        for a in ("0000:3b:02.0", "0000:3b:02.1")
    ]

    # The agent reports an allocation (no device change), then n2 leaves every policy: n1 is
    # not rendered again (nor written), n2's NodeState is deleted and nothing else is written.
    def counter(name: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in hostdev_operator.metrics().splitlines()
            if line.startswith(name)
        )

    deleted = 'hostdev_operator_api_writes_total{resource="passthroughnodestates",verb="delete"}'
    renders = counter("hostdev_operator_nodestate_renders_total")
    writes = counter('hostdev_operator_api_writes_total{resource="passthroughnodestates"')
    deletes = counter(deleted)
    held = {"pciAddress": "0000:3b:02.0", "resourceName": "vendor.example/vf",
            "namespace": "ns", "pod": "virt-launcher-vm-abcde", "vmi": "vm"}  # fmt: skip
    o.report(n1, inventory(vf("0000:3b:02.0", 0), vf("0000:3b:02.1", 1), allocations=[held]))
    o.core.patch_node(n2, {"metadata": {"labels": {"hostdev.io/pool": None}}})
    wait_for(f"{n2} NodeState deleted", lambda: o.nodestate(n2) is None)
    assert o.nodestate(n1) is not None
    assert counter("hostdev_operator_nodestate_renders_total") == renders
    assert (counter('hostdev_operator_api_writes_total{resource="passthroughnodestates"'),
            counter(deleted)) == (writes + 1, deletes + 1)  # fmt: skip


def test_resource_names_sharing_an_env_var_are_refused_naming_both(
    hostdev_operator: OperatorProcess, kube_objects: Objects, kube_namespace: str
) -> None:
    o, sfx = kube_objects, suffix(kube_namespace)
    node = f"c-{sfx}"
    o.create_node(node, {"hostdev.io/pool": sfx})
    dots, under = f"example.com/vf.{sfx}", f"example.com/vf_{sfx}"
    o.create_policy(policy(f"dots-{sfx}", dots, {"vendors": ["8086"]}, sfx, priority=5))
    o.create_policy(policy(f"under-{sfx}", under, {"vendors": ["8086"]}, sfx))

    def collision() -> dict[str, Any] | None:
        c = condition(o.policy(f"under-{sfx}"), "Conflicted")
        return c if c and c["reason"] == "EnvVarCollision" else None

    lost = wait_for("the collision in the second policy's status", collision)
    assert lost["status"] == "True"
    assert f"resource names {dots} and {under} both become" in lost["message"]
    assert f"{under} is refused, rename it" in lost["message"]
    (conflict,) = o.policy(f"under-{sfx}")["status"]["conflicts"]
    assert conflict["target"] == f"PCI_RESOURCE_EXAMPLE_COM_VF_{sfx.upper()}"
    assert conflict["winner"] == f"dots-{sfx}" and conflict["node"] == node
    state = o.nodestate(node)
    assert state is not None
    assert [d["resourceName"] for d in state["spec"]["devices"]] == [dots]
    won = wait_for(
        "the first policy's status", lambda: condition(o.policy(f"dots-{sfx}"), "Conflicted")
    )
    assert won["status"] == "False"


def test_kubevirt_cr_merged_without_clobbering_foreign_entries(
    hostdev_operator: OperatorProcess, kube_objects: Objects, kube_namespace: str
) -> None:
    o, sfx = kube_objects, suffix(kube_namespace)
    foreign = {"pciVendorSelector": "10DE:1EB8", "resourceName": "nvidia.com/TU104GL_Tesla_T4"}
    o.create(KV_GROUP, "kubevirts", kube_namespace, {
        "apiVersion": "kubevirt.io/v1", "kind": "KubeVirt", "metadata": {"name": "kubevirt"},
        "spec": {"configuration": {
            "developerConfiguration": {"featureGates": ["Snapshot"]},
            "permittedHostDevices": {"pciHostDevices": [foreign]},
        }},
    })  # fmt: skip
    o.create_node(f"k-{sfx}", {"hostdev.io/pool": sfx})
    resource = f"vendor.example/kv-{sfx}"
    o.create_policy(policy(f"kv-{sfx}", resource, {"vendors": ["8086"], "devices": ["154c"]}, sfx))

    def config() -> dict[str, Any]:
        kv = o.get(KV_GROUP, "kubevirts", kube_namespace, "kubevirt")
        assert kv is not None
        return dict(kv["spec"]["configuration"])

    ours = {"pciVendorSelector": "8086:154C", "resourceName": resource,
            "externalResourceProvider": True}  # fmt: skip
    wait_for("our permittedHostDevices entry", lambda: ours in config()["permittedHostDevices"][
        "pciHostDevices"])  # fmt: skip
    cfg = config()
    assert cfg["permittedHostDevices"]["pciHostDevices"] == [foreign, ours]
    assert cfg["developerConfiguration"]["featureGates"] == ["Snapshot", "HostDevices"]
    assert condition(
        wait_for("KubeVirtConfigured", lambda: condition(o.policy(f"kv-{sfx}"),
                 "KubeVirtConfigured") and o.policy(f"kv-{sfx}")), "KubeVirtConfigured"
    )["status"] == "True"  # type: ignore[index]  # fmt: skip

    # Someone else edits the CR meanwhile: their change stays.
    extra = {"pciVendorSelector": "15B3:101E", "resourceName": "nvidia.com/cx7"}
    o.api.patch_namespaced_custom_object(
        KV_GROUP, "v1", kube_namespace, "kubevirts", "kubevirt",
        {"spec": {"configuration": {"permittedHostDevices": {
            "pciHostDevices": [foreign, ours, extra]}}}},
    )  # fmt: skip
    o.api.delete_cluster_custom_object(GROUP, "v1alpha1", "passthroughpolicies", f"kv-{sfx}")
    wait_for("our entry removed", lambda: ours not in config()["permittedHostDevices"][
        "pciHostDevices"])  # fmt: skip
    cfg = config()
    assert cfg["permittedHostDevices"]["pciHostDevices"] == [foreign, extra]
    assert cfg["developerConfiguration"]["featureGates"] == ["Snapshot"]
    kv = o.get(KV_GROUP, "kubevirts", kube_namespace, "kubevirt")
    assert "hostdev.io/owned-permitted-host-devices" not in (
        kv or {})["metadata"].get("annotations", {})  # fmt: skip


def setup_pool(o: Objects, sfx: str, vfs: int = 2) -> tuple[str, str]:
    """One node with ``vfs`` VFs advertised as vendor.example/nic-<sfx>; returns (node, res)."""
    node, resource = f"r-{sfx}", f"vendor.example/nic-{sfx}"
    o.create_node(node, {"hostdev.io/pool": sfx})
    o.create_policy(policy(f"nic-{sfx}", resource, {"devices": ["154c"]}, sfx))
    o.report(node, inventory(*(vf(f"0000:3b:02.{i}", i, resource) for i in range(vfs))))
    return node, resource


def request_body(name: str, vm: str, *devices: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "hostdev.io/v1alpha1",
        "kind": "PassthroughRequest",
        "metadata": {"name": name},
        "spec": {"vmName": vm, "devices": list(devices), **spec},
    }


def phase(o: Objects, ns: str, name: str) -> str | None:
    req = o.request(ns, name)
    return ((req or {}).get("status") or {}).get("phase")


def test_request_patches_vm_and_deletion_restores_it_exactly(
    hostdev_operator: OperatorProcess, kube_objects: Objects, kube_namespace: str
) -> None:
    o, ns, sfx = kube_objects, kube_namespace, suffix(kube_namespace)
    node, resource = setup_pool(o, sfx)
    mine = [{"name": "user-gpu", "deviceName": "nvidia.com/GA102"}]
    o.create(KV_GROUP, "virtualmachines", ns, vm_body("vm1", mine))
    before = comparable(o.vm(ns, "vm1"))

    o.create(GROUP, "passthroughrequests", ns, request_body(
        "nics", "vm1", {"name": "nic", "resourceName": resource, "count": 2}))  # fmt: skip
    wait_for("Applied", lambda: phase(o, ns, "nics") == "Applied")
    vm = o.vm(ns, "vm1")  # stored: KubeVirt's real VirtualMachine schema accepted the patch
    tspec = vm["spec"]["template"]["spec"]
    assert tspec["domain"]["devices"]["hostDevices"] == [
        *mine,
        {"name": "nics-nic-0", "deviceName": resource},
        {"name": "nics-nic-1", "deviceName": resource},
    ]
    assert tspec["evictionStrategy"] == "None"
    assert json.loads(vm["metadata"]["annotations"][OWNERS])["nics"]["entries"] == [
        "nics-nic-0",
        "nics-nic-1",
    ]
    req = o.request(ns, "nics")
    assert req is not None
    assert {c["type"]: c["status"] for c in req["status"]["conditions"]} == {
        "Accepted": "True",
        "Applied": "True",
        "Running": "False",
        "Allocated": "False",
        "EvictionSafe": "True",
    }
    assert req["metadata"]["finalizers"] == ["hostdev.io/finalizer"]

    # The node agent reports the VM's launcher pod holding both VFs -> Allocated.
    o.report(node, {**inventory(*(vf(f"0000:3b:02.{i}", i, resource) for i in range(2))),
                    "allocations": [{"pciAddress": f"0000:3b:02.{i}", "resourceName": resource,
                                     "namespace": ns, "pod": "virt-launcher-vm1-x7k2p",
                                     "vmi": "vm1"} for i in range(2)]})  # fmt: skip
    done = wait_for("Allocated", lambda: phase(o, ns, "nics") == "Allocated" and o.request(
        ns, "nics"), timeout=40)  # fmt: skip
    assert done["status"]["pciAddresses"] == "0000:3b:02.0,0000:3b:02.1"
    assert done["status"]["node"] == node

    # The owner shrinks the request: exactly the surplus entry goes, the foreign one stays.
    o.api.patch_namespaced_custom_object(
        GROUP, "v1alpha1", ns, "passthroughrequests", "nics",
        {"spec": {"devices": [{"name": "nic", "resourceName": resource, "count": 1}]}},
    )  # fmt: skip

    def host_devices() -> list[str]:
        devs = o.vm(ns, "vm1")["spec"]["template"]["spec"]["domain"]["devices"]["hostDevices"]
        return [e["name"] for e in devs]

    wait_for("one entry left", lambda: host_devices() == ["user-gpu", "nics-nic-0"])

    o.delete(GROUP, "passthroughrequests", ns, "nics")
    wait_for("request gone", lambda: o.request(ns, "nics") is None)
    assert comparable(o.vm(ns, "vm1")) == before
    # one VM patch to add, one to shrink, one to remove; no retried conflicts
    metrics = hostdev_operator.metrics()
    assert (
        'hostdev_operator_api_writes_total{resource="virtualmachines",verb="patch"} 3.0' in metrics
    )
    assert 'hostdev_operator_request_transitions_total{phase="Allocated"} 1.0' in metrics


def test_request_refusals_say_why(
    hostdev_operator: OperatorProcess, kube_objects: Objects, kube_namespace: str
) -> None:
    o, ns, sfx = kube_objects, kube_namespace, suffix(kube_namespace)
    node, resource = setup_pool(o, sfx)
    o.create(KV_GROUP, "virtualmachines", ns, vm_body("vm1"))
    before = comparable(o.vm(ns, "vm1"))
    o.create(GROUP, "passthroughrequests", ns, request_body(
        "unknown", "vm1", {"name": "x", "resourceName": "vendor.example/none"}))  # fmt: skip
    o.create(GROUP, "passthroughrequests", ns, request_body(
        "toomany", "vm1", {"name": "x", "resourceName": resource, "count": 5}))  # fmt: skip
    o.create(GROUP, "passthroughrequests", ns, request_body(
        "clash", "vm1", {"name": "g", "node": node, "pciAddress": "0000:3b:02.7"}))  # fmt: skip
    for name, text in (
        ("unknown", "resource vendor.example/none is not provided by any PassthroughPolicy"),
        ("toomany", f"{resource}: needs 5, at most 2 on one node ({node})"),
        ("clash", f"device 0000:3b:02.7 on node {node} does not exist there"),
    ):
        req = wait_for(f"{name} Refused", lambda n=name: phase(o, ns, n) == "Refused" and
                       o.request(ns, n))  # fmt: skip
        assert text in req["status"]["message"]
        assert condition(req, "Accepted")["status"] == "False"  # type: ignore[index]
    assert comparable(o.vm(ns, "vm1")) == before
    for name in ("unknown", "toomany", "clash"):
        o.delete(GROUP, "passthroughrequests", ns, name)
        wait_for(f"{name} gone", lambda n=name: o.request(ns, n) is None)


def test_one_resource_in_both_gpus_and_host_devices_is_refused(
    hostdev_operator: OperatorProcess, kube_objects: Objects, kube_namespace: str
) -> None:
    o, ns, sfx = kube_objects, kube_namespace, suffix(kube_namespace)
    _, resource = setup_pool(o, sfx)
    body = vm_body("vm1")
    body["spec"]["template"]["spec"]["domain"]["devices"]["gpus"] = [
        {"name": "user-vf", "deviceName": resource}
    ]
    o.create(KV_GROUP, "virtualmachines", ns, body)
    before = comparable(o.vm(ns, "vm1"))
    o.create(GROUP, "passthroughrequests", ns, request_body(
        "nics", "vm1", {"name": "nic", "resourceName": resource}))  # fmt: skip
    req = wait_for("Refused", lambda: phase(o, ns, "nics") == "Refused" and o.request(ns, "nics"))
    said = (
        f"VM vm1 would take resource {resource} in both gpus and hostDevices (hostDevices: "
        "nics-nic-0; gpus: user-vf): KubeVirt hands each list its own devices from it"
    )
    assert said in req["status"]["message"]
    applied = condition(req, "Applied")
    assert applied is not None and applied["reason"] == "VmConflict"
    assert said in applied["message"]
    assert comparable(o.vm(ns, "vm1")) == before  # nothing written to the VM
    o.delete(GROUP, "passthroughrequests", ns, "nics")
    wait_for("request gone", lambda: o.request(ns, "nics") is None)
    assert comparable(o.vm(ns, "vm1")) == before


def test_restart_now_and_pinned_device(
    hostdev_operator: OperatorProcess, kube_objects: Objects, kube_namespace: str
) -> None:
    o, ns, sfx = kube_objects, kube_namespace, suffix(kube_namespace)
    node, resource = setup_pool(o, sfx)
    o.create(KV_GROUP, "virtualmachines", ns, vm_body("vm1"))
    before = comparable(o.vm(ns, "vm1"))
    vmi = vm_body("vm1")["spec"]["template"]
    o.create(KV_GROUP, "virtualmachineinstances", ns, {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "vm1"}, "spec": vmi["spec"], "status": {"phase": "Running"},
    })  # fmt: skip
    o.create(GROUP, "passthroughrequests", ns, request_body(
        "pin", "vm1", {"name": "nic", "node": node, "pciAddress": "0000:3b:02.1"},
        applyPolicy="RestartNow"))  # fmt: skip
    req = wait_for("Applied", lambda: phase(o, ns, "pin") == "Applied" and o.request(ns, "pin"))
    # The running VMI (without the device) was deleted once so KubeVirt recreates it.
    wait_for("VMI deleted", lambda: o.get(KV_GROUP, "virtualmachineinstances", ns, "vm1") is None)
    assert req["status"]["restartedVmiUid"]
    tspec = o.vm(ns, "vm1")["spec"]["template"]["spec"]
    assert tspec["nodeSelector"] == {"kubernetes.io/hostname": node}
    assert tspec["domain"]["devices"]["hostDevices"] == [
        {"name": "pin-nic-0", "deviceName": resource}
    ]
    o.delete(GROUP, "passthroughrequests", ns, "pin")
    wait_for("request gone", lambda: o.request(ns, "pin") is None)
    assert comparable(o.vm(ns, "vm1")) == before


def test_operator_restarted_midway_loses_and_duplicates_nothing(
    hostdev_operator: OperatorProcess, kube_objects: Objects, kube_namespace: str
) -> None:
    o, ns, sfx = kube_objects, kube_namespace, suffix(kube_namespace)
    _, resource = setup_pool(o, sfx, vfs=8)
    vms = ["vm-a", "vm-b"]
    befores = {}
    for vm in vms:
        o.create(KV_GROUP, "virtualmachines", ns, vm_body(vm, [{"name": "keep", "deviceName":
                                                                 "other.example/x"}]))  # fmt: skip
        befores[vm] = comparable(o.vm(ns, vm))
    names = [f"r{i}" for i in range(16)]
    wait_for("cluster state ready", lambda: condition(o.policy(f"nic-{sfx}"), "Ready"))
    for i, name in enumerate(names):
        entry = {"name": "nic", "resourceName": resource, "count": 1 + i % 3}
        o.create(GROUP, "passthroughrequests", ns, request_body(name, vms[i % 2], entry))
    wait_for("some applied", lambda: any(phase(o, ns, n) == "Applied" for n in names))
    hostdev_operator.restart()  # SIGKILL mid-way: some requests done, some not
    wait_for("all applied", lambda: all(phase(o, ns, n) == "Applied" for n in names), timeout=60)
    for vm in vms:
        got = [e["name"] for e in o.vm(ns, vm)["spec"]["template"]["spec"]["domain"]["devices"][
            "hostDevices"]]  # fmt: skip
        want = sorted(
            f"{n}-nic-{k}"
            for i, n in enumerate(names)
            if vms[i % 2] == vm
            for k in range(1 + i % 3)
        )
        assert sorted(got) == sorted(["keep", *want]), "duplicated or lost entries"
        assert len(got) == len(set(got))
    for name in names:
        o.delete(GROUP, "passthroughrequests", ns, name)
    wait_for("some released", lambda: any(o.request(ns, n) is None for n in names))
    hostdev_operator.restart()
    wait_for("all released", lambda: all(o.request(ns, n) is None for n in names), timeout=60)
    for vm in vms:
        assert comparable(o.vm(ns, vm)) == befores[vm]


def test_examples_apply_in_order(
    kube_apiserver: Cluster,
    hostdev_operator: OperatorProcess,
    kube_objects: Objects,
    kube_namespace: str,
) -> None:
    """examples/1-policy.yaml, 2-vm.yaml, 3-request.yaml as a reader applies them."""
    o, ns, sfx = kube_objects, kube_namespace, suffix(kube_namespace)
    node = f"ex-{sfx}"
    o.create_node(node, {"hostdev.io/sriov": "true"})
    docs = [yaml.safe_load((EXAMPLES / f).read_text())
            for f in ("1-policy.yaml", "2-vm.yaml", "3-request.yaml")]  # fmt: skip
    kube_apiserver.apply(docs[0])
    o.cleanup.append(lambda: o._delete_cluster("passthroughpolicies", docs[0]))
    # the node agent's part: create the VFs, report them under the policy's resource
    o.report(node, inventory(*(vf(f"0000:3b:02.{i}", i, "intel.com/x710-vf") for i in range(8)),
                             {"pciAddress": "0000:3b:00.0", "vendor": "8086", "device": "1572",
                              "netdevs": ["ens1f0"], "totalVfs": 64, "numVfs": 8}))  # fmt: skip
    state = o.nodestate(node)
    assert state is not None
    assert state["spec"]["pfs"] == [{"pfName": "ens1f0", "numVfs": 8}]
    kube_apiserver.apply(docs[1], ns)
    kube_apiserver.apply(docs[2], ns)
    name = docs[2]["metadata"]["name"]
    wait_for("example request Applied", lambda: phase(o, ns, name) == "Applied", timeout=40)
    devs = o.vm(ns, "fast-vm")["spec"]["template"]["spec"]["domain"]["devices"]["hostDevices"]
    assert devs == [{"name": f"fast-vm-nics-nic-{i}", "deviceName": "intel.com/x710-vf"}
                    for i in range(2)]  # fmt: skip
    o.delete(GROUP, "passthroughrequests", ns, name)
    wait_for("example request gone", lambda: o.request(ns, name) is None)
    assert "hostDevices" not in o.vm(ns, "fast-vm")["spec"]["template"]["spec"]["domain"][
        "devices"]  # fmt: skip


def test_recreated_vm_gets_its_entries_again(
    hostdev_operator: OperatorProcess, kube_objects: Objects, kube_namespace: str
) -> None:
    o, ns, sfx = kube_objects, kube_namespace, suffix(kube_namespace)
    _, resource = setup_pool(o, sfx)
    o.create(KV_GROUP, "virtualmachines", ns, vm_body("vm1"))
    o.create(GROUP, "passthroughrequests", ns, request_body(
        "nics", "vm1", {"name": "nic", "resourceName": resource}))  # fmt: skip
    wait_for("Applied", lambda: phase(o, ns, "nics") == "Applied")
    o.delete(KV_GROUP, "virtualmachines", ns, "vm1")
    wait_for("VM gone", lambda: o.get(KV_GROUP, "virtualmachines", ns, "vm1") is None)
    o.create(KV_GROUP, "virtualmachines", ns, vm_body("vm1"))

    def entries() -> list[str] | None:
        devs = o.vm(ns, "vm1")["spec"]["template"]["spec"]["domain"]["devices"]
        return [e["name"] for e in devs.get("hostDevices", ())] or None

    assert wait_for("entries re-added", entries, timeout=60) == ["nics-nic-0"]
    o.delete(GROUP, "passthroughrequests", ns, "nics")
    wait_for("request gone", lambda: o.request(ns, "nics") is None)
    assert entries() is None


def test_the_running_operator_never_loads_the_kubernetes_package(
    hostdev_operator: OperatorProcess, kube_objects: Objects, kube_namespace: str
) -> None:
    """kopf's login and watches, the operator's own writes and its Events all go through
    hostdev's client: the kubernetes package (its pydantic models, whose compiled core would
    be mapped) never loads in the process, though the test venv has it (issue 15)."""
    o, sfx = kube_objects, suffix(kube_namespace)
    node = f"k-{sfx}"
    o.create_node(node, {"hostdev.io/pool": sfx})
    o.create_policy(policy(f"k-{sfx}", "vendor.example/k", {"devices": ["154c"]}, sfx))
    wait_for("the NodeState", lambda: o.nodestate(node))
    assert hostdev_operator.proc is not None
    maps = Path(f"/proc/{hostdev_operator.proc.pid}/maps").read_text(encoding="utf-8")
    assert "aiohttp" in maps  # the process's compiled modules are listed here
    assert "pydantic_core" not in maps
