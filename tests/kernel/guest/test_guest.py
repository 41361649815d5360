"""Runs INSIDE the QEMU guest (tests/kernel/run-guest.sh), as root, against the real kernel.

The host-side module tests/kernel/test_real_kernel.py boots each guest (Debian's kernel, and
backports' with the igb NIC) once, runs this file with pytest on both and turns each function
here into one host-side test per boot. Topology: see run-guest.sh.
Every test leaves the guest as it found it (the autouse fixture restores via the engine).
"""

from __future__ import annotations

import errno
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("RK_GUEST") != "1":  # pragma: no cover - guarded twice (conftest too)
    pytest.skip(
        "guest-only tests: run through tests/kernel/test_real_kernel.py", allow_module_level=True
    )

from guestlib import (
    NETLINK_KOBJECT_UEVENT,
    SYS,
    apply,
    devices,
    driver,
    group_status_viable,
    inv,
    wait_for,
    write,
)

from hostdev.deviceplugin.config.apply import converge
from hostdev.deviceplugin.config.executor import Executor, StepError
from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.deviceplugin.events import PciEvent, parse_uevent
from hostdev.deviceplugin.hostview import HostView
from hostdev.host.address import PciAddress
from hostdev.host.model import PciDevice
from hostdev.policy.health import unit_health
from hostdev.policy.nodeconfig import parse_node_config
from hostdev.policy.plan import Step

QEMU_VENDOR, NVME_DEV = "1b36", "0010"
INTEL, E1000E, E1000 = "8086", "10d3", "100e"


# ---- helpers --------------------------------------------------------------------------------
def nvme_pf() -> PciDevice:
    pfs = [d for d in devices(QEMU_VENDOR, NVME_DEV) if d.is_pf]
    assert len(pfs) == 1, f"expected one emulated NVMe SR-IOV PF, found {pfs}"
    return pfs[0]


def plain_e1000e() -> PciDevice:
    # the single-function e1000e (own slot, NUMA node 1), not the 2-function pair
    pair = {d.address for d in e1000e_pair()}
    (dev,) = [d for d in devices(INTEL, E1000E) if d.address not in pair]
    return dev


def e1000e_pair() -> list[PciDevice]:
    by_slot: dict[tuple[int, int], list[PciDevice]] = {}
    for d in devices(INTEL, E1000E):
        by_slot.setdefault((d.address.bus, d.address.device), []).append(d)
    (pair,) = [v for v in by_slot.values() if len(v) == 2]
    return sorted(pair, key=lambda d: d.address)


def bridged_e1000() -> list[PciDevice]:
    return sorted(devices(INTEL, E1000), key=lambda d: d.address)


def virtio_net() -> PciDevice:
    found = devices("1af4", "1041") or devices("1af4", "1000")
    assert len(found) == 1, found
    return found[0]


# ---- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _guest_setup() -> None:
    subprocess.run(["modprobe", "vfio-pci"], check=True)
    subprocess.run(["modprobe", "vfio_iommu_type1"], check=True)
    # NVMe VFs cannot be brought up by the nvme driver without virt-mgmt commands: do not let
    # it probe them (an admin's choice for VFs destined for vfio-pci).
    write(os.path.join(SYS.pci_device_dir(nvme_pf().address), "sriov_drivers_autoprobe"), "0")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "state"
    yield d
    # Put the guest back: restore everything hostdev moved, drop the VFs.
    res = apply({"pfs": [{"pciAddress": str(nvme_pf().address), "numVfs": 0}]}, d)
    assert res.exit_code == 0, "cleanup did not converge"
    assert DriverMemory(str(d)).originals == {}


# ---- discovery against the real kernel ------------------------------------------------------
def test_discovery_sees_intel_iommu_with_interrupt_remapping() -> None:
    node = inv().node
    assert node.enabled and node.vendor == "intel", node
    assert "dmar0" in node.units
    assert node.interrupt_remapping is True
    assert node.vfio_modules["vfio_pci"] and node.vfio_container
    assert any(p.startswith("intel_iommu=on") for p in node.cmdline)


