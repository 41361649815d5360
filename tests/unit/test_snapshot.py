"""`hostdev snapshot`: saved trees scan like their source; saved real hosts stay readable."""

import json
from pathlib import Path

import pytest

from hostdev.cli import main
from hostdev.host import Sysfs
from hostdev.testing import scenarios

DATA = Path(__file__).parent.parent / "data" / "snapshots"


def scan(root: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["scan", "--host-root", str(root), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", ["demo", "group-member-on-host-driver", "iommu-off"])
def test_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    scenarios.SCENARIOS[name](tmp_path / "src")
    assert main(["snapshot", str(tmp_path / "out"), "--host-root", str(tmp_path / "src")]) == 0
    assert "saved" in capsys.readouterr().out
    assert scan(tmp_path / "out", capsys) == scan(tmp_path / "src", capsys)
    assert Sysfs(str(tmp_path / "out")).discover() == Sysfs(str(tmp_path / "src")).discover()


def test_refuses_non_empty_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenarios.gpu_with_audio(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    assert main(["snapshot", str(tmp_path / "out"), "--host-root", str(tmp_path / "src")]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep").read_text() == "mine"


def test_saved_firecracker_host(capsys: pytest.CaptureFixture[str]) -> None:
    """Captured with `hostdev snapshot` on a Firecracker VM: virtio devices, no IOMMU."""
    rep = scan(DATA / "firecracker-no-iommu", capsys)
    assert rep["node"]["iommu"] is False and rep["ready"] is False
    assert {d["vendor"] for d in rep["devices"] if d["driver"]} == {"1af4"}
    assert all(d["assignable"] == "no" for d in rep["devices"])
    assert rep["warnings"] == []


def test_saved_real_kernel_with_iommu_and_sriov(capsys: pytest.CaptureFixture[str]) -> None:
    """Captured in the kernel tier's QEMU guest (Linux 6.1, q35 + intel-iommu, interrupt
    remapping): `hostdev snapshot` plus, at the same moment, the live `hostdev scan --json
    --pci-ids /dev/null`. The saved tree must scan exactly as the live kernel did."""
    root = DATA / "qemu-q35-vtd-sriov"
    live = json.loads((DATA / "qemu-q35-vtd-sriov.scan.json").read_text())
    assert main(["scan", "--host-root", str(root), "--json", "--pci-ids", "/dev/null"]) == 0
    saved = json.loads(capsys.readouterr().out)
    dra = {d["name"]: d for d in saved.pop("dra")["devices"]}  # added after the capture
    assert saved.pop("mdev") == {"parents": [], "instances": []}  # likewise; none in that guest
    assert saved == live
    # The DRA devices the tree would publish: one per IOMMU group, VFs with their PF.
    vf = dra["pci-0000-41-00-1"]["attributes"]
    assert vf["pfPciBusID"] == {"string": "0000:41:00.0"} and vf["vfIndex"] == {"int": 0}
    assert vf["resource.kubernetes.io/pcieRoot"] == {"string": "pci0000:40"}
    assert dra["pci-0000-02-00-0"]["addresses"] == ["0000:02:00.0", "0000:02:00.1"]
    assert dra["pci-0000-04-01-0"]["attributes"]["functions"] == {"int": 2}  # bridge aside
    # What the real kernel showed, in the host model's terms.
    assert saved["node"]["iommuVendor"] == "intel" and saved["node"]["interruptRemapping"]
    groups = {g["number"]: g for g in saved["groups"]}
    devs = {d["address"]: d for d in saved["devices"]}
    e1000e_pair = groups[devs["0000:02:00.0"]["iommuGroup"]]
    assert e1000e_pair["members"] == ["0000:02:00.0", "0000:02:00.1"]  # multifunction, no ACS
    bridge_group = groups[devs["0000:03:00.0"]["iommuGroup"]]
    assert bridge_group["members"] == ["0000:03:00.0", "0000:04:01.0", "0000:04:02.0"]
    pf = devs["0000:41:00.0"]
    assert (pf["sriovTotalVfs"], pf["sriovNumVfs"], pf["numaNode"]) == (4, 4, 0)
    vfs = [d for d in saved["devices"] if d["physfn"] == "0000:41:00.0"]
    assert [(d["vfIndex"], d["numaNode"]) for d in vfs] == [(i, 0) for i in range(4)]
    assert devs["0000:41:00.1"]["assignable"] == "ready"  # bound to vfio-pci in the guest
    assert groups[devs["0000:41:00.1"]["iommuGroup"]]["vfioNode"] is True
    assert devs["0000:81:00.0"]["numaNode"] == 1


def test_saved_tree_has_no_empty_directories(tmp_path: Path) -> None:
    """Saved trees are kept in git, which drops empty directories (an IOMMU unit, a loaded
    module, a driver are facts by existence): every directory must hold a file or a link."""
    scenarios.demo(tmp_path / "src")
    assert main(["snapshot", str(tmp_path / "out"), "--host-root", str(tmp_path / "src")]) == 0
    for saved in [tmp_path / "out", *(p for p in DATA.iterdir() if p.is_dir())]:
        empty = [
            d
            for d in saved.rglob("*")
            if d.is_dir() and not d.is_symlink() and not any(d.iterdir())
        ]
        assert empty == [], f"{saved}: empty directories {empty[:3]}"
