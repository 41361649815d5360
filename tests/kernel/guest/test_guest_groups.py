"""Runs INSIDE the QEMU guest (tests/kernel/run-guest.sh), as root: IOMMU-group re-checks at
Allocate and resource-name collisions, against the real kernel.

The guest's 2-function e1000e (one slot, no ACS: one IOMMU group of two) plays a GPU and its
HDMI audio function: the resource serves function 0 alone, both functions go to vfio-pci (the
engine binds group companions together), then function 1 goes back to its host driver behind
the agent's back. The real agent (PluginManager, real gRPC over a unix socket, the kubelet
simulator) must refuse Allocate with the reason, and the kubelet must then see the unit
Unhealthy with the same sentence. The host-side test tests/kernel/test_real_kernel.py turns
each function here into one host-side test.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from hostdev.deviceplugin.config.apply import converge
from hostdev.deviceplugin.config.executor import Executor
from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.deviceplugin.manager import PluginManager
from hostdev.deviceplugin.resources import parse_resources
from hostdev.host.address import PciAddress
from hostdev.host.model import IommuGroup
from hostdev.host.sysfs import Sysfs
from hostdev.policy.health import unit_health
from hostdev.policy.nodeconfig import parse_node_config
from hostdev.policy.plan import Step
from tests.fixtures.kubeletsim import KubeletSim

if os.environ.get("RK_GUEST") != "1":  # pragma: no cover - guarded twice (conftest too)
    pytest.skip(
        "guest-only tests: run through tests/kernel/test_real_kernel.py", allow_module_level=True
    )

SYS = Sysfs("/")
NAME = "example.com/gpu-like"
E1000E = ("8086", "10d3")
# VFIO_GROUP_GET_STATUS = _IO(';', 100 + 3); struct vfio_group_status {argsz, flags}
GET_STATUS = (ord(";") << 8) | 103
FLAG_VIABLE = 1


def two_function_group() -> IommuGroup:
    """The IOMMU group holding both functions of the 2-function e1000e."""
    inv = SYS.discover()
    found = [
        g
        for g in inv.groups.values()
        if len(g.members) == 2
        and all((inv.devices[m].vendor, inv.devices[m].device) == E1000E for m in g.members)
    ]
    assert len(found) == 1, f"expected one 2-function e1000e group, found {found}"
    return found[0]


def kernel_says_viable(group: int) -> bool:
    """The kernel's own VFIO verdict on the group (VFIO_GROUP_GET_STATUS, flag VIABLE)."""
    status = bytearray(8)
    struct.pack_into("II", status, 0, len(status), 0)
    fd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
    try:
        fcntl.ioctl(fd, GET_STATUS, status, True)
    finally:
        os.close(fd)
    return bool(struct.unpack_from("II", status)[1] & FLAG_VIABLE)


def driver_of(addr: PciAddress) -> str | None:
    link = Path(SYS.pci_device_dir(addr)) / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    subprocess.run(["modprobe", "vfio-pci"], check=True)
    d = tmp_path / "state"
    yield d
    # Put the guest back: everything hostdev moved returns to its original driver.
    res = converge(SYS, DriverMemory(str(d)), parse_node_config({}), echo=print)
    assert res.exit_code == 0, "cleanup did not converge"
    group = two_function_group()
    assert {driver_of(m) for m in group.members} == {"e1000e"}


@pytest.fixture
async def kubelet() -> AsyncIterator[KubeletSim]:
    short = tempfile.mkdtemp(prefix="rk-", dir="/tmp")  # unix socket paths stay short
    sim = KubeletSim(os.path.join(short, "dp"))
    await sim.start()
    yield sim
    await sim.stop()
    shutil.rmtree(short, ignore_errors=True)