def test_groups_and_viability_match_the_kernel() -> None:
    i = inv()
    pair = e1000e_pair()
    g2 = i.group_of(pair[0])
    assert g2 is not None and set(g2.members) == {d.address for d in pair}
    assert not g2.viable and "e1000e" in (g2.reason or "")
    e1000s = bridged_e1000()
    g3 = i.group_of(e1000s[0])
    assert g3 is not None and len(g3.members) == 3, g3
    bridges = [i.devices[m] for m in g3.members if i.devices[m].is_bridge]
    assert len(bridges) == 1 and bridges[0].vendor == QEMU_VENDOR
    assert {d.address for d in e1000s} <= set(g3.members)
    assert not g3.viable  # both NICs on e1000
    g1 = i.group_of(virtio_net())
    assert g1 is not None and len(g1.members) == 1


def test_numa_nodes_from_pxb_expanders() -> None:
    assert nvme_pf().numa_node == 0
    assert plain_e1000e().numa_node == 1
    assert virtio_net().numa_node is None  # on pcie.0: no affinity (-1)


# ---- VFs and binding through the engine -----------------------------------------------------
def test_create_and_resize_vfs(state: Path) -> None:
    pf = nvme_pf()
    assert pf.sriov_totalvfs == 4 and pf.sriov_numvfs == 0 and pf.driver == "nvme"
    res = apply({"pfs": [{"pciAddress": str(pf.address), "numVfs": 2}]}, state)
    assert res.exit_code == 0 and res.converged
    i = inv()
    pf2 = i.devices[pf.address]
    assert pf2.sriov_numvfs == 2 and len(pf2.virtfns) == 2
    for idx, vf in enumerate(pf2.virtfns):
        d = i.devices[vf]
        assert d.physfn == pf.address and d.vf_index == idx and d.numa_node == 0
        assert d.iommu_group is not None and d.iommu_group != pf2.iommu_group
    # 2 -> 3 goes through 0 (the kernel refuses 2 -> 3 directly: see the error-mapping test)
    res = apply({"pfs": [{"pciAddress": str(pf.address), "numVfs": 3}]}, state)
    assert res.exit_code == 0
    kinds = [(s.kind, s.value) for s in res.executed]
    assert kinds == [("set-numvfs", "0"), ("set-numvfs", "3")]
    assert inv().devices[pf.address].sriov_numvfs == 3


def test_bind_vfs_and_plain_device_then_restore(state: Path) -> None:
    pf = nvme_pf()
    net = virtio_net()
    assert net.driver == "virtio-pci"
    spec = {
        "pfs": [{"pciAddress": str(pf.address), "numVfs": 2}],
        "devices": [
            {"selector": {"pfNames": [f"{pf.address}#0-1"]}, "resourceName": "hostdev.io/nvme-vf"},
            {"pciAddress": str(net.address), "resourceName": "hostdev.io/net"},
        ],
    }
    res = apply(spec, state)
    assert res.exit_code == 0 and res.converged, res
    i = inv()
    vfs = i.devices[pf.address].virtfns
    for a in (*vfs, net.address):
        d = i.devices[a]
        assert d.driver == "vfio-pci", d
        g = i.group_of(d)
        assert g is not None and g.viable and g.vfio_node
        assert os.path.exists(f"/dev/vfio/{d.iommu_group}")
        assert group_status_viable(d.iommu_group or -1)
    originals = DriverMemory(str(state)).originals
    assert originals[net.address] == "virtio-pci"
    assert all(originals[v] is None for v in vfs)  # autoprobe off: VFs came up driverless
    # idempotent: a converged node plans nothing
    again = apply(spec, state)
    assert again.executed == () and again.plans[0].steps == ()
    # restore: nothing wanted any more
    res = apply({"pfs": [{"pciAddress": str(pf.address), "numVfs": 2}]}, state)
    assert res.exit_code == 0
    i = inv()
    assert i.devices[net.address].driver == "virtio-pci"
    assert all(i.devices[v].driver is None for v in vfs)
    assert not os.path.exists(f"/dev/vfio/{net.iommu_group}")
    assert DriverMemory(str(state)).originals == {}
    assert (Path(SYS.pci_device_dir(net.address)) / "driver_override").read_text().strip() == (
        "(null)"
    )


def test_group_companions_are_bound_together(state: Path) -> None:
    first, second = e1000e_pair()
    res = apply({"devices": [{"pciAddress": str(first.address)}]}, state)
    assert res.exit_code == 0
    assert driver(first.address) == driver(second.address) == "vfio-pci"
    g = inv().group_of(first)
    assert g is not None and g.viable
    assert group_status_viable(first.iommu_group or -1)
    res = apply({}, state)
    assert res.exit_code == 0
    assert driver(first.address) == driver(second.address) == "e1000e"


