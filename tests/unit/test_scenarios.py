"""Discovery and `hostdev scan --json` against each fake-host scenario."""

import json
from pathlib import Path

import pytest

from hostdev.cli import main
from hostdev.host import PciAddress, Sysfs
from hostdev.testing import scenarios

A = PciAddress.parse


def scan_json(root: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["scan", "--host-root", str(root), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def by_addr(rep: dict, addr: str) -> dict:
    return next(d for d in rep["devices"] if d["address"] == addr)


def test_sriov_nic_dual_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenarios.sriov_nic_dual_socket(tmp_path, numvfs=4)
    inv = Sysfs(str(tmp_path)).discover()
    pf0 = inv.devices[A("0000:3b:00.0")]
    assert pf0.is_pf and pf0.sriov_totalvfs == 64 and pf0.sriov_numvfs == 4
    assert pf0.netdevs == ("ens1f0",) and pf0.driver == "ice"
    assert [str(v) for v in pf0.virtfns] == [
        "0000:3b:02.0",
        "0000:3b:02.1",
        "0000:3b:02.2",
        "0000:3b:02.3",
    ]
    vf3 = inv.devices[A("0000:3b:02.3")]
    assert vf3.physfn == pf0.address and vf3.vf_index == 3 and vf3.on_vfio
    assert inv.devices[A("0000:86:02.0")].numa_node == 1
    assert inv.node.enabled and inv.node.vendor == "intel" and inv.node.interrupt_remapping
    rep = scan_json(tmp_path, capsys)
    assert rep["ready"] is True and rep["problems"] == []
    assert by_addr(rep, "0000:3b:02.0")["assignable"] == "ready"
    pf = by_addr(rep, "0000:3b:00.0")
    assert pf["assignable"] == "no" and "assign its VFs" in pf["reason"]
    assert by_addr(rep, "0000:01:00.0")["assignable"] == "needs-binding"  # boot NVMe on nvme
    assert len([d for d in rep["devices"] if d["physfn"]]) == 12


def test_gpu_with_audio_one_viable_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenarios.gpu_with_audio(tmp_path)
    rep = scan_json(tmp_path, capsys)
    gpu, audio = by_addr(rep, "0000:17:00.0"), by_addr(rep, "0000:17:00.1")
    assert gpu["iommuGroup"] == audio["iommuGroup"]
    group = next(g for g in rep["groups"] if g["number"] == gpu["iommuGroup"])
    assert group == {
        "number": gpu["iommuGroup"],
        "members": ["0000:17:00.0", "0000:17:00.1"],
        "viable": True,
        "reason": None,
        "vfioNode": True,
    }
    assert gpu["assignable"] == "ready" and "with 0000:17:00.1" in gpu["reason"]


def test_gpus_behind_switch_bridges_do_not_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenarios.gpus_behind_switch_without_acs(tmp_path)
    rep = scan_json(tmp_path, capsys)
    g = by_addr(rep, "0000:42:00.0")["iommuGroup"]
    group = next(x for x in rep["groups"] if x["number"] == g)
    assert len(group["members"]) == 5 and group["viable"] is True  # 3 pcieport bridges + 2 GPUs
    assert by_addr(rep, "0000:41:00.0")["driver"] == "pcieport"
    for gpu in ("0000:42:00.0", "0000:43:00.0"):
        d = by_addr(rep, gpu)
        assert d["assignable"] == "ready"
        other = "0000:43:00.0" if gpu.endswith("42:00.0") else "0000:42:00.0"
        assert other in d["reason"]  # the companion travels with it


def test_group_member_on_host_driver_not_viable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenarios.group_member_on_host_driver(tmp_path)
    rep = scan_json(tmp_path, capsys)
    gpu = by_addr(rep, "0000:17:00.0")
    group = next(x for x in rep["groups"] if x["number"] == gpu["iommuGroup"])
    assert group["viable"] is False
    assert group["reason"] == (
        "0000:17:00.1 is bound to host driver snd_hda_intel; bind it to vfio-pci as well (VFIO "
        "assigns an IOMMU group whole: every function in it except bridges must be on "
        "vfio-pci, pci-stub or no driver)"
    )
    assert gpu["assignable"] == "needs-binding" and "snd_hda_intel" in gpu["reason"]


def test_iommu_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenarios.iommu_off(tmp_path)
    rep = scan_json(tmp_path, capsys)
    assert rep["node"]["iommu"] is False and rep["ready"] is False
    assert rep["problems"][0].startswith("IOMMU is off")
    assert rep["groups"] == []
    assert all(d["assignable"] == "no" for d in rep["devices"])
    assert by_addr(rep, "0000:17:00.0")["reason"] == "IOMMU is off"
    assert main(["scan", "--host-root", str(tmp_path)]) == 0
    assert "NOT READY for PCI passthrough" in capsys.readouterr().out


def test_amd_and_iommufd(tmp_path: Path) -> None:
    h = scenarios.sriov_nic_dual_socket(tmp_path, iommufd=True)
    inv = Sysfs(str(tmp_path)).discover()
    assert inv.node.iommufd and h.iommufd
    assert inv.devices[A("0000:3b:02.0")].vfio_cdev is not None


@pytest.mark.parametrize(
    "build",
    [
        lambda root: scenarios.sriov_nic_dual_socket(root, iommufd=True),
        scenarios.gpus_behind_switch_without_acs,  # bridges in the groups
        scenarios.group_member_on_host_driver,
    ],
)
def test_handout_read_says_what_the_full_read_says(tmp_path: Path, build: object) -> None:
    """Allocate's light read (class, driver, group, iommufd cdev) agrees with discovery on
    every function, unbound, host-bound, VFIO-bound and bridge alike; a removed one is gone."""
    h = build(tmp_path)  # type: ignore[operator]
    sysfs = Sysfs(str(tmp_path))
    inv = sysfs.discover()
    assert len(inv.devices) > 3
    for addr, full in inv.devices.items():
        light = sysfs.read_handout(addr)
        assert light is not None
        facts = ("class_code", "driver", "iommu_group", "vfio_cdev", "is_bridge")
        assert [getattr(light, f) for f in facts] == [getattr(full, f) for f in facts]
        assert light.problems == ()
    gone = min(inv.devices)
    h.remove_device(gone)
    assert sysfs.read_handout(gone) is None


@pytest.mark.parametrize(("pfs", "vfs"), [(2, 16), (8, 128)])
def test_scale_scenario_counts(tmp_path: Path, pfs: int, vfs: int) -> None:
    scenarios.sriov_scale(tmp_path, pfs=pfs, vfs=vfs)
    inv = Sysfs(str(tmp_path)).discover()
    vfs_found = [d for d in inv.devices.values() if d.is_vf]
    assert len(vfs_found) == pfs * vfs
    assert len({d.address for d in vfs_found}) == pfs * vfs
    assert {d.vf_index for d in vfs_found} == set(range(vfs))
