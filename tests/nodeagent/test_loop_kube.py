"""The node agent's NodeState loop against a real kube-apiserver (tier 4), a fake host tree run
by the simulated kernel (writes take effect), a fake kubelet PodResources server on a real
unix socket, and a recording device-plugin manager."""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes import client as k8s

from hostdev.deviceplugin.api.podresources.v1 import api_pb2, api_pb2_grpc
from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.deviceplugin.nodestate.allocations import KubeletAllocations
from hostdev.deviceplugin.nodestate.kube import GROUP, PLURAL, VERSION, LauncherPods
from hostdev.deviceplugin.nodestate.kube import NodeStateClient as _NodeStateClient
from hostdev.deviceplugin.nodestate.loop import LoopSettings, NodeStateLoop
from hostdev.deviceplugin.nodestate.sync import Syncer
from hostdev.deviceplugin.podresources import PodResourcesClient
from hostdev.host import PciAddress, Sysfs
from hostdev.policy.runs import expand
from hostdev.testing import scenarios
from hostdev.testing.fakekernel import FakeKernel
from tests.chart.helmtool import find, render
from tests.fixtures.kube import Cluster, light_client, wait_allowed

pytestmark = pytest.mark.kube

A = PciAddress.parse
PF = "0000:3b:00.0"
RES = "example.com/e810-vf"
TIMEOUT = 60.0


class CountingClient(_NodeStateClient):
    """The real client, counting status PATCH calls (the thing 'only on change' is about)."""

    patches = 0

    def patch_status(self, status: Mapping[str, Any]) -> Mapping[str, Any]:
        self.patches += 1
        return super().patch_status(status)


class RecordingManager:
    def __init__(self) -> None:
        self.applies: list[dict[str, tuple[PciAddress, ...]]] = []

    def apply(
        self, resources: Mapping[str, tuple[PciAddress, ...]], dra: frozenset[str] = frozenset()
    ) -> None:
        self.applies.append(dict(resources))


class FakeKubelet(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self) -> None:
        self.pods: list[api_pb2.PodResources] = []
        self.socket = ""

    def List(
        self, request: api_pb2.ListPodResourcesRequest, context: grpc.ServicerContext
    ) -> api_pb2.ListPodResourcesResponse:
        return api_pb2.ListPodResourcesResponse(pod_resources=self.pods)


@contextmanager
def fake_kubelet() -> Iterator[FakeKubelet]:
    """A PodResources server on a real unix socket (``.socket``) answering with ``.pods``."""
    sockdir = tempfile.mkdtemp(prefix="podres-", dir="/tmp")  # short: unix socket paths
    kubelet = FakeKubelet()
    kubelet.socket = f"{sockdir}/kubelet.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(kubelet, server)
    server.add_insecure_port(f"unix://{kubelet.socket}")
    server.start()
    try:
        yield kubelet
    finally:
        server.stop(None).wait()
        Path(kubelet.socket).unlink(missing_ok=True)
        Path(sockdir).rmdir()


@dataclass
class Agent:
    name: str
    crd: k8s.CustomObjectsApi
    client: CountingClient
    manager: RecordingManager
    loop: NodeStateLoop
    sysfs: Sysfs
    kubelet: FakeKubelet

    def obj(self) -> dict[str, Any]:
        got: dict[str, Any] = self.crd.get_cluster_custom_object(GROUP, VERSION, PLURAL, self.name)  # type: ignore[assignment]
        return got

    def wait(self, what: str, ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        obj = self.obj()
        while not ok(obj):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; status now: {obj.get('status')}")
            time.sleep(0.1)
            obj = self.obj()
        return obj

    def wait_synced(self, generation: int, state: str) -> dict[str, Any]:
        def ok(o: dict[str, Any]) -> bool:
            st = o.get("status") or {}
            return bool(
                st.get("observedGeneration") == generation and st.get("syncStatus") == state
            )

        return self.wait(f"generation {generation} {state}", ok)

    def wait_loop(self, what: str, ok: Callable[[], bool]) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not ok():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.05)

    def wait_quiet(self) -> None:
        """Until no status write is pending or in flight and the loop has handled the object
        as it is now (so the watch event of our own last write has been seen)."""

        def quiet() -> bool:
            if not self.loop.writer.idle:
                return False
            version = str(self.obj()["metadata"]["resourceVersion"])
            return self.loop.handled_version == version and self.loop.writer.idle

        self.wait_loop("the loop to be quiet", quiet)

    def patch_spec(self, spec: dict[str, Any]) -> int:
        got: dict[str, Any] = self.crd.patch_cluster_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, PLURAL, self.name, {"spec": spec}
        )
        generation: int = got["metadata"]["generation"]
        return generation


def spec(num_vfs: int, last_vf: int) -> dict[str, Any]:
    return {
        "pfs": [{"pciAddress": PF, "numVfs": num_vfs}],
        "devices": [{"selector": {"pfNames": [f"ens1f0#0-{last_vf}"]}, "resourceName": RES}],
    }


