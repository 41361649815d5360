"""DRA end to end with real parts: the real kube-apiserver (resource.k8s.io/v1), the hostdev
operator and node agent as processes, the kubelet's own DRA manager and plugin registration
and the scheduler's own structured allocator (dra-harness, k8s.io/kubernetes v1.37.2),
upstream ``devicemetadata`` and KubeVirt v1.9.0's own DRA readers on the metadata file, and the
CDI project's library on the CDI specs.

One node with a GPU + audio function in one IOMMU group (one unit), both on vfio-pci:

policy (allocation DRA) -> operator: NodeState + DeviceClass; agent: ResourceSlice, registration
-> PassthroughRequest -> operator: ResourceClaimTemplate + VM entries -> (virt-controller's and
the resource claim controller's part, done here by hand) launcher pod + claim -> allocator ->
kubelet prepare -> CDI IDs resolve; metadata decoded; KubeVirt finds the unit's address for the
VM's own entries -> the unit leaves vfio-pci -> the pod's allocatedResourcesStatus says
Unhealthy and the slice withdraws it -> a claim for it is refused with the reason, nothing
written -> unprepare removes every file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from hostdev.policy.dra import DRIVER, METADATA_CONTAINER_DIR, device_class
from hostdev.policy.request import Request, VmDevice, apply_to_vm
from hostdev.policy.request_dra import claim_template
from hostdev.testing import scenarios
from hostdev.testing.fakesysfs import FakeHost
from tests.fixtures.dra import RS, agent_argv, allocate_by_hand, create_claim, one_request
from tests.fixtures.draharness import DRAHarness
from tests.fixtures.kube import Cluster
from tests.fixtures.kubevirt import KubeVirtLauncher
from tests.fixtures.operator import GROUP, KV_GROUP, VERSION, Objects, OperatorProcess, wait_for

pytestmark = [pytest.mark.kube, pytest.mark.dra, pytest.mark.kubevirt]

GPU = "example.com/a10"
UNIT = "pci-0000-17-00-0"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hd-", dir="/tmp"))  # unix socket paths: < 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Agent:
    """``hostdev-node`` in cluster mode on the fake host, its kubelet dirs under ``root``."""

    def __init__(self, cluster: Cluster, root: Path, node: str) -> None:
        self.root, self.node = root, node
        self.registry, self.plugins, self.cdi = root / "reg", root / "plugins", root / "cdi"
        self.log = root / "agent.log"
        # inotify on /dev/vfio carries the host changes of this test (no uevents)
        argv = agent_argv(root, cluster.kubeconfig, "--metrics-port=0")
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                argv,
                env={**os.environ, "NODE_NAME": node},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _objects(api: k8s.CustomObjectsApi, plural: str, ns: str | None = None, **kw: Any) -> list[Any]:
    if ns is None:
        out = api.list_cluster_custom_object(*RS, plural, **kw)
    else:
        out = api.list_namespaced_custom_object(*RS, ns, plural, **kw)
    return list(out["items"])


def _launcher_pod(cluster: Cluster, ns: str, vm: dict[str, Any], template: dict[str, Any]) -> str:
    """virt-controller's part: the launcher pod of the VM, with the VM's resource claims; then
    the resource claim controller's: the claim made from the template, owned by the pod and
    recorded in the pod's status. Returns the pod's name."""
    tspec = vm["spec"]["template"]["spec"]
    [pod_claim] = tspec["resourceClaims"]
    name = f"virt-launcher-{vm['metadata']['name']}-abcde"
    core = k8s.CoreV1Api(cluster.admin)
    pod = core.create_namespaced_pod(
        ns,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"kubevirt.io": "virt-launcher"}},
            "spec": {
                "resourceClaims": tspec["resourceClaims"],
                "containers": [
                    {
                        "name": "compute",
                        "image": "virt-launcher",
                        "resources": {"claims": [{"name": pod_claim["name"]}]},
                    }
                ],
            },
        },
    )
    claim = f"{name}-{pod_claim['name']}-{uuid.uuid4().hex[:5]}"
    api = k8s.CustomObjectsApi(cluster.admin)
    spec = template["spec"]["spec"]
    create_claim(api, ns, claim, spec, pod_claim=pod_claim["name"], owner=(name, pod.metadata.uid))
    core.patch_namespaced_pod_status(
        name,
        ns,
        {
            "status": {
                "resourceClaimStatuses": [{"name": pod_claim["name"], "resourceClaimName": claim}]
            }
        },
    )
    return name


def _in_container(cdi_spec: Path, base: Path) -> Path:
    """Bind-mount (copy) the metadata file where the spec puts it, under ``base`` standing for
    /var/run/kubernetes.io/dra-device-attributes."""
    [mount] = json.loads(cdi_spec.read_text())["devices"][0]["containerEdits"]["mounts"]
    rel = Path(mount["containerPath"]).relative_to(METADATA_CONTAINER_DIR)
    (base / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(mount["hostPath"], base / rel)
    return base / rel


def test_dra_from_policy_to_kubevirt_with_real_parts(
    kube_apiserver: Cluster,
    kube_objects: Objects,
    hostdev_operator: OperatorProcess,
    dra_harness: DRAHarness,
    kubevirt_launcher: KubeVirtLauncher,
    kube_namespace: str,
    short_dir: Path,
) -> None:
    ns = kube_namespace
    node = f"dra-{uuid.uuid4().hex[:6]}"
    api = k8s.CustomObjectsApi(kube_apiserver.admin)
    host: FakeHost = scenarios.gpu_with_audio(short_dir / "host")
    kube_objects.create_node(node, {"gpu": node})

    # The kubelet first: at start it wipes the node's slices (drivers publish after it).
    kubelet = dra_harness.kubelet(
        kube_apiserver.kubeconfig, node, short_dir / "reg", short_dir / "kubelet", namespace=ns
    )
    kubelet.wait_event("ready")

    policy_name = f"a10-{node}"
    kube_objects.create_policy(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "PassthroughPolicy",
            "metadata": {"name": policy_name},
            "spec": {
                "resourceName": GPU,
                "allocation": "DRA",
                "nodeSelector": {"matchLabels": {"gpu": node}},
                "selector": {"vendors": ["10de"]},
            },
        }
    )
    # The operator: the DeviceClass and the NodeState with allocation DRA.
    dc = wait_for(
        "DeviceClass",
        lambda: next(
            (d for d in _objects(api, "deviceclasses") if d["metadata"]["name"] == policy_name),
            None,
        ),
    )
    assert dc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "hostdev-operator"
    wait_for("NodeState", lambda: kube_objects.nodestate(node))

    agent = Agent(kube_apiserver, short_dir, node)
    try:
        reg = kubelet.wait_event("registered")
        assert reg["driver"] == DRIVER
        assert reg["endpoint"] == f"{short_dir}/plugins/{DRIVER}/dra.sock"
        assert reg["services"][:2] == ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
        slices = wait_for(
            "the unit published",
            lambda: [
                s
                for s in _objects(api, "resourceslices", field_selector=f"spec.nodeName={node}")
                if s["spec"].get("devices")
            ],
            timeout=60,
        )
        [dev] = slices[0]["spec"]["devices"]
        assert dev["name"] == UNIT
        assert dev["attributes"]["resourceName"] == {"string": GPU}
        assert dev["attributes"]["functions"] == {"int": 2}

        # A VM and a request for one unit of the DRA resource.
        vm_name = "vm1"
        kube_objects.create(
            KV_GROUP,
            "virtualmachines",
            ns,
            {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachine",
                "metadata": {"name": vm_name},
                "spec": {
                    "runStrategy": "Halted",
                    "template": {"spec": {"domain": {"devices": {}}}},
                },
            },
        )
        kube_objects.create(
            GROUP,
            "passthroughrequests",
            ns,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "PassthroughRequest",
                "metadata": {"name": "vm1-gpu"},
                "spec": {
                    "vmName": vm_name,
                    "placement": "gpus",
                    "devices": [{"name": "gpu", "resourceName": GPU}],
                },
            },
        )
        vm = wait_for(
            "VM entries",
            lambda: (
                v
                if (v := kube_objects.vm(ns, vm_name))["spec"]["template"]["spec"].get(
                    "resourceClaims"
                )
                else None
            ),
        )
        tspec = vm["spec"]["template"]["spec"]
        assert tspec["domain"]["devices"]["gpus"] == [
            {"name": "vm1-gpu-gpu-0", "claimName": "vm1-gpu", "requestName": "gpu-0"}
        ]
        assert tspec["resourceClaims"] == [
            {"name": "vm1-gpu", "resourceClaimTemplateName": "vm1-gpu"}
        ]
        [template] = _objects(api, "resourceclaimtemplates", ns)
        assert (
            template["spec"]["spec"]["devices"]["requests"][0]["exactly"]["deviceClassName"]
            == policy_name
        )

        pod = _launcher_pod(kube_apiserver, ns, vm, template)
        statuses = k8s.CoreV1Api(kube_apiserver.admin).read_namespaced_pod(pod, ns).status
        claim = statuses.resource_claim_statuses[0].resource_claim_name
        out = dra_harness.allocate(kube_apiserver.kubeconfig, ns, claim, node, reserve_for_pod=pod)
        assert [d["device"] for d in out["devices"]] == [UNIT]

        kubelet.send(f"prepare {pod}")
        ids = kubelet.wait_event("prepared")["containers"]["compute"]
        claim_uid = api.get_namespaced_custom_object(*RS, ns, "resourceclaims", claim)["metadata"][
            "uid"
        ]
        assert sorted(ids) == sorted(
            [f"{DRIVER}/vfio={claim_uid}-{UNIT}", f"{DRIVER}/metadata={claim_uid}_gpu-0"]
        )
        group = (host.device_dir("0000:17:00.0") / "iommu_group").readlink().name

        # The CDI library: every ID resolves, the edits are what a VFIO VM needs.
        cdi = dra_harness.cdi([agent.cdi], ids)
        assert cdi["specErrors"] == {} and cdi["unresolved"] == []
        merged = cdi["merged"]
        assert {n["path"] for n in merged["deviceNodes"]} == {
            "/dev/vfio/vfio",
            f"/dev/vfio/{group}",
        }
        assert "PCI_RESOURCE_EXAMPLE_COM_A10=0000:17:00.0,0000:17:00.1" in merged["env"]

        # The metadata as the container sees it: upstream's decoder and KubeVirt's readers.
        [meta_spec] = agent.cdi.glob(f"{DRIVER}_metadata_{claim_uid}_*.json")
        base = short_dir / "in-container"
        _in_container(meta_spec, base)
        decoded = dra_harness.metadata(base=base, claim="vm1-gpu", request="gpu-0", template=True)
        assert decoded["devices"][0]["pciBusID"] == "0000:17:00.0"
        vmi = {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": vm_name, "namespace": ns},
            "spec": tspec,  # exactly the VM's entries as the operator wrote them
        }
        kv = kubevirt_launcher.run(vmi, dra_metadata_dir=base)
        assert kv["error"] is None, kv["error"]
        assert [(g["alias"], g["pciAddress"]) for g in kv["gpus"]] == [
            ("ua-dra-gpu-vm1-gpu-gpu-0", "0000:17:00.0")
        ]

        # Health: the unit leaves vfio-pci; the pod's status says so, the slice withdraws it.
        host.bind("0000:17:00.1", "snd_hda_intel")
        host.bind("0000:17:00.0", None)  # /dev/vfio/<group> goes: the agent rescans
        health = kubelet.wait_event("health")
        while not any(
            r["health"] == "Unhealthy"
            for s in health["containers"].get("compute", [])
            for r in s["resources"]
        ):
            health = kubelet.wait_event("health")
        [status] = health["containers"]["compute"]
        assert status["name"] == "claim:vm1-gpu"  # the pod's name of the claim
        [res] = status["resources"]
        # The kubelet names the device by its first CDI ID and passes our reason on.
        assert res["resourceID"] == f"{DRIVER}/vfio={claim_uid}-{UNIT}"
        assert res["health"] == "Unhealthy"
        assert "0000:17:00.0" in res.get("message", ""), res
        wait_for(
            "the unit withdrawn",
            lambda: all(
                not s["spec"].get("devices")
                for s in _objects(api, "resourceslices", field_selector=f"spec.nodeName={node}")
            ),
        )

        # Unprepare: every file of the claim goes.
        kubelet.send(f"unprepare {pod}")
        kubelet.wait_event("unprepared")
        assert os.listdir(agent.cdi) == []
        assert not list((agent.plugins / DRIVER).glob("dra-device-metadata/*"))

        # Bad input: claims allocated by hand (the allocator would not): one for the unit that
        # left vfio-pci, one for another node's pool. Refused with the reason, nothing written.
        bad = _bad_claims(kube_apiserver, ns, node)
        kubelet.send(f"prepare {bad['stale']}")
        err = kubelet.wait_event("error")
        assert "0000:17:00.0 is bound to no driver, not vfio-pci" in err["message"], err
        kubelet.send(f"prepare {bad['foreign']}")
        err = kubelet.wait_event("error")
        assert "not this node's pool" in err["message"], err
        assert os.listdir(agent.cdi) == []
        assert not list((agent.plugins / DRIVER).glob("dra-device-metadata/*"))

        # The request goes: exactly its VM entries, its claim entry and its template go too.
        kube_objects.delete(GROUP, "passthroughrequests", ns, "vm1-gpu")
        wait_for(
            "the VM without the request's entries",
            lambda: (
                "resourceClaims" not in kube_objects.vm(ns, vm_name)["spec"]["template"]["spec"]
            ),
        )
        assert (
            "gpus"
            not in kube_objects.vm(ns, vm_name)["spec"]["template"]["spec"]["domain"]["devices"]
        )
        wait_for("the template deleted", lambda: not _objects(api, "resourceclaimtemplates", ns))
    except BaseException:
        print(agent.text()[-6000:])
        raise
    finally:
        agent.stop()


def _bad_claims(cluster: Cluster, ns: str, node: str) -> dict[str, str]:
    """Two pods whose claims were allocated by hand (and reserved for them, as the kubelet
    requires): one to this node's unit, which has left vfio-pci since, one to a device of
    another node's pool."""
    api = k8s.CustomObjectsApi(cluster.admin)
    core = k8s.CoreV1Api(cluster.admin)
    out = {}
    for kind, pool in (("stale", node), ("foreign", f"{node}-other")):
        name = f"{kind}-{uuid.uuid4().hex[:5]}"
        create_claim(api, ns, name, one_request("gpu"))
        pod = core.create_namespaced_pod(
            ns,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name},
                "spec": {
                    "resourceClaims": [{"name": "gpu", "resourceClaimName": name}],
                    "containers": [
                        {"name": "c", "image": "x", "resources": {"claims": [{"name": "gpu"}]}}
                    ],
                },
            },
        )
        reserved = (name, pod.metadata.uid)
        allocate_by_hand(api, ns, name, "gpu", pool, UNIT, node=node, reserved_for=reserved)
        out[kind] = name
    return out