async def test_allocate_refuses_a_unit_whose_group_companion_went_back_to_its_host_driver(
    state: Path, kubelet: KubeletSim
) -> None:
    group = two_function_group()
    first, second = group.members
    # Serve function 0 alone; the engine binds its group companion (function 1) to vfio-pci too.
    res = converge(
        SYS,
        DriverMemory(str(state)),
        parse_node_config({"devices": [{"pciAddress": str(first), "resourceName": NAME}]}),
        echo=print,
    )
    assert res.exit_code == 0 and driver_of(first) == driver_of(second) == "vfio-pci"
    assert kernel_says_viable(group.number)
    unit = str(first)
    mgr = PluginManager(SYS, kubelet.plugin_dir, None, uevents=False)
    await mgr.start()
    try:
        await mgr.apply(
            parse_resources([{"resourceName": NAME, "selector": {"pciAddresses": [unit]}}])
        )
        await mgr.rescan()
        await kubelet.wait_registered(NAME, within=60)
        client = kubelet.client(NAME)
        await client.wait_for(lambda d: unit in d and d[unit].health == "Healthy", within=60)
        (resp,) = (await client.allocate([unit])).container_responses
        assert dict(resp.envs) == {"PCI_RESOURCE_EXAMPLE_COM_GPU-LIKE": unit}
        assert f"/dev/vfio/{group.number}" in [d.host_path for d in resp.devices]

        # Function 1 ("the audio") goes back to e1000e: no uevent reaches the agent (uevents
        # off) and /dev/vfio/<group> stays (function 0 keeps it), so only Allocate's re-read
        # of the whole group can see it.
        Executor(SYS, DriverMemory(str(state))).run(
            [
                Step("driver-override", second, ""),
                Step("unbind", second, "vfio-pci"),
                Step("probe", second, expect="e1000e"),
                Step("forget", second),
            ]
        )
        assert driver_of(second) == "e1000e" and driver_of(first) == "vfio-pci"
        assert os.path.exists(f"/dev/vfio/{group.number}")  # noqa: ASYNC240 - a stat, in a test
        assert not kernel_says_viable(group.number)  # VFIO itself would refuse the group
        reason = (
            f"IOMMU group {group.number} of {unit} cannot be assigned: {second} is bound to "
            "host driver e1000e; bind it to vfio-pci as well (VFIO assigns an IOMMU group "
            "whole: every function in it except bridges must be on vfio-pci, pci-stub or no "
            "driver)"
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.allocate([unit])
        print(err.value.details())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details() == f"{NAME}: device {unit} is not handed to a VM: {reason}"
        # The refusal made the agent re-read the group: Unhealthy, with the same sentence,
        # which is also what the NodeState status shows (same health rules, fresh discovery).
        await client.wait_for(lambda d: d[unit].health == "Unhealthy", within=60)
        assert mgr.plugins[NAME].devices[unit].verdict.reason == reason
        inv = SYS.discover()
        assert unit_health((first,), group.number, inv.devices, inv.groups).reason == reason
    finally:
        await mgr.close()


def test_colliding_resource_names_are_refused_and_nothing_changes(
    state: Path, tmp_path: Path
) -> None:
    group = two_function_group()
    first, second = group.members
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        "devices:\n"
        f"  - {{pciAddress: '{first}', resourceName: example.com/nic.a}}\n"
        f"  - {{pciAddress: '{second}', resourceName: example.com/NIC_a}}\n"
    )
    cli = [sys.executable, "-m", "hostdev.cli", "apply", "--config", str(cfg)]
    run = subprocess.run(
        [*cli, "--state-dir", str(state), "--host-root", "/"],
        capture_output=True,
        text=True,
        check=False,
    )
    print(run.stdout, run.stderr)
    assert run.returncode == 4  # bad input: nothing planned, nothing touched
    assert (
        "devices[1].resourceName: resource names example.com/nic.a and example.com/NIC_a both "
        "become PCI_RESOURCE_EXAMPLE_COM_NIC_A"
    ) in run.stderr
    assert "example.com/NIC_a is refused, rename it" in run.stderr
    assert driver_of(first) == driver_of(second) == "e1000e"