def chart_agent_identity(cluster: Cluster, name: str) -> k8s.ApiClient:
    """A user holding exactly the Helm chart's agent ClusterRole (least privilege)."""
    role = find(render(), "ClusterRole", "-agent")
    role["metadata"] = {"name": f"agent-{name}"}
    rbac = k8s.RbacAuthorizationV1Api(cluster.admin)
    rbac.create_cluster_role(role)
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": f"agent-{name}"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": f"agent-{name}",
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": f"agent-{name}"}
            ],
        }
    )
    api = cluster.api_client(user=f"agent-{name}")
    # RBAC reaches the authorizer's cache a moment after the binding is created.
    for resource, sub, verb in (
        ("pods", "", "list"),
        ("passthroughnodestates", "", "watch"),
        ("passthroughnodestates", "status", "patch"),
    ):
        group = "" if resource == "pods" else GROUP
        wait_allowed(api, verb, resource, group=group, subresource=sub)
    return api


@pytest.fixture
def agent(
    kube_apiserver: Cluster, kube_namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Agent]:
    host = scenarios.sriov_nic_dual_socket(tmp_path / "host", numvfs=0)
    kernel = FakeKernel(host, vf_drivers={PF: "iavf"})
    sysfs = Sysfs(str(tmp_path / "host"))
    name = f"node-{uuid.uuid4().hex[:8]}"
    api = kube_apiserver.api_client()
    # The loop's own identity: admin, or (param "chart-rbac") only what the chart grants.
    identity = getattr(request, "param", "admin")
    agent_api = chart_agent_identity(kube_apiserver, name) if identity == "chart-rbac" else api
    crd = k8s.CustomObjectsApi(api)
    crd.create_cluster_custom_object(
        GROUP,
        VERSION,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "PassthroughNodeState",
            "metadata": {"name": name},
            "spec": spec(2, 1),
        },
    )
    # A virt-launcher pod on this node, as KubeVirt makes it (labels, annotation, owner).
    k8s.CoreV1Api(api).create_namespaced_pod(
        kube_namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "virt-launcher-db-abcde",
                "labels": {"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": "uid-1"},
                "annotations": {"kubevirt.io/domain": "db"},
            },
            "spec": {
                "nodeName": name,
                "containers": [{"name": "compute", "image": "registry.invalid/launcher"}],
            },
        },
    )
    light = light_client(agent_api)
    with fake_kubelet() as kubelet:
        client = CountingClient(light, name)
        manager = RecordingManager()
        loop = NodeStateLoop(
            client,
            Syncer(sysfs, DriverMemory(str(tmp_path / "state")), io=kernel, settle=1.0),
            manager,
            allocations=KubeletAllocations(
                PodResourcesClient(kubelet.socket), LauncherPods(light, name)
            ),
            settings=LoopSettings(
                coalesce=0.3, resync=3600, allocations_every=0.2, watch_timeout=2
            ),
        )
        stop = threading.Event()
        thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
        thread.start()
        try:
            yield Agent(name, crd, client, manager, loop, sysfs, kubelet)
        finally:
            stop.set()
            thread.join(15)
            light.close()  # after the loop's last status write; ends its blocked watch too
            crd.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
            if agent_api is not api:
                agent_api.close()
            api.close()
    assert not thread.is_alive(), "the loop did not stop"


def vfs(*indexes: int) -> tuple[PciAddress, ...]:
    return tuple(A(f"0000:3b:02.{i}") for i in indexes)


def by_addr(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["pciAddress"]: d for d in expand(status["devices"])}


@pytest.mark.parametrize("agent", ["admin", "chart-rbac"], indirect=True)
def test_loop_applies_spec_reports_status_and_allocations(agent: Agent) -> None:
    obj = agent.wait_synced(1, "Succeeded")
    st = obj["status"]
    # The kernel did it: two VFs, both on vfio-pci.
    inv = agent.sysfs.discover()
    assert inv.devices[A(PF)].sriov_numvfs == 2
    assert all(inv.devices[a].driver == "vfio-pci" for a in vfs(0, 1))
    # The plugins were told once, with exactly those devices.
    assert agent.manager.applies == [{RES: vfs(0, 1)}]
    # Status: IOMMU facts, inventory with per-device state.
    assert st["iommu"]["enabled"] is True and st["iommu"]["vfioReady"] is True
    devs = by_addr(st)
    assert st["deviceCount"] == len(devs)
    assert devs[PF]["numVfs"] == 2 and devs[PF]["totalVfs"] == 64
    for a in ("0000:3b:02.0", "0000:3b:02.1"):
        assert devs[a]["driver"] == "vfio-pci"
        assert devs[a]["resourceName"] == RES and devs[a]["health"] == "Healthy"
        assert devs[a]["physfn"] == PF
    assert st["lastError"] == "" and st["lastSyncTime"]
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds == {
        "IommuReady": "True",
        "Synced": "True",
        "InventoryComplete": "True",
        "MultiFunctionUnits": "False",  # one VF per unit
    }
    assert st["allocations"] == []

    # The kubelet hands VF 1 to the VM's launcher pod: the report says so, with the VMI.
    ns = _launcher_namespace(agent)
    agent.kubelet.pods = [
        api_pb2.PodResources(
            namespace=ns,
            name="virt-launcher-db-abcde",
            containers=[
                api_pb2.ContainerResources(
                    name="compute",
                    devices=[
                        api_pb2.ContainerDevices(resource_name=RES, device_ids=["0000:3b:02.1"])
                    ],
                )
            ],
        )
    ]
    obj = agent.wait("the allocation report", lambda o: bool(o["status"].get("allocations")))
    assert obj["status"]["allocations"] == [
        {
            "pciAddress": "0000:3b:02.1",
            "resourceName": RES,
            "namespace": ns,
            "pod": "virt-launcher-db-abcde",
            "container": "compute",
            "vmi": "db",
        }
    ]
    assert obj["status"]["allocationCount"] == 1


