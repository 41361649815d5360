"""DRA shapes, pure: names, attributes, slicing, DeviceClass, claim checks, CDI and metadata."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from hostdev.host import PciAddress, Sysfs
from hostdev.host.pciids import PciIds
from hostdev.policy.allocation import AllocUnit, build_units
from hostdev.policy.dra import (
    ATTR_NUMA_NODE,
    ATTR_PCI_BUS_ID,
    ATTR_PCIE_ROOT,
    DRIVER,
    MAX_DEVICES_PER_SLICE,
    ClaimError,
    ClaimRef,
    MetadataDevice,
    PoolEntry,
    PreparedUnit,
    address_of,
    cdi_min_version,
    claim_devices,
    device_class_selector,
    device_name,
    dra_device,
    metadata_container_path,
    metadata_stream,
    plan_slices,
    slice_name,
    string,
    vfio_cdi_spec,
)
from hostdev.policy.gojson import marshal_indent
from hostdev.testing import scenarios

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def test_device_names_are_dns_labels_and_stable() -> None:
    for text in ("0000:3b:02.1", "ffff:ff:1f.7", "0001:00:00.0"):
        a = PciAddress.parse(text)
        name = device_name(a)
        assert DNS_LABEL.match(name), name
        assert address_of(name) == a
    assert device_name(PciAddress.parse("0000:3b:02.1")) == "pci-0000-3b-02-1"
    assert address_of("gpu-0") is None and address_of("pci-0000-3b-02-8") is None


def test_vf_attributes(tmp_path: Path) -> None:
    h = scenarios.sriov_nic_dual_socket(tmp_path, numvfs=4)
    inv = Sysfs(str(tmp_path)).discover()
    vf = h.vf_address("0000:3b:00.1", 2)
    unit = next(u for u in build_units([inv.devices[vf]]))
    ids = PciIds(
        "test", {"8086": "Intel Corporation"}, {("8086", "1889"): "Ethernet Adaptive VF"}, {}
    )
    d = dra_device(unit, "example.com/vf", inv, ids)
    attrs = {k: next(iter(v.values())) for k, v in d.attributes.items()}
    assert d.name == device_name(vf)
    assert attrs == {
        ATTR_PCI_BUS_ID: str(vf),
        ATTR_PCIE_ROOT: f"pci0000:{vf.bus:02x}",
        ATTR_NUMA_NODE: 0,
        "resourceName": "example.com/vf",
        "functions": 1,
        "iommuGroup": unit.group,
        "vendorID": "8086",
        "deviceID": "1889",
        "subsystemVendorID": "8086",
        "subsystemDeviceID": "1889",
        "classCode": inv.devices[vf].class_code,
        "pfPciBusID": "0000:3b:00.1",
        "pfNetdev": "ens1f1",
        "vfIndex": 2,
        "vendor": "Intel Corporation",
        "model": "Ethernet Adaptive VF",
    }
    # Value types as the API wants them: ints are ints, the rest strings of <= 64 bytes.
    assert d.attributes["vfIndex"] == {"int": 2}
    assert len(d.attributes) <= 32


def test_multi_function_unit_and_no_numa(tmp_path: Path) -> None:
    scenarios.gpu_with_audio(tmp_path)
    inv = Sysfs(str(tmp_path)).discover()
    gpu = [inv.devices[PciAddress.parse(a)] for a in ("0000:17:00.0", "0000:17:00.1")]
    (unit,) = build_units(gpu)
    d = dra_device(unit, "example.com/gpu", inv)
    assert d.attributes["functions"] == {"int": 2}
    assert d.attributes[ATTR_PCI_BUS_ID] == {"string": "0000:17:00.0"}
    assert "pfPciBusID" not in d.attributes
    no_numa = AllocUnit("0000:17:00.0", unit.addresses, unit.group, None, None)
    assert ATTR_NUMA_NODE not in dra_device(no_numa, "example.com/gpu", inv).attributes


def test_long_values_are_clipped_to_64_bytes_on_a_character_boundary() -> None:
    assert string("é" * 40) == {"string": "é" * 32}
    assert len(string("x" * 100)["string"].encode()) == 64


def _entries(n: int, unhealthy: set[int] = frozenset()) -> list[PoolEntry]:  # type: ignore[assignment]
    out = []
    for i in range(n):
        a = PciAddress(0, 1 + i // 256, (i // 8) % 32, i % 8)
        u = AllocUnit(str(a), (a,), i, 0, None)
        out.append(PoolEntry(dra_device(u, "example.com/vf", None), i not in unhealthy))
    return out


def test_slices_hold_at_most_128_and_a_withdrawn_unit_changes_one_slice() -> None:
    healthy = plan_slices("node-1", _entries(300))
    assert [len(s.devices) for s in healthy] == [128, 128, 44]
    assert [s.name for s in healthy] == [f"node-1-{DRIVER}-{i}" for i in range(3)]
    one_down = plan_slices("node-1", _entries(300, {5}))
    changed = [i for i, (a, b) in enumerate(zip(healthy, one_down, strict=True)) if a != b]
    assert changed == [0] and len(one_down[0].devices) == 127
    all_down = plan_slices("node-1", _entries(128, set(range(128))))
    assert len(all_down) == 1 and all_down[0].devices == ()  # the slice stays, empty
    assert plan_slices("node-1", []) == ()
    spec = healthy[2].spec("node-1", 7, 3)
    assert spec["pool"] == {"name": "node-1", "generation": 7, "resourceSliceCount": 3}
    assert spec["nodeName"] == "node-1" and spec["driver"] == DRIVER
    assert MAX_DEVICES_PER_SLICE == 128


def test_slice_names_fit_for_long_node_names() -> None:
    long = "n" + "-a" * 126
    name = slice_name(long, 31)
    assert len(name) <= 253 and name.endswith(f"-{DRIVER}-31")
    assert slice_name(long, 31) != slice_name(long[:-2] + "-b", 31)


def test_device_class_selector_quotes_the_resource() -> None:
    assert device_class_selector("example.com/gpu") == (
        'device.driver == "pci.hostdev.io" && '
        'device.attributes["pci.hostdev.io"].resourceName == "example.com/gpu"'
    )


def _claim(results: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "vms", "name": "vm-1-gpu", "uid": "u-1", **extra},
        "status": {"allocation": {"devices": {"results": results}}},
    }


def _res(pool: str = "node-1", device: str = "pci-0000-17-00-0", **kw: Any) -> dict[str, Any]:
    return {"request": "gpu", "driver": DRIVER, "pool": pool, "device": device, **kw}


def test_claim_devices_of_this_driver_and_pool() -> None:
    claim = _claim(
        [_res(), {"request": "nic", "driver": "other.example.com", "pool": "x", "device": "y"}],
        annotations={"resource.kubernetes.io/pod-claim-name": "gpus"},
    )
    ref, devs = claim_devices(claim, uid="u-1", pool="node-1")
    assert ref == ClaimRef("vms", "vm-1-gpu", "u-1", "gpus")
    assert [(d.request, d.device, str(d.address)) for d in devs] == [
        ("gpu", "pci-0000-17-00-0", "0000:17:00.0")
    ]


@pytest.mark.parametrize(
    ("claim", "why"),
    [
        (_claim([_res()]) | {"metadata": {"uid": "other"}}, "was replaced"),
        ({"metadata": {"namespace": "vms", "name": "c", "uid": "u-1"}}, "is not allocated"),
        (_claim([_res(pool="node-2")]), "not this node's pool node-1"),
        (_claim([_res(device="gpu-0")]), "is not a pci.hostdev.io device name"),
        (_claim([_res(adminAccess=True)]), "admin access"),
        (_claim([_res(), _res()]), "allocated twice"),
        (_claim([{"request": "a", "driver": "x.example.com", "pool": "p", "device": "d"}]), "no"),
        (_claim(["junk"]), "is not an object"),
        (_claim([_res(device=None)]), "lacks request, pool or device"),
    ],
)
def test_foreign_and_malformed_claims_are_refused(claim: dict[str, Any], why: str) -> None:
    with pytest.raises(ClaimError, match=why):
        claim_devices(claim, uid="u-1", pool="node-1")


def test_opaque_config_for_this_driver_is_refused() -> None:
    claim = _claim([_res()])
    claim["status"]["allocation"]["devices"]["config"] = [
        {"source": "FromClaim", "opaque": {"driver": DRIVER, "parameters": {}}}
    ]
    with pytest.raises(ClaimError, match="takes no opaque configuration"):
        claim_devices(claim, uid="u-1", pool="node-1")


def test_vfio_cdi_spec() -> None:
    gpu = (PciAddress.parse("0000:17:00.0"), PciAddress.parse("0000:17:00.1"))
    a = PreparedUnit(
        "pci-0000-17-00-0",
        "example.com/gpu",
        AllocUnit(str(gpu[0]), gpu, 40, 0, None),
        ("vfio3", "vfio4"),
    )
    b18 = PciAddress.parse("0000:18:00.0")
    b = PreparedUnit(
        "pci-0000-18-00-0", "example.com/gpu", AllocUnit(str(b18), (b18,), 41, 0, None)
    )
    spec, ids = vfio_cdi_spec("2b1e-uid", [a, b], iommufd=True)
    assert spec["kind"] == "pci.hostdev.io/vfio"
    assert spec["cdiVersion"] == "0.5.0"  # device names start with a digit here
    assert spec["containerEdits"] == {
        "env": ["PCI_RESOURCE_EXAMPLE_COM_GPU=0000:17:00.0,0000:18:00.0,0000:17:00.1"],
        "deviceNodes": [
            {"path": "/dev/vfio/vfio", "permissions": "rwm"},
            {"path": "/dev/iommu", "permissions": "rwm"},
        ],
    }
    assert [d["containerEdits"]["deviceNodes"] for d in spec["devices"]] == [
        [
            {"path": "/dev/vfio/40", "permissions": "rwm"},
            {"path": "/dev/vfio/devices/vfio3", "permissions": "rwm"},
            {"path": "/dev/vfio/devices/vfio4", "permissions": "rwm"},
        ],
        [{"path": "/dev/vfio/41", "permissions": "rwm"}],
    ]
    assert ids == {
        "pci-0000-17-00-0": "pci.hostdev.io/vfio=2b1e-uid-pci-0000-17-00-0",
        "pci-0000-18-00-0": "pci.hostdev.io/vfio=2b1e-uid-pci-0000-18-00-0",
    }
    no_fd, _ = vfio_cdi_spec("x-uid", [a], iommufd=False)
    assert no_fd["cdiVersion"] == "0.3.0"
    assert all("devices/vfio" not in json.dumps(d) for d in no_fd["devices"])
    assert no_fd["containerEdits"]["env"] == [
        "PCI_RESOURCE_EXAMPLE_COM_GPU=0000:17:00.0,0000:17:00.1"
    ]


def test_cdi_versions_follow_the_features() -> None:
    base = {"kind": "a.b/c", "devices": [{"name": "d", "containerEdits": {}}]}
    assert cdi_min_version(base) == "0.3.0"
    assert cdi_min_version({**base, "kind": "a.b/c.d"}) == "0.6.0"
    mount = {"mounts": [{"hostPath": "/a", "containerPath": "/b", "type": "bind"}]}
    assert cdi_min_version({**base, "containerEdits": mount}) == "0.4.0"
    node = {"deviceNodes": [{"path": "/dev/x", "hostPath": "/dev/y"}]}
    assert cdi_min_version({**base, "containerEdits": node}) == "0.5.0"


def test_metadata_paths() -> None:
    tmpl = ClaimRef("vms", "vm-1-gpu-x7k2", "u", "gpus")
    direct = ClaimRef("vms", "shared-gpu", "u")
    base = "/var/run/kubernetes.io/dra-device-attributes"
    assert metadata_container_path(tmpl, "gpu") == (
        f"{base}/resourceclaimtemplates/gpus/gpu/pci.hostdev.io-metadata.json"
    )
    assert metadata_container_path(direct, "gpu") == (
        f"{base}/resourceclaims/shared-gpu/gpu/pci.hostdev.io-metadata.json"
    )
    # An empty annotation is recorded as podClaimName "" (as upstream) but moves nothing.
    assert "resourceclaims/" in metadata_container_path(ClaimRef("a", "b", "u", ""), "r")


def test_metadata_stream_is_v1beta1_then_v1alpha1() -> None:
    ref = ClaimRef("vms", "vm-1-gpu", "u-1", "gpus")
    dev = MetadataDevice("node-1", "pci-0000-17-00-0", {ATTR_PCI_BUS_ID: string("0000:17:00.0")})
    text = metadata_stream(ref, "gpu", [dev]).decode()
    objs = []
    dec = json.JSONDecoder()
    pos = 0
    while pos < len(text):
        obj, pos = dec.raw_decode(text, pos)
        objs.append(obj)
        assert text[pos] == "\n"
        pos += 1
    assert [o["apiVersion"] for o in objs] == [
        "metadata.resource.k8s.io/v1beta1",
        "metadata.resource.k8s.io/v1alpha1",
    ]
    assert list(objs[0]) == ["kind", "apiVersion", "metadata", "podClaimName", "requests"]
    assert objs[0]["metadata"] == {
        "name": "vm-1-gpu",
        "namespace": "vms",
        "uid": "u-1",
        "generation": 1,
    }
    assert objs[1]["requests"] == [
        {
            "name": "gpu",
            "devices": [
                {
                    "driver": DRIVER,
                    "pool": "node-1",
                    "name": "pci-0000-17-00-0",
                    "attributes": {ATTR_PCI_BUS_ID: {"string": "0000:17:00.0"}},
                }
            ],
        }
    ]


def test_go_json_escapes() -> None:
    assert marshal_indent({"a": "<x>&\u2028é\n\b\x01"}) == (
        '{\n  "a": "\\u003cx\\u003e\\u0026\\u2028é\\n\\b\\u0001"\n}'
    )
    assert marshal_indent({"e": [], "m": {}}) == '{\n  "e": [],\n  "m": {}\n}'
