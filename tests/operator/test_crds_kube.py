"""The CRDs in crds/ against the real API server: the examples are valid, and every validation
rule rejects its bad input with the message that says what to fix."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from tests.fixtures.kube import Cluster

pytestmark = pytest.mark.kube

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
POLICY = yaml.safe_load((EXAMPLES / "1-policy.yaml").read_text())
DRA_POLICY = yaml.safe_load((EXAMPLES / "4-dra-policy.yaml").read_text())
DRA_REQUEST = yaml.safe_load((EXAMPLES / "6-dra-request.yaml").read_text())
REQUEST = yaml.safe_load((EXAMPLES / "3-request.yaml").read_text())
MDEV_POLICY = yaml.safe_load((EXAMPLES / "7-mdev-policy.yaml").read_text())
MDEV_NODESTATE = {
    "apiVersion": "hostdev.io/v1alpha1",
    "kind": "PassthroughNodeState",
    "metadata": {"name": "node-m"},
    "spec": {
        "mdevs": [{"resourceName": "a.b/vgpu", "type": "mtty-2", "count": 2, "allocation": "DRA"}]
    },
}
NODESTATE = {
    "apiVersion": "hostdev.io/v1alpha1",
    "kind": "PassthroughNodeState",
    "metadata": {"name": "node-x"},
    "spec": {
        "pfs": [{"pfName": "ens1f0", "numVfs": 8}],
        "devices": [
            {"pciAddress": "0000:3b:02.0", "resourceName": "intel.com/x710-vf"},
            {"selector": {"vendors": ["8086"]}, "driver": "vfio-pci", "resourceName": "a.b/c"},
        ],
    },
}


def create(cluster: Cluster, obj: dict[str, Any], namespace: str) -> None:
    api = k8s.CustomObjectsApi(cluster.admin)
    plural = {
        "PassthroughPolicy": "passthroughpolicies",
        "PassthroughNodeState": "passthroughnodestates",
        "PassthroughRequest": "passthroughrequests",
    }[obj["kind"]]
    if obj["kind"] == "PassthroughRequest":
        api.create_namespaced_custom_object(
            "hostdev.io", "v1alpha1", namespace, plural, obj, dry_run="All"
        )
    else:
        api.create_cluster_custom_object("hostdev.io", "v1alpha1", plural, obj, dry_run="All")


def causes(cluster: Cluster, obj: dict[str, Any], namespace: str) -> list[tuple[str, str]]:
    with pytest.raises(k8s.ApiException) as info:
        create(cluster, obj, namespace)
    assert info.value.status == 422, info.value.body
    body = json.loads(info.value.body)
    return [(c.get("field", ""), c["message"]) for c in body["details"]["causes"]]


@pytest.mark.parametrize(
    "obj",
    [POLICY, REQUEST, NODESTATE, DRA_POLICY, DRA_REQUEST, MDEV_POLICY],
    ids=lambda o: f"{o['kind']}-{o['metadata']['name']}",
)
def test_examples_are_valid(kube_apiserver: Cluster, kube_namespace: str, obj: dict) -> None:
    create(kube_apiserver, obj, kube_namespace)  # raises on rejection


def test_mdev_resources_may_be_served_through_dra(
    kube_apiserver: Cluster, kube_namespace: str
) -> None:
    create(kube_apiserver, edit(MDEV_POLICY, pspec(allocation="DRA")), kube_namespace)
    create(kube_apiserver, MDEV_NODESTATE, kube_namespace)
    bad = edit(MDEV_NODESTATE, lambda o: o["spec"]["mdevs"][0].update(allocation="Both"))
    assert any(
        f == "spec.mdevs[0].allocation" and m.startswith('Unsupported value: "Both"')
        for f, m in causes(kube_apiserver, bad, kube_namespace)
    )


def edit(base: dict[str, Any], fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    obj = copy.deepcopy(base)
    fn(obj)
    return obj


def pspec(**kw: Any) -> Callable[[dict[str, Any]], None]:
    return lambda o: o["spec"].update(kw)


def sel(**kw: Any) -> Callable[[dict[str, Any]], None]:
    return lambda o: o["spec"]["selector"].update(kw)


def dev(**kw: Any) -> Callable[[dict[str, Any]], None]:
    return lambda o: o["spec"]["devices"][0].update(kw)


RULES = [
    # (id, base, edit, field, message the user reads)
    ("resourceName-format", POLICY, pspec(resourceName="x710"), "spec.resourceName",
     "resourceName must be domain/name with a DNS domain that contains a dot (lower-case "
     "letters, digits, '-', '.') and a name of at most 63 letters, digits, '-', '_' or '.', "
     "e.g. vendor.example/fast-nic"),
    ("resourceName-reserved", POLICY, pspec(resourceName="kubernetes.io/gpu"), "spec.resourceName",
     "resourceName must not use the reserved kubernetes.io domain; use your own domain"),
    ("vendor-hex", POLICY, sel(vendors=["0x8086"]), "spec.selector.vendors[0]",
     "vendor ids are exactly 4 hex digits without 0x, e.g. 8086"),
    ("device-hex", POLICY, sel(devices=["15c"]), "spec.selector.devices[0]",
     "device ids are exactly 4 hex digits without 0x, e.g. 154c"),
    ("class", POLICY, sel(classes=["020"]), "spec.selector.classes[0]",
     "classes entries are 2, 4 or 6 hex digits, e.g. 0200"),
    ("pci-address-short", POLICY, sel(pciAddresses=["3b:00.0"]), "spec.selector.pciAddresses[0]",
     "pciAddresses entries must be the full form dddd:bb:dd.f with a 4-digit domain, device "
     "00-1f and function 0-7, e.g. 0000:3b:00.0"),
    ("pfnames-form", POLICY, sel(pfNames=["ens1f0 #0-7"]), "spec.selector.pfNames[0]",
     "pfNames entries are NAME, NAME#N or NAME#FIRST-LAST (e.g. ens1f0#0-7), without spaces"),
    ("pfnames-range", POLICY, sel(pfNames=["ens1f0#5-2"]), "spec.selector.pfNames[0]",
     "pfNames VF range NAME#FIRST-LAST needs FIRST <= LAST, e.g. ens1f0#0-7"),
    ("pfnames-beyond-numvfs", POLICY, sel(pfNames=["ens1f0#0-8"]), "spec",
     "a pfNames VF index (NAME#FIRST-LAST) must be below sriov.numVfs; raise numVfs or shrink "
     "the range"),
    ("sriov-needs-pfnames", POLICY,
     lambda o: o["spec"].update(selector={"vendors": ["8086"]}), "spec",
     "sriov needs selector.pfNames naming the PFs to create VFs on (netdev name or PCI address, "
     "e.g. ens1f0#0-7)"),
    ("empty-selector", POLICY, lambda o: o["spec"].update(selector={}, sriov=None),
     "spec.selector",
     "selector must set at least one of vendors, devices, classes, pciAddresses, pfNames, "
     "numaNodes (an empty selector would claim nothing)"),
    ("numvfs-negative", POLICY, pspec(sriov={"numVfs": -1}, selector={"pfNames": ["ens1f0"]}),
     "spec.sriov.numVfs", "spec.sriov.numVfs in body should be greater than or equal to 0"),
    ("dra-resourceName-length", POLICY,
     pspec(allocation="DRA", resourceName="vendor.example/" + "x" * 50), "spec",
     "with allocation DRA the resourceName is published as a device attribute, whose values hold "
     "at most 64 characters: shorten resourceName"),
    ("nodestate-dra-needs-resource", NODESTATE,
     lambda o: o["spec"]["devices"][1].update(allocation="DRA", resourceName=None),
     "spec.devices[1]", "allocation DRA needs a resourceName to serve"),
    ("driver", POLICY, pspec(driver="ixgbevf"), "spec.driver",
     "driver must be vfio-pci or a vfio-pci variant driver whose name ends in _vfio_pci (e.g. "
     "mlx5_vfio_pci)"),
    ("nodeselector-in-needs-values", POLICY,
     pspec(nodeSelector={"matchExpressions": [{"key": "a", "operator": "In"}]}),
     "spec.nodeSelector.matchExpressions[0]",
     "matchExpressions operators In and NotIn need at least one value; Exists and DoesNotExist "
     "take no values"),
    ("request-both-forms", REQUEST, dev(node="n1", pciAddress="0000:3b:02.0"),
     "spec.devices[0]",
     "a device entry either asks for resourceName (+ count) or pins node + pciAddress, not both"),
    ("request-neither-form", REQUEST,
     lambda o: o["spec"].update(devices=[{"name": "nic", "node": "n1"}]), "spec.devices[0]",
     "a device entry needs resourceName (+ count), or both node and pciAddress to pin one "
     "device"),
    ("request-count-with-pin", REQUEST,
     lambda o: o["spec"].update(
         devices=[{"name": "g", "node": "n1", "pciAddress": "0000:af:00.0", "count": 2}]
     ),
     "spec.devices[0]",
     "count applies only to resourceName entries; a pinned entry is exactly one device"),
    ("request-count-zero", REQUEST, dev(count=0), "spec.devices[0].count",
     "spec.devices[0].count in body should be greater than or equal to 1"),
    ("request-unique-names", REQUEST,
     lambda o: o["spec"]["devices"].append(dict(o["spec"]["devices"][0])), "spec.devices",
     "device entry names must be unique within the request"),
    ("request-pci-address", REQUEST,
     lambda o: o["spec"].update(devices=[{"name": "g", "node": "n1", "pciAddress": "af:00.0"}]),
     "spec.devices[0].pciAddress",
     "pciAddress must be the full form dddd:bb:dd.f with a 4-digit domain, e.g. 0000:3b:00.0"),
    ("request-vmname", REQUEST, pspec(vmName="Fast_VM"), "spec.vmName",
     "vmName must be a DNS label (lower-case letters, digits, '-'), the name of a "
     "VirtualMachine"),
    ("request-entry-name", REQUEST, dev(name="NIC"), "spec.devices[0].name",
     "device name must be a DNS label (lower-case letters, digits, '-'), e.g. gpu"),
    ("mdev-and-selector", MDEV_POLICY, pspec(selector={"vendors": ["10de"]}), "spec",
     "set exactly one of selector (PCI functions) or mdev (mediated-device instances)"),
    ("mdev-no-sriov", MDEV_POLICY, pspec(sriov={"numVfs": 2}), "spec",
     "sriov creates VFs of PCI functions; it does not go with mdev"),
    ("mdev-dra-resource-length", MDEV_POLICY,
     pspec(allocation="DRA", resourceName="example.com/" + "v" * 60), "spec",
     "with allocation DRA the resourceName is published as a device attribute, whose values "
     "hold at most 64 characters: shorten resourceName"),
    ("mdev-count", MDEV_POLICY, lambda o: o["spec"]["mdev"].update(count=-1), "spec.mdev.count",
     "spec.mdev.count in body should be greater than or equal to 0"),
    ("nodestate-pf-one-name", NODESTATE,
     lambda o: o["spec"]["pfs"][0].update(pciAddress="0000:3b:00.0"), "spec.pfs[0]",
     "a pfs entry names its PF by exactly one of pciAddress or pfName"),
    ("nodestate-device-one-form", NODESTATE, lambda o: o["spec"]["devices"][0].pop("pciAddress"),
     "spec.devices[0]",
     "a devices entry names its functions by exactly one of pciAddress or selector"),
]  # fmt: skip


@pytest.mark.parametrize(("base", "change", "field", "message"), [r[1:] for r in RULES],
                         ids=[r[0] for r in RULES])  # fmt: skip
def test_each_rule_rejects_with_its_message(
    kube_apiserver: Cluster,
    kube_namespace: str,
    base: dict[str, Any],
    change: Callable[[dict[str, Any]], None],
    field: str,
    message: str,
) -> None:
    obj = edit(base, change)
    if obj["spec"].get("sriov", 0) is None:
        del obj["spec"]["sriov"]
    got = causes(kube_apiserver, obj, kube_namespace)
    assert len(got) == 1, got
    assert got[0][0] == field
    assert got[0][1].endswith(": " + message), got[0][1]


def test_vmname_is_immutable(kube_apiserver: Cluster, kube_namespace: str) -> None:
    api = k8s.CustomObjectsApi(kube_apiserver.admin)
    api.create_namespaced_custom_object(
        "hostdev.io", "v1alpha1", kube_namespace, "passthroughrequests", copy.deepcopy(REQUEST)
    )
    with pytest.raises(k8s.ApiException) as info:
        api.patch_namespaced_custom_object(
            "hostdev.io", "v1alpha1", kube_namespace, "passthroughrequests",
            REQUEST["metadata"]["name"], {"spec": {"vmName": "other-vm"}},
        )  # fmt: skip
    assert info.value.status == 422
    assert (
        "vmName is immutable; delete this request and create a new one for the other VM"
        in info.value.body
    )


def test_printer_columns_and_short_names(kube_apiserver: Cluster) -> None:
    ext = k8s.ApiextensionsV1Api(kube_apiserver.admin)
    crd = ext.read_custom_resource_definition("passthroughpolicies.hostdev.io")
    assert crd.spec.names.short_names == ["ptp"]
    assert crd.spec.names.categories == ["hostdev"]
    cols = [c.name for c in crd.spec.versions[0].additional_printer_columns]
    assert cols == [
        "Resource", "Allocation", "Priority", "Nodes", "Devices", "Conflicts", "Ready", "Age"
    ]  # fmt: skip
    for name, short in (("passthroughnodestates", "ptns"), ("passthroughrequests", "ptr")):
        assert ext.read_custom_resource_definition(f"{name}.hostdev.io").spec.names.short_names == [
            short
        ]
