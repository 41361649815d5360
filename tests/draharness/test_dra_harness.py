"""The DRA harness itself (tests/tools/dra-harness), on inputs that need no DRA driver: the
upstream Go writer's reference files (tests/data/dra/), hand-made ResourceSlices on the real
kube-apiserver, and the kubelet DRA manager's plumbing. The driver's own tests use the same
fixtures against hostdev's kubelet plugin."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes.dynamic.exceptions import NotFoundError

from tests.fixtures.draharness import NO_FIT, DRAHarness, DRAHarnessError
from tests.fixtures.kube import Cluster
from tests.fixtures.kubevirt import KubeVirtLauncher, vmi

REF = Path(__file__).parent.parent / "data" / "dra"
DRIVER = "pci.hostdev.io"
HOST_DATA = "var/lib/kubelet/plugins/pci.hostdev.io/dra-device-metadata"
PCI = "0000:17:00.0"


def _ref_metadata(case: str) -> Path:
    """The host-side metadata file the upstream writer made for ``case``."""
    [path] = (REF / case / HOST_DATA).glob("*/gpu/metadata.json")
    return path


def _cdi_id(case: str) -> str:
    return (REF / case / "cdi-id").read_text().strip()


def _in_container(case: str, base: Path) -> None:
    """Put the file where the CDI spec's bind mount puts it in the container, under ``base``
    (standing for /var/run/kubernetes.io/dra-device-attributes)."""
    [spec] = (REF / case / "var/run/cdi").glob("*.json")
    [mount] = json.loads(spec.read_text())["devices"][0]["containerEdits"]["mounts"]
    rel = Path(mount["containerPath"]).relative_to("/var/run/kubernetes.io/dra-device-attributes")
    (base / rel).parent.mkdir(parents=True)
    shutil.copy(_ref_metadata(case), base / rel)


def _dra_vmi(claim: dict[str, str], entry: str) -> dict[str, Any]:
    dev = [{"name": "dev0", "claimName": "gpu", "requestName": "gpu"}]
    kw: dict[str, Any] = {"gpus": dev} if entry == "gpus" else {"host_devices": dev}
    return vmi(resource_claims=[{"name": "gpu", **claim}], **kw)


@pytest.mark.dra
@pytest.mark.parametrize("case", ["claim", "template"])
def test_reference_metadata_decoded_by_upstream(dra_harness: DRAHarness, case: str) -> None:
    out = dra_harness.metadata(file=_ref_metadata(case))
    # The writer puts the newest version first; the decoder takes the first it knows.
    assert out["decodedFrom"] == "metadata.resource.k8s.io/v1beta1"
    assert out["devices"] == [
        {
            "request": "gpu",
            "driver": DRIVER,
            "pool": "node-1",
            "name": "pci-0000-17-00-0",
            "pciBusID": PCI,
        }
    ]
    assert (out["metadata"].get("podClaimName") is not None) == (case == "template")


@pytest.mark.dra
def test_metadata_dir_layout_and_bad_files(dra_harness: DRAHarness, tmp_path: Path) -> None:
    _in_container("template", tmp_path)
    out = dra_harness.metadata(base=tmp_path, claim="gpu", request="gpu", template=True)
    assert out["devices"][0]["pciBusID"] == PCI
    with pytest.raises(DRAHarnessError, match="0 metadata files"):
        dra_harness.metadata(base=tmp_path, claim="gpu", request="gpu")  # not a direct claim
    bad = tmp_path / "bad.json"
    bad.write_text('{"apiVersion": "metadata.resource.k8s.io/v1alpha1", "kind": "Nope"}\n')
    with pytest.raises(DRAHarnessError) as e:
        dra_harness.metadata(file=bad)
    assert e.value.returncode == 1 and "bad.json" in str(e.value)


@pytest.mark.dra
@pytest.mark.kubevirt
@pytest.mark.parametrize("entry", ["gpus", "hostDevices"])
@pytest.mark.parametrize(
    ("case", "claim"),
    [
        ("claim", {"resourceClaimName": "gpu-claim"}),
        ("template", {"resourceClaimTemplateName": "gpu-template"}),
    ],
)
def test_reference_metadata_read_by_kubevirt(
    kubevirt_launcher: KubeVirtLauncher,
    tmp_path: Path,
    case: str,
    claim: dict[str, str],
    entry: str,
) -> None:
    _in_container(case, tmp_path)
    out = kubevirt_launcher.run(_dra_vmi(claim, entry), dra_metadata_dir=tmp_path)
    assert out["error"] is None, out["error"]
    prefix = "ua-dra-gpu-" if entry == "gpus" else "ua-dra-hostdevice-"
    assert [(d["alias"], d["type"], d["pciAddress"]) for d in out[entry]] == [
        (prefix + "dev0", "pci", PCI)
    ]


@pytest.mark.dra
@pytest.mark.kubevirt
def test_kubevirt_refuses_a_v1beta1_only_stream(
    kubevirt_launcher: KubeVirtLauncher, tmp_path: Path
) -> None:
    """KubeVirt 1.9 reads only metadata.resource.k8s.io/v1alpha1: a driver must keep writing
    it (after v1beta1) or VMs cannot start."""
    _in_container("v1beta1-only", tmp_path)
    out = kubevirt_launcher.run(
        _dra_vmi({"resourceClaimName": "gpu-claim"}, "gpus"), dra_metadata_dir=tmp_path
    )
    assert out["error"]["stage"] == "dra.CreateDRAGPUHostDevices"
    assert (
        "no compatible metadata version found in stream (unknown versions: "
        in (out["error"]["message"])
    )


@pytest.mark.dra
def test_reference_cdi_spec_resolved(dra_harness: DRAHarness, tmp_path: Path) -> None:
    cdi_dir = REF / "claim" / "var/run/cdi"
    out = dra_harness.cdi([cdi_dir], [_cdi_id("claim")])
    assert out["specErrors"] == {} and out["unresolved"] == []
    [mount] = out["merged"]["mounts"]
    assert mount["containerPath"] == (
        "/var/run/kubernetes.io/dra-device-attributes/resourceclaims/gpu-claim/gpu/"
        "pci.hostdev.io-metadata.json"
    )
    assert mount["options"] == ["ro", "bind"]

    with pytest.raises(DRAHarnessError) as e:
        dra_harness.cdi([cdi_dir], [_cdi_id("claim"), f"{DRIVER}/pci=nope"])
    assert e.value.output is not None
    assert e.value.output["unresolved"] == [f"{DRIVER}/pci=nope"]

    (tmp_path / "broken.json").write_text('{"cdiVersion": "0.6.0", "kind": "x", "devices": []}')
    with pytest.raises(DRAHarnessError) as e:
        dra_harness.cdi([tmp_path], [f"{DRIVER}/pci=any"])
    assert e.value.output is not None
    assert list(e.value.output["specErrors"]) == [str(tmp_path / "broken.json")]


# ---- allocate: the scheduler's allocator on the real API server ---------------------------


def _slice(node: str, devices: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{node}-{DRIVER}"},
        "spec": {
            "driver": DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [
                {
                    "name": name,
                    "attributes": {
                        "resource.kubernetes.io/pciBusID": {"string": name[4:].replace("-", ":")},
                        f"{DRIVER}/resourceName": {"string": "example.com/a10"},
                    },
                }
                for name in devices
            ],
        },
    }


def _claim(name: str, device_class: str) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name},
        "spec": {
            "devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": device_class}}]}
        },
    }


def _pod(name: str, claim: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "resourceClaims": [{"name": "gpu", "resourceClaimName": claim}],
            "containers": [
                {
                    "name": "compute",
                    "image": "virt-launcher",
                    "resources": {"claims": [{"name": "gpu"}]},
                }
            ],
        },
    }


@pytest.fixture
def dra_node(kube_apiserver: Cluster) -> Any:
    """A Node object with a slice of two devices and a DeviceClass selecting them."""
    node = f"n-{uuid.uuid4().hex[:8]}"
    cls = f"a10-{node}"
    kube_apiserver.apply(
        [
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}},
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "DeviceClass",
                "metadata": {"name": cls},
                "spec": {
                    "selectors": [
                        {
                            "cel": {
                                "expression": f'device.driver == "{DRIVER}" && '
                                f'device.attributes["{DRIVER}"].resourceName == "example.com/a10"'
                            }
                        }
                    ]
                },
            },
            _slice(node, ["pci-0000-17-00-0", "pci-0000-18-00-0"]),
        ]
    )
    yield node, cls
    for api, kind, name in (
        ("resource.k8s.io/v1", "ResourceSlice", f"{node}-{DRIVER}"),
        ("resource.k8s.io/v1", "DeviceClass", cls),
        ("v1", "Node", node),
    ):
        with contextlib.suppress(NotFoundError):
            kube_apiserver.resource(api, kind).delete(name=name)


@pytest.mark.dra
@pytest.mark.kube
def test_allocate_writes_the_schedulers_result(
    dra_harness: DRAHarness, kube_apiserver: Cluster, kube_namespace: str, dra_node: Any
) -> None:
    node, cls = dra_node
    ns = kube_namespace
    kube_apiserver.apply(
        [_claim("c1", cls), _claim("c2", cls), _claim("c3", cls), _pod("vm1", "c1")], ns
    )
    kc = kube_apiserver.kubeconfig

    first = dra_harness.allocate(kc, ns, "c1", node, reserve_for_pod="vm1")
    second = dra_harness.allocate(kc, ns, "c2", node)
    got = {first["devices"][0]["device"], second["devices"][0]["device"]}
    assert got == {"pci-0000-17-00-0", "pci-0000-18-00-0"}  # never the same device twice
    assert first["devices"][0] | {"device": "x"} == {
        "request": "gpu",
        "driver": DRIVER,
        "pool": node,
        "device": "x",
    }

    claims = kube_apiserver.resource("resource.k8s.io/v1", "ResourceClaim")
    c1 = claims.get(name="c1", namespace=ns).to_dict()
    assert c1["metadata"]["finalizers"] == ["resource.kubernetes.io/delete-protection"]
    assert (
        c1["status"]["allocation"]["devices"]["results"]
        == first["allocation"]["devices"]["results"]
    )
    terms = c1["status"]["allocation"]["nodeSelector"]["nodeSelectorTerms"]
    assert terms[0]["matchFields"] == [{"key": "metadata.name", "operator": "In", "values": [node]}]
    vm1 = kube_apiserver.resource("v1", "Pod").get(name="vm1", namespace=ns)
    assert c1["status"]["reservedFor"] == [
        {"resource": "pods", "name": "vm1", "uid": vm1.metadata.uid}
    ]

    # Both devices are taken: the third claim does not fit.
    with pytest.raises(DRAHarnessError) as e:
        dra_harness.allocate(kc, ns, "c3", node, timeout=1)
    assert e.value.returncode == NO_FIT
    assert e.value.output is not None and e.value.output["allocated"] is False
    # An allocated claim is not allocated again.
    with pytest.raises(DRAHarnessError, match="already allocated"):
        dra_harness.allocate(kc, ns, "c1", node, timeout=1)


@pytest.mark.dra
@pytest.mark.kube
def test_allocate_refuses_a_claim_of_a_missing_class(
    dra_harness: DRAHarness, kube_apiserver: Cluster, kube_namespace: str, dra_node: Any
) -> None:
    node, _ = dra_node
    kube_apiserver.apply([_claim("orphan", "no-such-class")], kube_namespace)
    with pytest.raises(DRAHarnessError, match='DeviceClass "no-such-class" does not exist') as e:
        dra_harness.allocate(kube_apiserver.kubeconfig, kube_namespace, "orphan", node)
    assert e.value.returncode == 1

    # A selector that fails at run time: no fit, and the allocator's reason is passed on.
    bad = f"bad-cel-{node}"
    kube_apiserver.apply(
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": bad},
            "spec": {
                "selectors": [{"cel": {"expression": f'device.attributes["{DRIVER}"].nope == "x"'}}]
            },
        }
    )
    try:
        kube_apiserver.apply([_claim("badcel", bad)], kube_namespace)
        with pytest.raises(DRAHarnessError) as e:
            dra_harness.allocate(
                kube_apiserver.kubeconfig, kube_namespace, "badcel", node, timeout=1
            )
        assert e.value.returncode == NO_FIT and e.value.output is not None
        assert "nope" in e.value.output["reason"], e.value.output
    finally:
        kube_apiserver.resource("resource.k8s.io/v1", "DeviceClass").delete(name=bad)


# ---- kubelet: the kubelet's DRA manager and plugin watcher --------------------------------


@pytest.mark.dra
@pytest.mark.kube
def test_kubelet_manager_starts_like_a_kubelet(
    dra_harness: DRAHarness,
    kube_apiserver: Cluster,
    kube_namespace: str,
    dra_node: Any,
    tmp_path: Path,
) -> None:
    node, _ = dra_node
    kube_apiserver.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "plain"},
                "spec": {"containers": [{"name": "c", "image": "x"}]},
            }
        ],
        kube_namespace,
    )
    run = dra_harness.kubelet(
        kube_apiserver.kubeconfig,
        node,
        tmp_path / "registry",
        tmp_path / "state",
        namespace=kube_namespace,
    )
    run.wait_event("ready")
    # Like a starting kubelet, the manager deletes the node's ResourceSlices (drivers republish
    # after registering).
    slices = kube_apiserver.resource("resource.k8s.io/v1", "ResourceSlice")
    deadline = time.monotonic() + 60
    while True:
        try:
            slices.get(name=f"{node}-{DRIVER}")
        except NotFoundError:
            break
        assert time.monotonic() < deadline, "the kubelet's start-up wipe left the slice"
        time.sleep(0.1)

    run.send("prepare plain")  # no claims: nothing to prepare, no CDI devices
    assert run.wait_event("prepared")["containers"] == {"c": []}
    run.send("status no-such-pod")
    err = run.wait_event("error")
    assert err["command"] == "status no-such-pod" and "not found" in err["message"]
    run.send("unprepare plain")
    run.wait_event("unprepared", pod=f"{kube_namespace}/plain")
    assert run.stop() == 0
