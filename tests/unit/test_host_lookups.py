"""Host lookups of the configuration guards: the host driver a device's modalias matches, and
the kernel's interface addresses over rtnetlink."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from hostdev.host.ifaddrs import host_addresses, read_addresses
from hostdev.host.modalias import ModAliases, driver_of_module, would_bind
from hostdev.testing.fakesysfs import FakeHost

REL = "6.12.0-test"


def aliases(root: Path, lines: str, builtin: str = "") -> ModAliases:
    (root / "proc/sys/kernel").mkdir(parents=True, exist_ok=True)
    (root / "proc/sys/kernel/osrelease").write_text(REL + "\n")
    mdir = root / "lib/modules" / REL
    mdir.mkdir(parents=True)
    (mdir / "modules.alias").write_text(lines)
    if builtin:
        (mdir / "modules.builtin.alias").write_text(builtin)
    got = ModAliases.load(str(root))
    assert got is not None
    return got


def test_most_specific_alias_wins_and_vfio_is_never_the_host_driver(tmp_path: Path) -> None:
    a = aliases(
        tmp_path,
        "# Aliases extracted from modules themselves.\n"
        "alias pci:v00008086d000010CAsv*sd*bc*sc*i* igbvf\n"
        "alias pci:v*d*sv*sd*bc02sc00i* generic_nic\n"
        "alias vfio_pci:v00008086d000010CAsv*sd*bc*sc*i* vfio_pci\n"
        "alias pci:v*d*sv*sd*bc*sc*i* pci_stub\n"
        "alias usb:v1234p* some_usb\n",
        builtin="alias pci:v00001B36d00000010sv*sd*bc01sc08i02 nvme\n",
    )
    vf = "pci:v00008086d000010CAsv00001AF4sd00001100bc02sc00i00"
    assert a.modules_for(vf) == ("igbvf", "generic_nic")
    assert a.modules_for("pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02") == ("nvme",)
    assert a.modules_for("pci:v0000ABCDd00000001sv0000ABCDsd00000001bc03sc00i00") == ()


def test_would_bind_reads_the_devices_modalias_and_names_the_driver(tmp_path: Path) -> None:
    h = FakeHost(tmp_path, release=REL)
    pf = h.add_pf(
        "0000:81:00.0", vendor="8086", device="10c9", vf_device="10ca", totalvfs=7, numvfs=1,
        vf_driver="igbvf",
    )  # fmt: skip
    vf = h.vf_address(pf, 0)
    a = ModAliases.load(str(h.root))
    assert a is not None
    assert would_bind(str(h.root), a, str(h.device_dir(vf))) == "igbvf"
    # a module whose PCI driver has another name, once loaded
    (h.root / "sys/module/vfio_pci/drivers/pci:vfio-pci").mkdir(parents=True)
    assert driver_of_module(str(h.root), "vfio_pci") == "vfio-pci"
    assert driver_of_module(str(h.root), "igbvf") == "igbvf"


def test_no_module_aliases_under_the_host_root(tmp_path: Path) -> None:
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/osrelease").write_text(REL + "\n")
    assert ModAliases.load(str(tmp_path)) is None  # (the chart mounts /lib/modules read-only)
    assert ModAliases.load(str(tmp_path / "nothing")) is None


def test_netlink_addresses_match_the_kernels_ipv6_list() -> None:
    """This process's own namespace: every global IPv6 address /proc lists, and IPv4 ones."""
    got = read_addresses()
    assert "lo" not in got  # host scope only: left out
    want6 = set()
    with open("/proc/self/net/if_inet6") as f:
        for line in f:
            addr, _, plen, scope, _, name = line.split()
            if int(scope, 16) not in (0x10, 0x20):
                ip = ipaddress.IPv6Address(int(addr, 16))
                want6.add((name, f"{ip}/{int(plen, 16)}"))
    got6 = {(n, a.split()[0]) for n, addrs in got.items() for a in addrs if ":" in a}
    assert got6 == want6
    for name, addrs in got.items():
        for a in addrs:
            ipaddress.ip_interface(a.split()[0])  # well-formed
        assert socket.if_nametoindex(name) > 0


def test_a_tree_without_a_network_namespace_has_no_address_list(tmp_path: Path) -> None:
    assert host_addresses(str(tmp_path)) is None
    try:
        same = os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        same = False  # pid 1 is out of reach here (a sandbox): nothing more to compare
    if same:
        assert host_addresses("/") == read_addresses()