def test_agent_killed_between_prepare_and_unprepare_loses_nothing(
    kube_apiserver: Cluster,
    kube_objects: Objects,
    dra_harness: DRAHarness,
    kubevirt_launcher: KubeVirtLauncher,
    kube_namespace: str,
    short_dir: Path,
) -> None:
    """No operator here: its pure functions make the same objects (DeviceClass, NodeState
    spec, template, VM entries) with placement hostDevices. The agent is SIGKILLed after the
    claim is prepared; the new agent answers the kubelet's repeated prepare from its
    checkpoint and removes every file at unprepare."""
    ns, node = kube_namespace, f"dra-{uuid.uuid4().hex[:6]}"
    api = k8s.CustomObjectsApi(kube_apiserver.admin)
    scenarios.gpu_with_audio(short_dir / "host")
    kube_objects.create_node(node, {})
    cls = f"a10-{node}"
    kube_apiserver.apply(device_class(cls, GPU, labels={"hostdev.io/test": "yes"}))
    kube_objects.cleanup.append(lambda: api.delete_cluster_custom_object(*RS, "deviceclasses", cls))
    api.create_cluster_custom_object(
        GROUP,
        VERSION,
        "passthroughnodestates",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "PassthroughNodeState",
            "metadata": {"name": node},
            "spec": {
                "devices": [
                    {"selector": {"vendors": ["10de"]}, "resourceName": GPU, "allocation": "DRA"}
                ]
            },
        },
    )
    kube_objects.nodes.append(node)  # its NodeState is removed at cleanup
    kubelet = dra_harness.kubelet(
        kube_apiserver.kubeconfig, node, short_dir / "reg", short_dir / "kubelet", namespace=ns
    )
    kubelet.wait_event("ready")
    req = Request.from_object(
        {
            "metadata": {"name": "vm2-gpu", "namespace": ns},
            "spec": {"vmName": "vm2", "devices": [{"name": "gpu", "resourceName": GPU}]},
        }
    )
    devices = (VmDevice("vm2-gpu-gpu-0", GPU, cls, "gpu-0"),)
    template = claim_template(ns, req.name, None, devices, {})
    kube_apiserver.apply(template, ns)
    vm = {"metadata": {"name": "vm2"}, "spec": {"template": {"spec": {"domain": {"devices": {}}}}}}
    patch = apply_to_vm(vm, req, devices, None).patch
    assert patch is not None
    vm = {"metadata": {"name": "vm2"}, "spec": patch["spec"]}

    agent = Agent(kube_apiserver, short_dir, node)
    try:
        kubelet.wait_event("registered")
        pod = _launcher_pod(kube_apiserver, ns, vm, template)
        claim = k8s.CoreV1Api(kube_apiserver.admin).read_namespaced_pod(pod, ns)
        claim_name = claim.status.resource_claim_statuses[0].resource_claim_name
        dra_harness.allocate(kube_apiserver.kubeconfig, ns, claim_name, node, reserve_for_pod=pod)
        kubelet.send(f"prepare {pod}")
        ids = kubelet.wait_event("prepared")["containers"]["compute"]
        files = sorted(p.name for p in agent.cdi.iterdir())
        assert len(files) == 2 and len(list((short_dir / "state/dra/claims").iterdir())) == 1

        agent.proc.kill()  # SIGKILL: nothing saved at exit, the sockets are left behind
        agent.proc.wait()
        agent = Agent(kube_apiserver, short_dir, node)
        # Its new registration socket makes the plugin watcher register it again.
        kubelet.wait_event("registered")
        kubelet.send(f"prepare {pod}")  # the kubelet asks again (e.g. after its own restart)
        assert kubelet.wait_event("prepared")["containers"]["compute"] == ids
        assert sorted(p.name for p in agent.cdi.iterdir()) == files

        [meta_spec] = agent.cdi.glob(f"{DRIVER}_metadata_*.json")
        base = short_dir / "in-container"
        _in_container(meta_spec, base)
        vmi = {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": "vm2", "namespace": ns},
            "spec": vm["spec"]["template"]["spec"],
        }
        kv = kubevirt_launcher.run(vmi, dra_metadata_dir=base)
        assert kv["error"] is None, kv["error"]
        assert [(d["alias"], d["pciAddress"]) for d in kv["hostDevices"]] == [
            ("ua-dra-hostdevice-vm2-gpu-gpu-0", "0000:17:00.0")
        ]

        kubelet.send(f"unprepare {pod}")
        kubelet.wait_event("unprepared")
        assert list(agent.cdi.iterdir()) == []
        assert list((short_dir / "state/dra/claims").iterdir()) == []
    except BaseException:
        print(agent.text()[-6000:])
        raise
    finally:
        agent.stop()
