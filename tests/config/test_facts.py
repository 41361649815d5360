"""gather_facts reads routes, addresses, mounts, device nodes and open fds under a host root."""

from __future__ import annotations

import os
from pathlib import Path

from hostdev.deviceplugin.config.facts import gather_facts
from hostdev.host.address import PciAddress
from hostdev.host.sysfs import Sysfs
from hostdev.testing.fakesysfs import FakeHost

A = PciAddress.parse
NIC, NIC2, DISK = "0000:05:00.0", "0000:06:00.0", "0000:01:00.0"


def _w(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _ln(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def host(root: Path) -> FakeHost:
    h = FakeHost(root)
    h.add_device(DISK, vendor="144d", device="a80a", class_code="010802", driver="nvme")
    h.add_device(
        NIC, vendor="8086", device="10d3", class_code="020000", driver="e1000e", netdev="eno1"
    )
    h.add_device(
        NIC2, vendor="8086", device="10d3", class_code="020000", driver="e1000e", netdev="eno2"
    )
    r = h.root
    _w(
        r / "proc/net/route",
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eno1\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eno1\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "eno2\t0000A8C0\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n",
    )
    _w(
        r / "proc/net/ipv6_route",
        "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 "
        "00000000000000000000000000000000 00000100 00000001 00000000 00000001     eno2\n",
    )
    _w(
        r / "proc/net/if_inet6",
        "fe800000000000000000000000000001 03 40 20 80     eno2\n"
        "20010db8000000000000000000000005 03 40 00 80     eno2\n",
    )
    for name, flags in (("eno1", "0x1003"), ("eno2", "0x1003")):
        _w(r / "sys/class/net" / name / "flags", flags + "\n")
    # NVMe: controller char dev + namespace + partition; the partition is mounted on /
    dev_dir = h.device_dir(DISK)
    ctrl = dev_dir / "nvme/nvme0"
    _w(ctrl / "uevent", "MAJOR=240\nMINOR=0\nDEVNAME=nvme0\n")
    _w(ctrl / "nvme0n1/uevent", "MAJOR=259\nMINOR=0\nDEVNAME=nvme0n1\nDEVTYPE=disk\n")
    _w(ctrl / "nvme0n1/dev", "259:0\n")
    _w(ctrl / "nvme0n1/nvme0n1p2/uevent", "MAJOR=259\nMINOR=2\nDEVNAME=nvme0n1p2\n")
    _w(ctrl / "nvme0n1/nvme0n1p2/dev", "259:2\n")
    rel = os.path.relpath
    _ln(r / "sys/class/block/nvme0n1", rel(ctrl / "nvme0n1", r / "sys/class/block"))
    _ln(r / "sys/class/block/nvme0n1p2", rel(ctrl / "nvme0n1/nvme0n1p2", r / "sys/class/block"))
    _ln(r / "sys/dev/char/240:0", rel(ctrl, r / "sys/dev/char"))
    _ln(r / "sys/dev/block/259:0", rel(ctrl / "nvme0n1", r / "sys/dev/block"))
    _ln(r / "sys/dev/block/259:2", rel(ctrl / "nvme0n1/nvme0n1p2", r / "sys/dev/block"))
    _w(
        r / "proc/1/mountinfo",
        "22 1 259:2 / / rw,relatime - ext4 /dev/nvme0n1p2 rw\n"
        "23 22 0:21 / /proc rw - proc proc rw\n",
    )
    _w(r / "proc/swaps", "Filename\tType\tSize\tUsed\tPriority\n")
    # processes: smartd holds the NVMe controller, qemu holds a VFIO group, a thread-less pid
    _w(r / "proc/700/comm", "smartd\n")
    _ln(r / "proc/700/fd/3", "/dev/nvme0")
    _w(r / "proc/900/comm", "qemu-kvm\n")
    _ln(r / "proc/900/fd/20", "/dev/vfio/2")
    _ln(r / "proc/900/fd/21", "/dev/null")
    (r / "proc/2").mkdir(parents=True)
    # a driver_override left on the second NIC
    (h.device_dir(NIC2) / "driver_override").write_text("vfio-pci\n")
    return h


def test_gather_facts(tmp_path: Path) -> None:
    h = host(tmp_path)
    sysfs = Sysfs(str(h.root))
    f = gather_facts(sysfs, sysfs.discover())
    assert f.default_route_ifaces == frozenset({"eno1"})
    assert f.addressed_ifaces == {
        "eno1": ("192.0.2.0/24 (connected route)",),
        "eno2": ("192.168.0.0/16 (connected route)", "2001:db8::5/64"),
    }
    assert f.mounts == {A(DISK): ("nvme0n1p2 on /",)}
    assert f.device_nodes[A(DISK)] == ("/dev/nvme0", "/dev/nvme0n1", "/dev/nvme0n1p2")
    assert f.open_nodes == {
        "/dev/nvme0": ("pid 700 (smartd)",),
        "/dev/vfio/2": ("pid 900 (qemu-kvm)",),
    }
    assert f.driver_overrides == {A(NIC2): "vfio-pci"}


def test_down_interface_has_no_address_and_dm_holder_mount_counts(tmp_path: Path) -> None:
    h = host(tmp_path)
    r = h.root
    (r / "sys/class/net/eno2/flags").write_text("0x1002\n")  # IFF_UP cleared
    # LVM/dm on the namespace: nvme0n1 is held by dm-0, which is mounted on /var
    dm = r / "sys/devices/virtual/block/dm-0"
    _w(dm / "dev", "253:0\n")
    _ln(r / "sys/class/block/dm-0", os.path.relpath(dm, r / "sys/class/block"))
    _ln(r / "sys/class/block/nvme0n1/holders/dm-0", "../../../../../../../virtual/block/dm-0")
    with open(r / "proc/1/mountinfo", "a") as f:
        f.write("30 22 253:0 / /var rw - xfs /dev/mapper/vg-var rw\n")
    sysfs = Sysfs(str(r))
    facts = gather_facts(sysfs, sysfs.discover())
    assert "eno2" not in facts.addressed_ifaces
    assert facts.mounts[A(DISK)] == ("nvme0n1 via dm-0 on /var", "nvme0n1p2 on /")


def test_swap_on_a_partition_counts(tmp_path: Path) -> None:
    h = host(tmp_path)
    (h.root / "proc/1/mountinfo").write_text("23 1 0:21 / /proc rw - proc proc rw\n")
    (h.root / "proc/swaps").write_text(
        "Filename\tType\tSize\tUsed\tPriority\n/dev/nvme0n1p2 partition 1024 0 -2\n"
    )
    sysfs = Sysfs(str(h.root))
    assert gather_facts(sysfs, sysfs.discover()).mounts == {A(DISK): ("nvme0n1p2 as swap",)}


def test_missing_proc_files_mean_no_facts_not_errors(tmp_path: Path) -> None:
    h = FakeHost(tmp_path)
    h.add_device(
        NIC, vendor="8086", device="10d3", class_code="020000", driver="e1000e", netdev="eno1"
    )
    sysfs = Sysfs(str(h.root))
    f = gather_facts(sysfs, sysfs.discover())
    assert not f.default_route_ifaces and not f.addressed_ifaces and not f.mounts
    assert not f.open_nodes and not f.driver_overrides


def test_addresses_come_from_the_address_source(tmp_path: Path) -> None:
    """What the kernel lists (netlink) decides, /32 and noprefixroute ones included; down
    interfaces do not count."""
    h = host(tmp_path)
    (h.root / "sys/class/net/eno2/flags").write_text("0x1002\n")  # down
    sysfs = Sysfs(str(h.root))
    listed = {
        "eno1": ("203.0.113.5/32", "198.51.100.7/24 noprefixroute"),
        "eno2": ("10.0.0.1/8",),
        "lo": ("127.0.0.1/8",),
    }
    f = gather_facts(sysfs, sysfs.discover(), addresses=lambda: listed)
    assert f.addressed_ifaces == {"eno1": ("203.0.113.5/32", "198.51.100.7/24 noprefixroute")}
    assert f.unverified_ifaces == frozenset()


def test_without_the_kernels_address_list_ipv4_is_unverified(tmp_path: Path) -> None:
    """Fallback: connected routes and if_inet6 still count; an up interface with no IPv4 route
    may carry a /32 nobody can see from here, so it is unverified."""
    h = host(tmp_path)
    h.add_device(
        "0000:07:00.0", vendor="8086", device="10d3", class_code="020000", driver="e1000e",
        netdev="eno3",
    )  # fmt: skip
    _w(h.root / "sys/class/net/eno3/flags", "0x1003\n")
    sysfs = Sysfs(str(h.root))
    f = gather_facts(sysfs, sysfs.discover(), addresses=lambda: None)
    assert f.addressed_ifaces["eno1"] == ("192.0.2.0/24 (connected route)",)
    assert f.unverified_ifaces == frozenset({"eno3"})
    # a fake tree has no network namespace of its own: the default source falls back the same
    assert gather_facts(sysfs, sysfs.discover()).unverified_ifaces == frozenset({"eno3"})


def test_allocations_and_the_host_vf_driver_are_passed_on(tmp_path: Path) -> None:
    h = FakeHost(tmp_path)
    pf = h.add_pf(
        "0000:3b:00.0", vendor="8086", device="1592", vf_device="1889", totalvfs=4, numvfs=2,
        vf_driver="iavf",
    )  # fmt: skip
    vf0, vf1 = h.vf_address(pf, 0), h.vf_address(pf, 1)
    h.bind(vf0, None)
    sysfs = Sysfs(str(h.root))
    f = gather_facts(sysfs, sysfs.discover(), allocated={vf1: "pod a/b (example.com/vf)"})
    assert f.allocated == {vf1: "pod a/b (example.com/vf)"}
    assert f.would_bind == {vf0: "iavf"}  # driverless VF: its modalias against modules.alias


def test_a_driver_override_that_does_not_answer_makes_the_device_busy(tmp_path: Path) -> None:
    h = host(tmp_path)
    attr = h.device_dir(NIC) / "driver_override"
    attr.unlink()
    os.mkfifo(attr)  # a read of it blocks, as a read under a held device lock does
    sysfs = Sysfs(str(h.root), read_timeout=0.2)
    try:
        f = gather_facts(sysfs, sysfs.discover())
        assert "the kernel holds the device lock" in f.busy[A(NIC)]
        assert f.driver_overrides == {A(NIC2): "vfio-pci"}
    finally:
        release_fifo(attr)


def release_fifo(path: Path) -> None:
    """Let a reader blocked on the FIFO go (it reads EOF)."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.close(fd)


def test_a_mounted_nvme_namespace_behind_a_multipath_node_counts(tmp_path: Path) -> None:
    """Linux 6.12 puts every NVMe namespace behind a multipath head node under
    devices/virtual/nvme-subsystem/nvme-subsysN: its mount and its open /dev node belong to the
    subsystem's controllers (as the kernel tier showed on the backports boot)."""
    h = FakeHost(tmp_path)
    h.add_device(DISK, vendor="1b36", device="0010", class_code="010802", driver="nvme")
    r = h.root
    ctrl = h.device_dir(DISK) / "nvme/nvme0"
    _w(ctrl / "uevent", "MAJOR=240\nMINOR=0\nDEVNAME=nvme0\n")
    _w(ctrl / "nvme0c0n1/dev", "259:1\n")  # the hidden per-path disk: no /dev node
    subsys = r / "sys/devices/virtual/nvme-subsystem/nvme-subsys0"
    head = subsys / "nvme0n1"
    _w(head / "dev", "259:0\n")
    _w(head / "uevent", "MAJOR=259\nMINOR=0\nDEVNAME=nvme0n1\nDEVTYPE=disk\n")
    _ln(subsys / "nvme0", os.path.relpath(ctrl, subsys))
    rel = os.path.relpath
    _ln(r / "sys/class/block/nvme0n1", rel(head, r / "sys/class/block"))
    _ln(r / "sys/class/block/nvme0c0n1", rel(ctrl / "nvme0c0n1", r / "sys/class/block"))
    _ln(r / "sys/dev/block/259:0", rel(head, r / "sys/dev/block"))
    _w(r / "proc/1/mountinfo", "22 1 259:0 / /data rw - ext4 /dev/nvme0n1 rw\n")
    _w(r / "proc/77/comm", "postgres\n")
    _ln(r / "proc/77/fd/4", "/dev/nvme0n1")
    sysfs = Sysfs(str(r))
    f = gather_facts(sysfs, sysfs.discover())
    assert f.mounts == {A(DISK): ("nvme0n1 on /data",)}
    assert f.device_nodes[A(DISK)] == ("/dev/nvme0n1",)
    assert f.open_nodes == {"/dev/nvme0n1": ("pid 77 (postgres)",)}
