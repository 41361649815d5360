"""Mediated devices: the sysfs reader on fake trees, and the pure plan / health / Allocate rules."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from hostdev.cli import main
from hostdev.host.mdev import MdevInventory, discover_mdev
from hostdev.policy.mdev import (
    MdevSpec,
    MdevSpecError,
    instance_health,
    mdev_allocation,
    plan_mdevs,
)
from hostdev.testing.fakemdev import FakeMdev, FakeType
from hostdev.testing.fakesysfs import FakeHost

MTTY = [FakeType("mtty-1", description=None), FakeType("mtty-2", cost=2)]
U1 = "11111111-1111-4111-8111-111111111111"
U2 = "22222222-2222-4222-8222-222222222222"
U3 = "33333333-3333-4333-8333-333333333333"


def _gpu_host(tmp_path: Path, parents: int = 2, capacity: int = 4) -> FakeMdev:
    h = FakeHost(tmp_path)
    m = FakeMdev(h)
    for i in range(parents):
        addr = f"0000:{0x17 + i:02x}:00.0"
        h.add_device(addr, vendor="10de", device="13f2", class_code="030000", driver="nvidia")
        m.add_parent(
            addr,
            [
                FakeType("nvidia-35", name="GRID M60-2Q", description="num_heads=4"),
                FakeType("nvidia-36", name="GRID M60-4Q", cost=2),
            ],
            capacity,
            pci=True,
        )
    return m


def test_discovery_reads_parents_types_and_instances(tmp_path: Path) -> None:
    m = _gpu_host(tmp_path)
    m.add_parent("mtty", MTTY, 24)
    group = m.add_instance("mtty", "mtty-2", U1)
    inv = discover_mdev(str(tmp_path))
    assert sorted(inv.parents) == ["0000:17:00.0", "0000:18:00.0", "mtty"]
    gpu = inv.parents["0000:17:00.0"]
    assert str(gpu.pci) == "0000:17:00.0"
    t = gpu.type("GRID M60-2Q")
    assert t is not None and t.id == "nvidia-35" and gpu.type("nvidia-35") == t
    assert (t.description, t.device_api, t.available_instances) == ("num_heads=4", "vfio-pci", 4)
    mtty = inv.parents["mtty"]
    assert mtty.pci is None
    # one pool: the 2-port instance took two of 24 ports
    assert [(x.id, x.name, x.available_instances) for x in mtty.types] == [
        ("mtty-1", None, 22),
        ("mtty-2", None, 11),
    ]
    assert mtty.types[0].display_name == "mtty-1"
    inst = inv.instances[U1]
    assert (inst.type_id, inst.parent, inst.iommu_group, inst.vfio_node, inst.driver) == (
        "mtty-2",
        "mtty",
        group,
        True,
        "vfio_mdev",
    )


def test_no_mdev_core_is_an_empty_inventory(tmp_path: Path) -> None:
    FakeHost(tmp_path)
    assert discover_mdev(str(tmp_path)) == MdevInventory({}, {})


def test_fake_kernel_refuses_what_linux_refuses(tmp_path: Path) -> None:
    m = FakeMdev(FakeHost(tmp_path))
    m.add_parent("mtty", MTTY, 2)
    create = tmp_path / "sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/create"
    with pytest.raises(OSError) as e:
        m.write(str(create), "not-a-uuid")
    assert e.value.errno == errno.EINVAL
    m.write(str(create), U1.upper())  # the kernel names it in lower case
    assert (tmp_path / "sys/bus/mdev/devices" / U1).is_dir()
    with pytest.raises(OSError) as e:
        m.write(str(create), U2)
    assert e.value.errno == errno.ENOSPC


@pytest.mark.parametrize(
    ("data", "msg"),
    [
        ({"count": 1}, "mdev.type"),
        ({"type": "x", "count": -1}, "mdev.count"),
        ({"type": "x", "count": True}, "mdev.count"),
        ({"type": "x", "count": 1, "parents": "mtty"}, "mdev.parents"),
        ({"type": "x", "count": 1, "placement": "random"}, "mdev.placement"),
        ({"type": "x", "count": 1, "typo": 1}, "unknown field"),
    ],
)
def test_spec_errors_name_the_field(data: dict[str, object], msg: str) -> None:
    with pytest.raises(MdevSpecError, match=msg):
        MdevSpec.from_dict(data)


def test_spread_and_pack_over_parents(tmp_path: Path) -> None:
    inv = discover_mdev(str(_gpu_host(tmp_path).host.root))
    spread = plan_mdevs({"r": MdevSpec("GRID M60-2Q", 3)}, inv, {}, {})
    assert [c.parent for c in spread.creates] == ["0000:17:00.0", "0000:18:00.0", "0000:17:00.0"]
    assert {c.type_id for c in spread.creates} == {"nvidia-35"}
    pack = plan_mdevs({"r": MdevSpec("nvidia-35", 5, placement="pack")}, inv, {}, {})
    assert [c.parent for c in pack.creates] == ["0000:17:00.0"] * 4 + ["0000:18:00.0"]
    only = plan_mdevs({"r": MdevSpec("nvidia-35", 2, parents=("0000:18:*",))}, inv, {}, {})
    assert [c.parent for c in only.creates] == ["0000:18:00.0"] * 2


def test_refusals_change_nothing_and_say_why(tmp_path: Path) -> None:
    m = _gpu_host(tmp_path, parents=1, capacity=2)
    inv = discover_mdev(str(m.host.root))
    unknown = plan_mdevs({"r": MdevSpec("nvidia-99", 1)}, inv, {}, {})
    assert unknown.empty
    assert "unknown mdev type 'nvidia-99'" in unknown.refusals["r"]  # type: ignore[index]
    assert "nvidia-35 (GRID M60-2Q)" in unknown.refusals["r"]  # type: ignore[index]
    exhausted = plan_mdevs({"r": MdevSpec("nvidia-35", 3)}, inv, {}, {})
    assert exhausted.empty
    assert exhausted.refusals == {
        "r": "mdev type nvidia-35 exhausted: 3 more instances wanted, the parents have 2 left "
        "(0000:17:00.0: 2)"
    }
    nowhere = plan_mdevs({"r": MdevSpec("nvidia-35", 1, parents=("mtty",))}, inv, {}, {})
    assert nowhere.empty and "no mdev parent matches mtty" in nowhere.refusals["r"]  # type: ignore[index]


def test_removes_only_own_free_instances(tmp_path: Path) -> None:
    m = _gpu_host(tmp_path, parents=1)
    for u in (U1, U2, U3):
        m.add_instance("0000:17:00.0", "nvidia-35", u)
    inv = discover_mdev(str(m.host.root))
    owned = {U1: "r", U2: "r"}  # U3 was made by someone else
    plan = plan_mdevs({"r": MdevSpec("nvidia-35", 1)}, inv, owned, {U2: "allocated to a pod"})
    assert [(r.uuid, r.resource) for r in plan.removes] == [(U1, "r")]
    # all of ours in use: refused, nothing removed
    held = {U1: "held", U2: "held"}
    plan = plan_mdevs({"r": MdevSpec("nvidia-35", 0)}, inv, owned, held)
    assert plan.empty and "only 0 are free to remove" in plan.refusals["r"]  # type: ignore[index]
    # a resource no longer wanted: its free instances go, held ones stay with the reason
    plan = plan_mdevs({}, inv, owned, {U2: "open by pid 7 (qemu)"})
    assert [r.uuid for r in plan.removes] == [U1]
    assert plan.kept == {U2: "r is no longer wanted but open by pid 7 (qemu)"}


def test_health_follows_instance_and_parent(tmp_path: Path) -> None:
    m = FakeMdev(FakeHost(tmp_path))
    m.add_parent("mtty", MTTY, 24)
    g = m.add_instance("mtty", "mtty-1", U1)
    assert instance_health(U1, discover_mdev(str(tmp_path))).healthy
    (tmp_path / "dev/vfio" / str(g)).unlink()
    v = instance_health(U1, discover_mdev(str(tmp_path)))
    assert not v.healthy and f"/dev/vfio/{g} is missing" in str(v.reason)
    m.remove_parent("mtty")
    v = instance_health(U1, discover_mdev(str(tmp_path)))
    assert not v.healthy and v.reason == f"mdev instance {U1} is gone"


def test_allocation_env_is_uuids_in_request_order(tmp_path: Path) -> None:
    m = FakeMdev(FakeHost(tmp_path))
    m.add_parent("mtty", MTTY, 24)
    g1 = m.add_instance("mtty", "mtty-1", U1)
    g2 = m.add_instance("mtty", "mtty-1", U2)
    inv = discover_mdev(str(tmp_path))
    env, paths = mdev_allocation("example.com/mtty.1", [inv.instances[U2], inv.instances[U1]])
    assert env == {"MDEV_PCI_RESOURCE_EXAMPLE_COM_MTTY_1": f"{U2},{U1}"}
    assert paths == ["/dev/vfio/vfio", f"/dev/vfio/{g2}", f"/dev/vfio/{g1}"]


def test_scan_shows_parents_types_and_instances(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = _gpu_host(tmp_path, parents=1)
    m.add_parent("mtty", MTTY, 24)
    group = m.add_instance("mtty", "mtty-2", U1)
    assert main(["scan", "--host-root", str(tmp_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["mdev"]
    gpu, mtty = rep["parents"]
    assert (gpu["name"], gpu["pciAddress"], mtty["pciAddress"]) == (
        "0000:17:00.0",
        "0000:17:00.0",
        None,
    )
    assert gpu["types"][0] == {
        "id": "nvidia-35",
        "name": "GRID M60-2Q",
        "description": "num_heads=4",
        "deviceApi": "vfio-pci",
        "availableInstances": 4,
        "instances": 0,
    }
    assert [(t["id"], t["availableInstances"], t["instances"]) for t in mtty["types"]] == [
        ("mtty-1", 22, 0),
        ("mtty-2", 11, 1),
    ]
    assert rep["instances"] == [
        {
            "uuid": U1,
            "type": "mtty-2",
            "parent": "mtty",
            "iommuGroup": group,
            "vfioNode": True,
            "driver": "vfio_mdev",
        }
    ]
    assert main(["scan", "--host-root", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "Mediated devices (mdev)" in text
    assert any(
        line.split() == ["0000:17:00.0", "nvidia-35", "GRID", "M60-2Q", "vfio-pci", "4", "0"]
        for line in text.splitlines()
    )
    assert any(
        line.split() == [U1, "mtty", "mtty-2", str(group), "vfio_mdev"]
        for line in text.splitlines()
    )
