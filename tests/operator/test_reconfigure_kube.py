"""Day-2 reconfiguration end to end: the operator process, a node agent's NodeState loop (fake
host run by the simulated kernel, QEMU processes holding VFIO groups, a fake kubelet
PodResources server) and the real kube-apiserver, whose Eviction API enforces
PodDisruptionBudgets. No kubelet or controllers run, so the test plays their parts: it makes the
VMIs and virt-launcher pods, finishes an evicted pod the way the kubelet would (QEMU exits, the
kubelet forgets the devices, the pod object goes) and updates PDB status like the disruption
controller. Who evicted what comes from the API server's audit log."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from hostdev.deviceplugin.api.podresources.v1 import api_pb2
from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.deviceplugin.nodestate.allocations import KubeletAllocations
from hostdev.deviceplugin.nodestate.kube import LauncherPods, LauncherPodWatch, NodeStateClient
from hostdev.deviceplugin.nodestate.loop import LoopSettings, NodeStateLoop
from hostdev.deviceplugin.nodestate.sync import Syncer
from hostdev.deviceplugin.podresources import PodResourcesClient
from hostdev.host import PciAddress, Sysfs
from hostdev.testing import scenarios
from hostdev.testing.fakekernel import FakeKernel
from hostdev.testing.fakeprocs import hold_open, let_go
from tests.fixtures.kube import Cluster, light_client
from tests.fixtures.operator import (
    GROUP,
    KV_GROUP,
    VERSION,
    Objects,
    OperatorProcess,
    free_port,
    identity_kubeconfig,
    running,
    wait_for,
)
from tests.nodeagent.test_loop_kube import FakeKubelet, RecordingManager, fake_kubelet

pytestmark = pytest.mark.kube

A = PciAddress.parse
PF = "0000:3b:00.0"
TIMEOUT = 90.0


@dataclass
class Vm:
    name: str
    pod: str
    vf: PciAddress
    pid: int


@dataclass
class SimNode:
    """One node: the agent's loop on a fake host, a fake kubelet, and the VMs running there."""

    name: str
    ns: str
    root: Path
    sysfs: Sysfs
    kubelet: FakeKubelet
    core: k8s.CoreV1Api
    objects: Objects
    vms: dict[str, Vm] = field(default_factory=dict)

    def vf(self, index: int) -> PciAddress:
        return self.sysfs.discover().devices[A(PF)].virtfns[index]

    def driver(self, addr: PciAddress) -> str | None:
        return self.sysfs.discover().devices[addr].driver

    def start_vm(self, name: str, vf_index: int, resource: str, *, strategy: str | None = None,
                 labels: dict[str, str] | None = None) -> Vm:  # fmt: skip
        """A running VM as KubeVirt + the kubelet leave it: VMI, launcher pod (Running, Ready),
        the kubelet's allocation of the VF, and QEMU holding the VF's VFIO group."""
        spec: dict[str, Any] = {"domain": {"devices": {}}}
        if strategy:
            spec["evictionStrategy"] = strategy
        vmi = self.objects.create(KV_GROUP, "virtualmachineinstances", self.ns, {
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": name}, "spec": spec,
            "status": {"phase": "Running", "nodeName": self.name},
        })  # fmt: skip
        pod = f"virt-launcher-{name}-{uuid.uuid4().hex[:5]}"
        self.core.create_namespaced_pod(self.ns, {
            "metadata": {
                "name": pod,
                "labels": {"kubevirt.io": "virt-launcher", **(labels or {})},
                "annotations": {"kubevirt.io/domain": name},
                "ownerReferences": [{
                    "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                    "name": name, "uid": vmi["metadata"]["uid"], "controller": True}],
            },
            "spec": {"nodeName": self.name,
                     "containers": [{"name": "compute", "image": "registry.invalid/launcher"}]},
        })  # fmt: skip
        self.core.patch_namespaced_pod_status(pod, self.ns, {"status": {
            "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})  # fmt: skip
        vf = self.vf(vf_index)
        vm = Vm(name, pod, vf, 4000 + len(self.vms))
        self.vms[name] = vm
        group = self.sysfs.discover().devices[vf].iommu_group
        hold_open(self.root, vm.pid, f"/dev/vfio/{group}")
        self._allocate(resource)
        return vm

    def _allocate(self, resource: str) -> None:
        self.kubelet.pods = [
            api_pb2.PodResources(namespace=self.ns, name=vm.pod, containers=[
                api_pb2.ContainerResources(name="compute", devices=[
                    api_pb2.ContainerDevices(resource_name=resource, device_ids=[str(vm.vf)])])])
            for vm in self.vms.values()
        ]  # fmt: skip

    def finish(self, name: str, resource: str) -> None:
        """The VM stops: QEMU exits, the kubelet forgets its devices, the pod object goes."""
        vm = self.vms.pop(name)
        let_go(self.root, vm.pid)
        self._allocate(resource)
        self.core.delete_namespaced_pod(vm.pod, self.ns, grace_period_seconds=0)

    def pod(self, name: str) -> k8s.V1Pod | None:
        try:
            return self.core.read_namespaced_pod(name, self.ns)
        except k8s.ApiException as e:
            if e.status == 404:
                return None
            raise

    def terminating(self, name: str) -> bool:
        pod = self.pod(self.vms[name].pod)
        return pod is not None and pod.metadata.deletion_timestamp is not None


@pytest.fixture
def node(
    kube_apiserver: Cluster, kube_objects: Objects, kube_namespace: str, tmp_path: Path
) -> Iterator[SimNode]:
    root = tmp_path / "host"
    host = scenarios.sriov_nic_dual_socket(root, numvfs=0)
    kernel = FakeKernel(host, vf_drivers={PF: "iavf"})
    sysfs = Sysfs(str(root))
    name = f"n-{kube_namespace.rsplit('-', 1)[-1]}"
    kube_objects.create_node(name, {"hostdev.io/pool": name})
    api = kube_apiserver.api_client()
    light = light_client(api)  # the agent's own API client, with the same identity
    with fake_kubelet() as kubelet:
        # Re-planning must come from the pod watch: resync and allocation clocks are an hour.
        loop = NodeStateLoop(
            NodeStateClient(light, name),
            Syncer(sysfs, DriverMemory(str(tmp_path / "state")), io=kernel, settle=1.0),
            RecordingManager(),
            allocations=KubeletAllocations(
                PodResourcesClient(kubelet.socket), LauncherPods(light, name)
            ),
            settings=LoopSettings(
                coalesce=0.3, resync=3600, allocations_every=3600, watch_timeout=5
            ),
            pods_gone=LauncherPodWatch(light, name, timeout_seconds=5),
        )
        stop = threading.Event()
        thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
        thread.start()
        try:
            yield SimNode(name, kube_namespace, root, sysfs, kubelet, k8s.CoreV1Api(api),
                          kube_objects)  # fmt: skip
        finally:
            stop.set()
            thread.join(15)
            light.close()  # after the loop's last write; ends the blocked watches too
            api.close()
    assert not thread.is_alive(), "the agent loop did not stop"


@pytest.fixture
def operator(
    kube_apiserver: Cluster, kube_objects: Objects, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """The operator process under its own identity (its writes are told apart in the audit)."""
    del kube_objects  # teardown order: the operator stops before the objects are removed
    user = f"hostdev-operator-{uuid.uuid4().hex[:6]}"
    (tmp_path / "op").mkdir()
    kubeconfig = identity_kubeconfig(kube_apiserver, user, tmp_path / "kc")
    yield from running(OperatorProcess(
        kube_apiserver, tmp_path / "op", metrics_port=free_port(), user=user, kubeconfig=kubeconfig
    ))  # fmt: skip


def policy_body(node: SimNode, resource: str, vfs: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PassthroughPolicy",
        "metadata": {"name": f"p-{node.name}"},
        "spec": {
            "resourceName": resource,
            "nodeSelector": {"matchLabels": {"hostdev.io/pool": node.name}},
            "selector": {"pfNames": [f"ens1f0#{vfs}"]},
            "sriov": {"numVfs": 4},
            **spec,
        },
    }


def nodestate(o: Objects, node: SimNode) -> dict[str, Any]:
    return (o.nodestate(node.name) or {}).get("status") or {}


def synced(o: Objects, node: SimNode, generation: int | None = None) -> bool:
    st = nodestate(o, node)
    gen = (o.nodestate(node.name) or {}).get("metadata", {}).get("generation")
    return bool(
        st.get("syncStatus") == "Succeeded"
        and st.get("observedGeneration") == (generation or gen)
        and not st.get("blockers")
    )


def set_selector(o: Objects, name: str, vfs: str) -> None:
    body = {"spec": {"selector": {"pfNames": [f"ens1f0#{vfs}"]}}}
    o.api.patch_cluster_custom_object(GROUP, VERSION, "passthroughpolicies", name, body)


def evictions(cluster: Cluster, op: OperatorProcess, ns: str) -> list[tuple[str, int]]:
    """(pod, HTTP code) of every eviction the operator asked for in ``ns``, in order."""
    return [
        (e["objectRef"]["name"], e["responseStatus"]["code"])
        for e in cluster.audit(user=op.user, namespace=ns, resource="pods",
                               subresource="eviction", stage="ResponseComplete")
    ]  # fmt: skip


def blocked_vms(o: Objects, name: str) -> dict[str, dict[str, Any]]:
    rows = (o.policy(name).get("status") or {}).get("blockedVMs") or ()
    return {r.get("vmi") or r.get("pod"): r for r in rows}


def pdb(node: SimNode, name: str, labels: dict[str, str], *, allowed: int, **spec: Any) -> None:
    policy = k8s.PolicyV1Api(node.core.api_client)
    body = {"metadata": {"name": name}, "spec": {"selector": {"matchLabels": labels}, **spec}}
    policy.create_namespaced_pod_disruption_budget(node.ns, body)
    allow(node, name, allowed)


def allow(node: SimNode, name: str, allowed: int) -> None:
    """What the disruption controller would write: the PDB observed, ``allowed`` disruptions."""
    policy = k8s.PolicyV1Api(node.core.api_client)
    gen = policy.read_namespaced_pod_disruption_budget(name, node.ns).metadata.generation
    policy.patch_namespaced_pod_disruption_budget_status(name, node.ns, {"status": {
        "observedGeneration": gen, "disruptionsAllowed": allowed, "currentHealthy": 2,
        "desiredHealthy": 1, "expectedPods": 2, "disruptedPods": None}})  # fmt: skip


def policy_events(node: SimNode, policy: str) -> list[tuple[str, str]]:
    evs = node.core.list_event_for_all_namespaces(field_selector=f"involvedObject.name={policy}")
    return [(e.reason, e.message) for e in evs.items]


def three_vms(node: SimNode, o: Objects, resource: str, **spec: Any) -> str:
    """A policy serving VFs 0-3, applied; VMs a, b, c running on VFs 0, 1, 2."""
    body = policy_body(node, resource, "0-3", **spec)
    o.create_policy(body)
    wait_for("the first sync", lambda: synced(o, node), timeout=TIMEOUT)
    assert all(node.driver(node.vf(i)) == "vfio-pci" for i in range(4))
    return str(body["metadata"]["name"])


def test_evicts_exactly_the_two_blocking_vms_one_at_a_time_through_the_pdb(
    kube_apiserver: Cluster, operator: OperatorProcess, kube_objects: Objects, node: SimNode
) -> None:
    o, ns, res = kube_objects, node.ns, f"vendor.example/day2-{node.name}"
    name = three_vms(node, o, res, reconfigure="EvictVMs", maxUnavailable=2)
    a = node.start_vm("a", 0, res, labels={"app": "pdb"}).pod
    b = node.start_vm("b", 1, res, labels={"app": "pdb"}).pod
    c = node.start_vm("c", 2, res).pod
    # A PDB over a and b that allows one disruption at a time.
    pdb(node, "ab", {"app": "pdb"}, allowed=1, maxUnavailable=1)

    set_selector(o, name, "2-3")  # VFs 0 and 1 go back to iavf: a and b are in the way
    wait_for("a evicted, b refused by the PDB", lambda: evictions(kube_apiserver, operator, ns)
             [:2] == [(a, 201), (b, 429)], timeout=TIMEOUT)  # fmt: skip
    assert node.terminating("a") and not node.terminating("b") and not node.terminating("c")
    st = wait_for("status: a Evicting, b EvictionRefused", lambda: (
        (rows := blocked_vms(o, name)) and rows.get("a", {}).get("state") == "Evicting"
        and rows.get("b", {}).get("state") == "EvictionRefused" and rows))  # fmt: skip
    assert "disruption budget" in st["b"]["message"]
    assert st["a"]["devices"] == [str(node.vf(0))] and st["a"]["node"] == node.name
    blockers = {(b["vmi"], b["pciAddress"]) for b in nodestate(o, node)["blockers"]}
    assert blockers == {("a", str(node.vf(0))), ("b", str(node.vf(1)))}

    # The kubelet finishes a; the disruption controller sees a's replacement healthy again.
    node.finish("a", res)
    wait_for("VF 0 back on iavf", lambda: node.driver(node.vf(0)) == "iavf", timeout=TIMEOUT)
    allow(node, "ab", 1)
    wait_for("b evicted", lambda: (b, 201) in evictions(kube_apiserver, operator, ns),
             timeout=TIMEOUT)  # fmt: skip
    node.finish("b", res)
    wait_for("the change applied", lambda: synced(o, node), timeout=TIMEOUT)
    assert node.driver(node.vf(1)) == "iavf"
    # c kept its VF and runs on: never asked to leave.
    assert node.driver(node.vf(2)) == "vfio-pci" and not node.terminating("c")
    # Exactly a and b were asked to leave (b twice: once refused), through the Eviction API
    # only: the operator deleted no pod, and c's pod is as it was.
    tried = evictions(kube_apiserver, operator, ns)
    assert {p for p, _ in tried} == {a, b} and tried.count((b, 201)) == 1
    assert kube_apiserver.audit(user=operator.user, resource="pods", verb="delete") == []
    assert kube_apiserver.audit(namespace=ns, resource="pods", name=c, verb="delete") == []
    done = wait_for("policy status clear", lambda: (
        (p := o.policy(name)).get("status", {}).get("blockedVMs") == [] and p))  # fmt: skip
    cond = {c["type"]: c for c in done["status"]["conditions"]}["Reconfigured"]
    assert cond["status"] == "True"
    reasons = [r for r, _ in policy_events(node, name)]
    assert reasons.count("Evicting") == 2 and "EvictionRefused" in reasons
    assert reasons.count("Released") == 2


def test_wait_lists_blockers_and_applies_once_they_are_gone(
    kube_apiserver: Cluster, operator: OperatorProcess, kube_objects: Objects, node: SimNode
) -> None:
    o, ns, res = kube_objects, node.ns, f"vendor.example/day2-{node.name}"
    name = three_vms(node, o, res)  # reconfigure: Wait is the default
    for vm, vf in (("a", 0), ("b", 1), ("c", 2)):
        node.start_vm(vm, vf, res)
    set_selector(o, name, "2-3")
    st = wait_for("blockers listed", lambda: len(nodestate(o, node).get("blockers") or ()) == 2
                  and nodestate(o, node), timeout=TIMEOUT)  # fmt: skip
    assert {(b["namespace"], b["vmi"], b["pod"], b["pciAddress"], b["action"])
            for b in st["blockers"]} == {
        (ns, "a", node.vms["a"].pod, str(node.vf(0)), "restore iavf"),
        (ns, "b", node.vms["b"].pod, str(node.vf(1)), "restore iavf")}  # fmt: skip
    blocked = {c["type"]: c for c in st["conditions"]}["Blocked"]
    assert blocked["status"] == "True"
    assert f"VM {ns}/a ({node.vf(0)}); VM {ns}/b ({node.vf(1)})" in blocked["message"]
    rows = wait_for("policy status lists them", lambda: len(blocked_vms(o, name)) == 2
                    and blocked_vms(o, name))  # fmt: skip
    assert {r["state"] for r in rows.values()} == {"Waiting"}
    # The owners stop a and b (no eviction by hostdev): the change applies by itself.
    node.finish("a", res)
    wait_for("VF 0 restored", lambda: node.driver(node.vf(0)) == "iavf", timeout=TIMEOUT)
    assert node.driver(node.vf(1)) == "vfio-pci"  # b still holds its VF
    node.finish("b", res)
    wait_for("the change applied", lambda: synced(o, node), timeout=TIMEOUT)
    assert node.driver(node.vf(1)) == "iavf" and node.driver(node.vf(2)) == "vfio-pci"
    final = nodestate(o, node)
    assert final["blockers"] == []
    assert {c["type"]: c["status"] for c in final["conditions"]}["Blocked"] == "False"
    assert evictions(kube_apiserver, operator, ns) == []


def test_pdb_that_never_allows_and_livemigrate_vm_are_reported_nothing_else_evicted(
    kube_apiserver: Cluster, operator: OperatorProcess, kube_objects: Objects, node: SimNode
) -> None:
    o, ns, res = kube_objects, node.ns, f"vendor.example/day2-{node.name}"
    name = three_vms(node, o, res, reconfigure="EvictVMs", maxUnavailable=1)
    node.start_vm("a", 0, res, labels={"app": "never"})
    node.start_vm("b", 1, res, strategy="LiveMigrate")  # cannot migrate: it holds a VF
    node.start_vm("c", 2, res)
    pdb(node, "never", {"app": "never"}, allowed=0, minAvailable=1)
    set_selector(o, name, "2-3")
    rows = wait_for("a refused, b not evictable", lambda: (
        (r := blocked_vms(o, name)).get("a", {}).get("state") == "EvictionRefused"
        and r.get("b", {}).get("state") == "NotEvictable" and r), timeout=TIMEOUT)  # fmt: skip
    assert "disruption budget" in rows["a"]["message"]
    assert "evictionStrategy LiveMigrate but cannot live-migrate" in rows["b"]["message"]
    # Refused evictions are retried with back-off: wait for a second attempt, then look.
    wait_for("a retried", lambda: len(evictions(kube_apiserver, operator, ns)) >= 2,
             timeout=TIMEOUT)  # fmt: skip
    tried = evictions(kube_apiserver, operator, ns)
    assert {p for p, _ in tried} == {node.vms["a"].pod} and {c for _, c in tried} == {429}
    assert not any(node.terminating(v) for v in ("a", "b", "c"))
    st = nodestate(o, node)
    assert st["syncStatus"] == "Failed" and len(st["blockers"]) == 2
    cond = {c["type"]: c for c in o.policy(name)["status"]["conditions"]}["Reconfigured"]
    assert cond["status"] == "False" and "disruption budget" in cond["message"]
    assert any(r == "EvictionRefused" for r, _ in policy_events(node, name))


def test_max_unavailable_below_one_is_rejected_with_what_to_fix(
    kube_objects: Objects, kube_namespace: str
) -> None:
    for bad in (0, -3):
        body = {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "PassthroughPolicy",
            "metadata": {"name": f"bad-{kube_namespace}"},
            "spec": {"resourceName": "vendor.example/x", "selector": {"vendors": ["8086"]},
                     "reconfigure": "EvictVMs", "maxUnavailable": bad},
        }  # fmt: skip
        with pytest.raises(k8s.ApiException) as err:
            kube_objects.create_policy(body)
        assert err.value.status == 422
        assert "maxUnavailable must be at least 1" in str(err.value.body)
        assert "set reconfigure: Wait" in str(err.value.body)
    body["spec"].update(maxUnavailable=1, reconfigure="Drain")
    with pytest.raises(k8s.ApiException) as err:
        kube_objects.create_policy(body)
    assert r"spec.reconfigure: Unsupported value: \"Drain\"" in str(err.value.body)


def test_cordon_while_evicting_then_uncordon(
    kube_apiserver: Cluster, operator: OperatorProcess, kube_objects: Objects, node: SimNode
) -> None:
    o, ns, res = kube_objects, node.ns, f"vendor.example/day2-{node.name}"
    name = three_vms(node, o, res, reconfigure="EvictVMs", cordonNodes=True)
    a = node.start_vm("a", 0, res).pod
    node.start_vm("c", 2, res)
    set_selector(o, name, "1-3")  # only VF 0 leaves: a is in the way

    def cordoned() -> k8s.V1Node | None:
        got = node.core.read_node(node.name)
        return got if got.spec.unschedulable else None

    got = wait_for("node cordoned", cordoned, timeout=TIMEOUT)
    assert got.metadata.annotations["hostdev.io/cordoned-for-policy"] == name
    wait_for("a evicted", lambda: (a, 201) in evictions(kube_apiserver, operator, ns),
             timeout=TIMEOUT)  # fmt: skip
    node.finish("a", res)
    wait_for("the change applied", lambda: synced(o, node), timeout=TIMEOUT)
    wait_for("node uncordoned", lambda: not node.core.read_node(node.name).spec.unschedulable,
             timeout=TIMEOUT)  # fmt: skip
    annotations = node.core.read_node(node.name).metadata.annotations or {}
    assert "hostdev.io/cordoned-for-policy" not in annotations
    assert not node.terminating("c")