def _launcher_namespace(agent: Agent) -> str:
    pods = agent.loop.allocation_source.pods  # type: ignore[union-attr]
    keys = list(pods.vmis())
    assert len(keys) == 1, keys
    ns: str = keys[0][0]
    return ns


def test_unchanged_status_is_not_rewritten(agent: Agent) -> None:
    agent.wait_synced(1, "Succeeded")
    agent.wait_quiet()  # the last batch is out and the loop has seen it come back
    before = agent.client.patches
    assert before >= 1
    writes = agent.loop.writer.writes
    # Health and allocations are re-read every 0.2 s, the watch is renewed every 2 s: nothing
    # on the node changes meanwhile, so ten refreshes and two watch renewals write nothing.
    refreshes, rounds = agent.loop.refreshes, agent.loop.watch_rounds
    agent.wait_loop(
        "10 refreshes and 2 watch renewals",
        lambda: agent.loop.refreshes >= refreshes + 10 and agent.loop.watch_rounds >= rounds + 2,
    )
    assert agent.loop.writer.idle
    assert agent.client.patches == before
    assert agent.loop.writer.writes == writes
    assert agent.loop.syncs == 1


def test_spec_change_applies_once_and_refusal_changes_nothing(agent: Agent) -> None:
    agent.wait_synced(1, "Succeeded")
    assert agent.loop.syncs == 1

    gen = agent.patch_spec(spec(3, 2))
    assert gen == 2
    st = agent.wait_synced(2, "Succeeded")["status"]
    assert agent.loop.syncs == 2  # exactly one new sync for one spec change
    assert agent.manager.applies == [{RES: vfs(0, 1)}, {RES: vfs(0, 1, 2)}]
    assert by_addr(st)["0000:3b:02.2"]["resourceName"] == RES
    assert agent.sysfs.discover().devices[A(PF)].sriov_numvfs == 3

    # A status-only change (ours) is not a spec change: once the loop has seen the object as
    # our last status write left it, still 2 syncs.
    agent.wait_quiet()
    assert agent.loop.syncs == 2

    # 100 VFs on a PF that supports 64: refused, with the reason; nothing changes.
    gen = agent.patch_spec(spec(100, 2))
    st = agent.wait_synced(gen, "Failed")["status"]
    assert "numVfs 100 is above sriov_totalvfs 64" in st["lastError"]
    assert "refused to set numVfs 100" in by_addr(st)[PF]["message"]
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Synced"]["status"] == "False" and "sriov_totalvfs" in conds["Synced"]["message"]
    inv = agent.sysfs.discover()
    assert inv.devices[A(PF)].sriov_numvfs == 3
    assert all(inv.devices[a].driver == "vfio-pci" for a in vfs(0, 1, 2))
    assert len(agent.manager.applies) == 2  # the plugins keep serving what they serve
    assert agent.loop.syncs == 3


def test_vmi_names_come_back_once_pods_may_be_listed(
    kube_apiserver: Cluster, kube_namespace: str
) -> None:
    node = f"node-{uuid.uuid4().hex[:8]}"
    k8s.CoreV1Api(kube_apiserver.admin).create_namespaced_pod(
        kube_namespace,
        {
            "metadata": {
                "name": "virt-launcher-web-xyz12",
                "labels": {"kubevirt.io": "virt-launcher"},
                "annotations": {"kubevirt.io/domain": "web"},
            },
            "spec": {"nodeName": node, "containers": [{"name": "compute", "image": "x.invalid/l"}]},
        },
    )
    user = f"agent-{node}"
    api = kube_apiserver.api_client(user=user)
    light = light_client(api)
    pods = LauncherPods(light, node, denied_retry=0.0)
    try:
        assert pods.vmis() == {} and not pods.allowed  # no RBAC yet: names unknown, no error
        rbac = k8s.RbacAuthorizationV1Api(kube_apiserver.admin)
        rbac.create_cluster_role(
            {
                "metadata": {"name": user},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
            }
        )
        rbac.create_cluster_role_binding(
            {
                "metadata": {"name": user},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": user,
                },
                "subjects": [
                    {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}
                ],
            }
        )
        wait_allowed(api, "list", "pods")
        assert pods.vmis() == {(kube_namespace, "virt-launcher-web-xyz12"): "web"}
        assert pods.allowed
    finally:
        light.close()
        api.close()