# ---- refusals on the real kernel ------------------------------------------------------------
def test_refuses_numvfs_change_while_a_vf_group_is_open(state: Path) -> None:
    pf = nvme_pf()
    spec: dict[str, Any] = {
        "pfs": [{"pciAddress": str(pf.address), "numVfs": 2}],
        "devices": [{"selector": {"pfNames": [f"{pf.address}#0"]}}],
    }
    assert apply(spec, state).exit_code == 0
    vf0 = inv().devices[inv().devices[pf.address].virtfns[0]]
    fd = os.open(f"/dev/vfio/{vf0.iommu_group}", os.O_RDWR)  # "a running VM"
    try:
        spec["pfs"][0]["numVfs"] = 3
        res = apply(spec, state)
        assert res.exit_code == 1 and res.executed == ()
        (ref,) = res.refusals
        text = ref.describe()
        print(text)
        assert f"/dev/vfio/{vf0.iommu_group} is held open by pid {os.getpid()}" in text
        assert not ref.overridable
        assert inv().devices[pf.address].sriov_numvfs == 2
        # restoring the VF is refused too while the group is open
        res = apply({"pfs": spec["pfs"][:0]}, state)
        assert res.exit_code == 1 and driver(vf0.address) == "vfio-pci"
    finally:
        os.close(fd)
    res = apply(spec, state)
    assert res.exit_code == 0 and inv().devices[pf.address].sriov_numvfs == 3


def test_refuses_to_leave_a_group_half_bound(state: Path) -> None:
    a, b = bridged_e1000()
    spec = {
        "devices": [
            {"pciAddress": str(a.address)},
            {"pciAddress": str(b.address), "driver": "e1000"},
        ]
    }
    res = apply(spec, state)
    assert res.exit_code == 1 and res.executed == ()
    (ref,) = res.refusals
    print(ref.describe())
    assert f"{b.address}, which must stay on host driver e1000" in ref.describe()
    assert driver(a.address) == driver(b.address) == "e1000"


def test_half_bound_group_is_not_viable_in_discovery_and_vfio(state: Path) -> None:
    a, b = bridged_e1000()
    mem = DriverMemory(str(state))
    ex = Executor(SYS, mem)
    ex.run(
        [
            Step("remember", a.address, "e1000"),
            Step("driver-override", a.address, "vfio-pci"),
            Step("unbind", a.address, "e1000"),
            Step("probe", a.address, expect="vfio-pci"),
        ]
    )
    assert driver(a.address) == "vfio-pci" and driver(b.address) == "e1000"
    g = inv().group_of(a)
    assert (
        g is not None
        and not g.viable
        and f"{b.address} is bound to host driver e1000" in (g.reason or "")
    )
    assert not group_status_viable(a.iommu_group or -1)  # the kernel agrees


def test_refuses_device_with_address_and_default_route(state: Path) -> None:
    net = virtio_net()
    (ifname,) = net.netdevs
    ip = ["ip", "-oneline"]
    subprocess.run([*ip, "addr", "add", "10.99.0.1/24", "dev", ifname], check=True)
    subprocess.run([*ip, "link", "set", ifname, "up"], check=True)
    subprocess.run([*ip, "route", "add", "default", "via", "10.99.0.254"], check=True)
    try:
        res = apply({"devices": [{"pciAddress": str(net.address)}]}, state)
        assert res.exit_code == 1 and driver(net.address) == "virtio-pci"
        (ref,) = res.refusals
        text = ref.describe()
        print(text)
        assert f"carries the default route (via {ifname})" in text
        assert f"{ifname}: 10.99.0.1/24" in text  # the kernel's address list (netlink)
        assert ref.overridable
    finally:
        subprocess.run([*ip, "route", "del", "default"], check=False)
        subprocess.run([*ip, "addr", "flush", "dev", ifname], check=False)
        subprocess.run([*ip, "link", "set", ifname, "down"], check=False)


