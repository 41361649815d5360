"""Helpers shared by the guest test modules (tests/kernel/guest/test_*.py). Runs INSIDE the
QEMU guest only: the modules import it as a sibling (pytest puts their folder on sys.path)."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hostdev.deviceplugin.config.apply import ApplyResult, converge
from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.host.address import PciAddress
from hostdev.host.model import Inventory, PciDevice
from hostdev.host.sysfs import Sysfs
from hostdev.policy.nodeconfig import parse_node_config

SYS = Sysfs("/")
NETLINK_KOBJECT_UEVENT = 15
VFIO_TYPE = ord(";")
VFIO_GROUP_GET_STATUS = (VFIO_TYPE << 8) | (100 + 3)  # _IO(VFIO_TYPE, VFIO_BASE + 3)


def inv() -> Inventory:
    return SYS.discover()


def devices(vendor: str, device: str) -> list[PciDevice]:
    return [d for d in inv().devices.values() if (d.vendor, d.device) == (vendor, device)]


def driver(a: PciAddress) -> str | None:
    link = Path(SYS.pci_device_dir(a)) / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def wait_for(cond: Any, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def apply(spec: dict[str, Any], state: Path, **kw: Any) -> ApplyResult:
    return converge(SYS, DriverMemory(str(state)), parse_node_config(spec), echo=print, **kw)


def write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def group_status_viable(group: int) -> bool:
    fd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
    try:
        buf = bytearray(struct.pack("II", 8, 0))
        fcntl.ioctl(fd, VFIO_GROUP_GET_STATUS, buf, True)
        return bool(struct.unpack("II", buf)[1] & 1)
    finally:
        os.close(fd)


# ---- a VFIO user, as QEMU is one ------------------------------------------------------------
_HOLDER = r"""
import ctypes, errno, fcntl, os, struct, sys, time
group, addr = sys.argv[1], sys.argv[2]
T = ord(";")
container = os.open("/dev/vfio/vfio", os.O_RDWR)
g = os.open(f"/dev/vfio/{group}", os.O_RDWR)
fcntl.ioctl(g, (T << 8) | 104, struct.pack("i", container))  # VFIO_GROUP_SET_CONTAINER
fcntl.ioctl(container, (T << 8) | 102, 1)  # VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU
end = time.monotonic() + 30
while True:  # right after vfio-pci's probe the device may not be openable yet (EAGAIN)
    try:
        fd = fcntl.ioctl(g, (T << 8) | 106, ctypes.create_string_buffer(addr.encode()))
        break
    except OSError as e:
        if e.errno != errno.EAGAIN or time.monotonic() > end:
            raise
        time.sleep(0.1)
print("holding", fd, flush=True)
time.sleep(3600)
"""


@contextmanager
def vfio_holder(dev: PciDevice) -> Iterator[subprocess.Popen[str]]:
    """A process holding ``dev`` through VFIO as QEMU does: container, group, device fd
    (VFIO_GROUP_GET_DEVICE_FD). Killed on exit."""
    assert dev.iommu_group is not None and dev.on_vfio, dev
    wait_for(lambda: os.path.exists(f"/dev/vfio/{dev.iommu_group}"), "the group node")
    p = subprocess.Popen(
        [sys.executable, "-I", "-c", _HOLDER, str(dev.iommu_group), str(dev.address)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.startswith("holding"), f"the VFIO holder did not get {dev.address}: {line!r}"
        yield p
    finally:
        p.kill()
        p.wait()
        if p.stdout is not None:
            p.stdout.close()


# ---- kernel uevents -----------------------------------------------------------------------
class Uevents:
    """Every kernel uevent from creation on, as field dicts (ACTION, DRIVER, PCI_SLOT_NAME...)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, 1))  # group 1: kernel uevents
        self.seen: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while select.select([self.sock], [], [], 0)[0]:
            data = self.sock.recv(1 << 16)
            fields = (f.decode(errors="replace") for f in data.split(b"\0")[1:] if b"=" in f)
            self.seen.append(dict(f.split("=", 1) for f in fields))
        return self.seen

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def uevents() -> Iterator[Uevents]:
    u = Uevents()
    yield u
    u.close()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)
