"""Broken or odd trees give clear errors or "unknown", never a traceback."""

import json
import os
from pathlib import Path

import pytest

from hostdev.cli import main
from hostdev.host import HostRootError, PciAddress, Sysfs
from hostdev.testing import scenarios

A = PciAddress.parse


@pytest.fixture
def host(tmp_path: Path) -> Path:
    scenarios.gpu_with_audio(tmp_path)
    return tmp_path


def devdir(root: Path, addr: str) -> Path:
    return root / "sys/bus/pci/devices" / addr


def test_garbage_vendor_and_missing_class(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (devdir(host, "0000:17:00.0") / "vendor").write_text("not-hex\n")
    (devdir(host, "0000:17:00.0") / "class").unlink()
    inv = Sysfs(str(host)).discover()
    dev = inv.devices[A("0000:17:00.0")]
    assert dev.vendor is None and dev.class_code is None
    assert "vendor: unexpected content 'not-hex'" in dev.problems
    assert "class: missing or unreadable" in dev.problems
    assert any(w.startswith("0000:17:00.0: vendor: unexpected") for w in inv.warnings)
    assert main(["scan", "--host-root", str(host), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    d = next(x for x in rep["devices"] if x["address"] == "0000:17:00.0")
    assert d["name"] == "unknown device (unreadable ids)" and d["className"] == "unknown class"


def test_numa_minus_one_is_unknown(host: Path) -> None:
    (devdir(host, "0000:17:00.0") / "numa_node").write_text("-1\n")
    assert Sysfs(str(host)).discover().devices[A("0000:17:00.0")].numa_node is None


def test_dangling_links(host: Path) -> None:
    d = devdir(host, "0000:17:00.1")
    (d / "iommu_group").unlink()
    (d / "iommu_group").symlink_to("../../../kernel/iommu_groups/not-a-number")
    inv = Sysfs(str(host)).discover()
    dev = inv.devices[A("0000:17:00.1")]
    assert dev.iommu_group is None
    assert "iommu_group: dangling or malformed link" in dev.problems


def test_dangling_device_link_and_odd_names(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bus = host / "sys/bus/pci/devices"
    os.symlink("../../../devices/pci0000:99/0000:99:00.0", bus / "0000:99:00.0")  # points nowhere
    os.symlink("../../../devices/x", bus / "10000:00:00.0")  # VMD domain: not KubeVirt-usable
    os.symlink("../../../devices/y", bus / "0000:00:20.0")  # device number above 0x1f
    inv = Sysfs(str(host)).discover()
    assert inv.devices[A("0000:99:00.0")].problems[0].startswith("device directory unreadable")
    assert any(
        w.startswith("10000:00:00.0: skipped: invalid PCI address") and "4-digit hex domain" in w
        for w in inv.warnings
    ), inv.warnings
    assert (
        "0000:00:20.0: skipped: invalid PCI address '0000:00:20.0': device number above 1f"
        in inv.warnings
    )
    assert main(["scan", "--host-root", str(host)]) == 0
    assert "warning: 10000:00:00.0: skipped" in capsys.readouterr().out


def test_unreadable_root_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(HostRootError, match="no PCI bus at"):
        Sysfs(str(tmp_path)).discover()
    assert main(["scan", "--host-root", str(tmp_path / "nope")]) == 1
    assert "no PCI bus at" in capsys.readouterr().err


def test_bad_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["scan", "--no-such-flag"])
    assert e.value.code == 2


def test_missing_pci_ids_names_are_ids(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = host / "empty.ids"
    empty.write_text("# nothing\n")
    assert main(["scan", "--host-root", str(host), "--json", "--pci-ids", str(empty)]) == 0
    rep = json.loads(capsys.readouterr().out)
    gpu = next(x for x in rep["devices"] if x["address"] == "0000:17:00.0")
    assert gpu["name"] == "unknown device 10de:2236"
    assert gpu["className"] == "3D controller"  # built-in class fallback