def test_refuses_device_whose_driver_nodes_are_open(state: Path) -> None:
    pf = nvme_pf()
    ctrl = "/dev/" + os.listdir(os.path.join(SYS.pci_device_dir(pf.address), "nvme"))[0]
    fd = os.open(ctrl, os.O_RDONLY)
    try:
        res = apply({"devices": [{"pciAddress": str(pf.address)}]}, state)
        assert res.exit_code == 1 and driver(pf.address) == "nvme"
        text = res.refusals[0].describe()
        print(text)
        assert f"{ctrl} by pid {os.getpid()}" in text
    finally:
        os.close(fd)


def test_refuses_controller_of_a_mounted_disk(state: Path, tmp_path: Path) -> None:
    (disk,) = [d for d in devices(QEMU_VENDOR, NVME_DEV) if not d.is_pf]
    ctrl_dir = Path(SYS.pci_device_dir(disk.address)) / "nvme"
    wait_for(lambda: any(ctrl_dir.glob("nvme*/nvme*n1")), "the NVMe namespace")
    # Linux 6.12 puts every namespace behind a multipath head (nvme0n1, under the NVMe
    # subsystem) over a hidden per-path disk (nvme0c0n1, under the controller): use the head.
    blk = re.sub(r"c\d+n", "n", next(ctrl_dir.glob("nvme*/nvme*n1")).name)
    wait_for(lambda: os.path.exists(f"/dev/{blk}"), f"/dev/{blk}")
    # the kernel's own module requests run in the initramfs root, not this one: load ext4 here
    subprocess.run(["modprobe", "ext4"], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", f"/dev/{blk}"], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", f"/dev/{blk}", str(mnt)], check=True)
    try:
        res = apply({"devices": [{"pciAddress": str(disk.address)}]}, state)
        assert res.exit_code == 1 and driver(disk.address) == "nvme"
        text = res.refusals[0].describe()
        print(text)
        # pid 1's mount table: the guest's init sees this chroot's paths under /newroot
        assert f"{disk.address} hosts a mounted filesystem ({blk} on " in text
        assert f"{mnt})" in text
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    res = apply({"devices": [{"pciAddress": str(disk.address)}]}, state)
    assert res.exit_code == 0 and driver(disk.address) == "vfio-pci"


# ---- kernel errors, mapped to words ---------------------------------------------------------
def test_kernel_errors_are_explained(state: Path) -> None:
    pf = nvme_pf()
    ex = Executor(SYS, DriverMemory(str(state)))
    ex.apply_step(Step("set-numvfs", pf.address, "2"))
    with pytest.raises(StepError) as e:
        ex.apply_step(Step("set-numvfs", pf.address, "3"))
    assert e.value.errno == errno.EBUSY
    assert "VFs in use / already enabled (2 VFs): set sriov_numvfs to 0 first" in str(e.value)
    with pytest.raises(StepError) as e:
        ex.apply_step(Step("set-numvfs", pf.address, "9"))
    assert e.value.errno == errno.ERANGE
    assert "9 VFs is above sriov_totalvfs (4) (ERANGE)" in str(e.value)
    ex.apply_step(Step("set-numvfs", pf.address, "0"))
    ex.apply_step(Step("unbind", pf.address, "nvme"))
    try:
        with pytest.raises(StepError) as e:
            ex.apply_step(Step("set-numvfs", pf.address, "1"))
        assert e.value.errno == errno.ENOENT
        assert "PF has no driver: bind it to its host driver first (ENOENT)" in str(e.value)
        with pytest.raises(StepError) as e:
            ex.apply_step(Step("unbind", pf.address, "nvme"))
        assert e.value.errno == errno.ENODEV and "not bound to nvme any more" in str(e.value)
    finally:
        ex.apply_step(Step("probe", pf.address, expect="nvme"))
    print("\n".join(str(x) for x in ("EBUSY", "ERANGE", "ENOENT", "ENODEV")))


# ---- health: a real uevent when a VF leaves vfio-pci ----------------------------------------
def _await_unbind_uevent(sock: socket.socket, addr: PciAddress) -> bytes:
    seen: list[bytes] = []
    end = time.monotonic() + 20
    while time.monotonic() < end:
        r, _, _ = select.select([sock], [], [], 1.0)
        if not r:
            continue
        data = sock.recv(65536)
        seen.append(data[:80])
        fields = dict(f.decode().split("=", 1) for f in data.split(b"\0")[1:] if b"=" in f)
        if fields.get("ACTION") == "unbind" and fields.get("PCI_SLOT_NAME") == str(addr):
            return data
    raise AssertionError(f"no unbind uevent for {addr}; saw {seen}")


