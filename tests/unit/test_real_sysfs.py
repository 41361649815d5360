"""This machine's own /sys is real: read it (never write) and check discovery agrees with it."""

import os
from pathlib import Path

import pytest

from hostdev.cli import main
from hostdev.host import Sysfs

BUS = Path("/sys/bus/pci/devices")

pytestmark = pytest.mark.skipif(
    not BUS.is_dir() or not any(BUS.iterdir()), reason="this machine exposes no /sys/bus/pci"
)


def test_real_host_matches_sysfs() -> None:
    inv = Sysfs("/").discover()
    assert {str(a) for a in inv.devices} == set(os.listdir(BUS))
    for addr, dev in inv.devices.items():
        d = BUS / str(addr)
        assert dev.vendor == (d / "vendor").read_text().strip()[2:]
        assert dev.class_code == (d / "class").read_text().strip()[2:]
        drv = d / "driver"
        assert dev.driver == (os.path.basename(os.readlink(drv)) if drv.is_symlink() else None)
        numa = int((d / "numa_node").read_text())
        assert dev.numa_node == (None if numa < 0 else numa)
    has_groups = any(Path("/sys/kernel/iommu_groups").glob("*"))
    assert inv.node.enabled == has_groups
    assert inv.node.group_count == len(list(Path("/sys/kernel/iommu_groups").glob("*")))


def test_scan_of_this_host_says_iommu_state(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Passthrough readiness")
    if not any(Path("/sys/kernel/iommu_groups").glob("*")):
        assert "IOMMU is off" in out and "NOT READY" in out
