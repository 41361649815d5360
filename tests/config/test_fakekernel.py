"""The simulated kernel behaves like the real one where the engine depends on it (the real
kernel tier checks the same rules against Linux itself)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from hostdev.testing.fakekernel import AgentKilled, FakeKernel
from hostdev.testing.fakesysfs import FakeHost

NIC, PF = "0000:05:00.0", "0000:3b:00.0"


@pytest.fixture
def kernel(tmp_path: Path) -> FakeKernel:
    h = FakeHost(tmp_path)
    h.add_device(NIC, vendor="8086", device="10d3", class_code="020000", driver="e1000e")
    h.add_pf(PF, vendor="8086", device="1592", vf_device="1889", totalvfs=4, numvfs=0,
             vf_driver="iavf")  # fmt: skip
    return FakeKernel(h, vf_drivers={PF: "iavf"})


def dev(k: FakeKernel, a: str, attr: str = "") -> str:
    return os.path.join(k.root, "sys/bus/pci/devices", a, attr)


def driver(k: FakeKernel, a: str) -> str | None:
    link = dev(k, a, "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def err(k: FakeKernel, path: str, value: str) -> int:
    with pytest.raises(OSError) as e:
        k.write(path, value)
    assert e.value.errno is not None
    return e.value.errno


def test_unbind_bind_and_probe_follow_driver_override(kernel: FakeKernel) -> None:
    k = kernel
    drivers = os.path.join(k.root, "sys/bus/pci/drivers")
    assert err(k, f"{drivers}/vfio-pci/unbind", NIC) == errno.ENODEV  # not bound there
    k.write(f"{drivers}/e1000e/unbind", NIC)
    assert driver(k, NIC) is None
    assert err(k, f"{drivers}/vfio-pci/bind", NIC) == errno.ENODEV  # no id match, no override
    k.write(dev(k, NIC, "driver_override"), "vfio-pci")
    assert Path(dev(k, NIC, "driver_override")).read_text() == "vfio-pci\n"
    k.write(os.path.join(k.root, "sys/bus/pci/drivers_probe"), NIC)
    assert driver(k, NIC) == "vfio-pci"
    assert os.path.exists(os.path.join(k.root, "dev/vfio", str(_group(k, NIC))))
    k.write(dev(k, NIC, "driver_override"), "\n")
    assert Path(dev(k, NIC, "driver_override")).read_text() == "(null)\n"
    k.write(f"{drivers}/vfio-pci/unbind", NIC)
    assert not os.path.exists(os.path.join(k.root, "dev/vfio", str(_group(k, NIC))))
    k.write(os.path.join(k.root, "sys/bus/pci/drivers_probe"), NIC)
    assert driver(k, NIC) == "e1000e"  # the modalias match


def _group(k: FakeKernel, a: str) -> int:
    return int(os.path.basename(os.readlink(dev(k, a, "iommu_group"))))


def test_sriov_numvfs_rules(kernel: FakeKernel) -> None:
    k = kernel
    path = dev(k, PF, "sriov_numvfs")
    assert err(k, path, "5") == errno.ERANGE
    assert err(k, path, "two") == errno.EINVAL
    k.write(path, "2")
    vfs = sorted(os.path.basename(os.readlink(dev(k, PF, f"virtfn{i}"))) for i in range(2))
    assert [driver(k, v) for v in vfs] == ["iavf", "iavf"]
    assert err(k, path, "3") == errno.EBUSY
    k.write(path, "2")  # same count: a no-op, as in Linux
    k.write(path, "0")
    assert not os.path.exists(dev(k, vfs[0]))
    with open(dev(k, PF, "sriov_drivers_autoprobe"), "w") as f:
        f.write("0\n")
    k.write(path, "1")
    assert driver(k, vfs[0]) is None  # autoprobe off: VFs come up driverless
    k.write(path, "0")
    k.write(os.path.join(k.root, "sys/bus/pci/drivers/ice/unbind"), PF)
    assert err(k, path, "1") == errno.ENOENT


def test_injection_and_kill(kernel: FakeKernel) -> None:
    k = kernel
    k.inject("driver_override", errno.EINVAL, NIC)
    assert err(k, dev(k, NIC, "driver_override"), "vfio-pci") == errno.EINVAL
    k.write(dev(k, NIC, "driver_override"), "vfio-pci")  # only once
    k.kill_after(1)
    with pytest.raises(AgentKilled, match="after write 2"):
        k.write(dev(k, NIC, "driver_override"), "")
    assert err(k, dev(k, NIC, "vendor"), "0x1234") == errno.EACCES


def test_driver_table_survives_a_new_kernel_object(kernel: FakeKernel) -> None:
    k = kernel
    k.write(os.path.join(k.root, "sys/bus/pci/drivers/e1000e/unbind"), NIC)
    again = FakeKernel(k.host)  # a restarted agent's view: same tree, same kernel
    again.write(os.path.join(k.root, "sys/bus/pci/drivers_probe"), NIC)
    assert driver(again, NIC) == "e1000e"