def test_unbind_from_vfio_raises_uevent_and_removes_group_node(state: Path) -> None:
    pf = nvme_pf()
    spec = {
        "pfs": [{"pciAddress": str(pf.address), "numVfs": 1}],
        "devices": [{"selector": {"pfNames": [f"{pf.address}#0"]}}],
    }
    assert apply(spec, state).exit_code == 0
    vf = inv().devices[inv().devices[pf.address].virtfns[0]]
    node = f"/dev/vfio/{vf.iommu_group}"
    assert vf.driver == "vfio-pci" and os.path.exists(node)
    # the device plugin's own view and health verdict, before and after (its code, real kernel)
    view = HostView(SYS)
    before = view.full()
    assert unit_health((vf.address,), vf.iommu_group, before.devices, before.groups).healthy
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
    try:
        sock.bind((0, 1))  # group 1: kernel uevents
        write(os.path.join(SYS.path("sys/bus/pci/drivers/vfio-pci"), "unbind"), str(vf.address))
        data = _await_unbind_uevent(sock, vf.address)
    finally:
        sock.close()
    fields = dict(f.decode().split("=", 1) for f in data.split(b"\0")[1:] if b"=" in f)
    print(f"uevent: {fields}")
    assert fields["SUBSYSTEM"] == "pci" and fields["DEVPATH"].endswith(str(vf.address))
    assert "DRIVER" not in fields  # the kernel sends unbind after the driver is gone
    assert parse_uevent(data) == PciEvent("unbind", vf.address)
    wait_for(lambda: not os.path.exists(node), f"{node} to vanish")
    after = view.refresh([vf.address])  # what the plugin's rescan does on that event
    verdict = unit_health((vf.address,), vf.iommu_group, after.devices, after.groups)
    print(f"health after unbind: {verdict}")
    assert not verdict.healthy and verdict.kubelet == "Unhealthy"
    assert verdict.reason == f"{vf.address} is bound to no driver, not vfio-pci"
    d = inv().devices[vf.address]
    assert d.driver is None and not inv().group_of(d).vfio_node  # type: ignore[union-attr]


# ---- crash between two steps: a restart converges -------------------------------------------
@pytest.mark.parametrize("kill_after", [3, 4, 6])
def test_agent_killed_between_steps_restart_converges(state: Path, kill_after: int) -> None:
    first, second = e1000e_pair()
    spec = {"devices": [{"pciAddress": str(first.address)}]}

    def die(i: int, _step: Step) -> None:
        if i == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()
    if pid == 0:  # the "agent"
        try:
            converge(
                SYS, DriverMemory(str(state)), parse_node_config(spec), on_step=die, echo=print
            )
        finally:
            os._exit(0)  # not reached when killed
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print(f"killed after step {kill_after}: {driver(first.address)}, {driver(second.address)}")
    assert DriverMemory(str(state)).originals[first.address] == "e1000e"
    if kill_after == 4:  # first function on vfio-pci, second still on e1000e: half-bound
        assert not inv().group_of(first).viable  # type: ignore[union-attr]
    res = apply(spec, state)  # the restarted agent
    assert res.exit_code == 0 and res.converged
    assert driver(first.address) == driver(second.address) == "vfio-pci"
    assert inv().group_of(first).viable  # type: ignore[union-attr]


# ---- the CLI, end to end --------------------------------------------------------------------
def test_hostdev_apply_cli(state: Path, tmp_path: Path) -> None:
    net = virtio_net()
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"spec:\n  devices:\n    - pciAddress: {net.address}\n")
    cli = [sys.executable, "-m", "hostdev.cli", "apply", "--config", str(cfg)]
    cli += ["--state-dir", str(state), "--host-root", "/"]
    dry = subprocess.run([*cli, "--dry-run"], capture_output=True, text=True, check=False)
    print(dry.stdout, dry.stderr)
    assert dry.returncode == 0 and "drivers_probe -> expect vfio-pci" in dry.stdout
    assert driver(net.address) == "virtio-pci"
    run = subprocess.run(cli, capture_output=True, text=True, check=False)
    print(run.stdout, run.stderr)
    assert run.returncode == 0 and "hostdev apply: converged" in run.stdout
    assert driver(net.address) == "vfio-pci"
    again = subprocess.run(cli, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "node is converged: nothing to do" in again.stdout
