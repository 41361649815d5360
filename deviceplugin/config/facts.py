"""Gather the guard facts (what the host is using) from the host root and the kernel.

Routes, mounts, device nodes and open files are read from ``/proc`` and ``/sys`` under
``--host-root``: the same code runs on a node (``/`` or a ``/host`` mount), against a real
kernel in the QEMU tier and against a fake tree in unit tests. Network and mount tables are
read as pid 1 sees them (``proc/1/...``), falling back to ``proc/self/...``, so an agent
without ``hostPID`` still reads the host's namespaces.

Addresses come from the kernel's own list over netlink (:mod:`hostdev.host.ifaddrs`, IPv4 and
IPv6, in the host's network namespace): ``/proc`` has no per-interface IPv4 list, and inferring
addresses from connected routes misses /32 and ``noprefixroute`` ones. The source is injectable
(``addresses=``) so fake trees keep working. Where the host's namespace is out of reach (the
agent without ``hostNetwork`` or ``CAP_SYS_ADMIN``) the old inference is the fallback, and every
up interface without a visible IPv4 address counts as *unverified*: the guard refuses to take it
unless ``allowUnsafe`` says so.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import struct
from collections.abc import Callable, Iterable, Mapping

from hostdev.host import bounded
from hostdev.host.address import PciAddress
from hostdev.host.ifaddrs import host_addresses
from hostdev.host.modalias import ModAliases, would_bind
from hostdev.host.model import Inventory
from hostdev.host.sysfs import Sysfs
from hostdev.policy.guards import GuardFacts

# interface name -> its addresses; None: the host's address list cannot be read from here
AddressSource = Callable[[], Mapping[str, tuple[str, ...]] | None]

log = logging.getLogger(__name__)

_PCI = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_IFF_UP = 0x1
_IPV6_SKIP_SCOPES = {0x10, 0x20}  # host, link


def _lines(path: str) -> list[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _first_existing(sysfs: Sysfs, *candidates: str) -> str:
    for c in candidates:
        p = sysfs.path(c)
        if os.path.exists(p):
            return p
    return sysfs.path(candidates[-1])


def _pci_of(link_target: str) -> PciAddress | None:
    """The nearest PCI function in a sysfs device path (the last ``dddd:bb:dd.f`` part)."""
    for part in reversed(link_target.split("/")):
        if _PCI.match(part):
            return PciAddress.parse(part)
    return None


def _pcis_of(link: str) -> list[PciAddress]:
    """The PCI functions behind a class device (``link``: its /sys/class or /sys/dev link).

    An NVMe namespace behind the kernel's multipath node (every namespace on recent kernels,
    6.12 included) lives under ``devices/virtual/nvme-subsystem/nvme-subsysN``: its functions
    are those of the subsystem's controllers, which the subsystem directory links to."""
    try:
        target = os.readlink(link)
    except OSError:
        return []
    addr = _pci_of(target)
    if addr is not None:
        return [addr]
    parts = target.split("/")
    if "nvme-subsystem" not in parts:
        return []
    subsys = os.path.join(
        os.path.dirname(link), *parts[: parts.index("nvme-subsystem") + 2]
    )  # relative link: resolve from the link's own directory
    out = []
    for name in sorted(os.listdir(subsys)) if os.path.isdir(subsys) else ():
        path = os.path.join(subsys, name)
        if re.fullmatch(r"nvme\d+", name) and os.path.islink(path):
            ctrl = _pci_of(os.readlink(path))
            if ctrl is not None:
                out.append(ctrl)
    return out


# ---- network --------------------------------------------------------------------------------
def _ipv4_routes(sysfs: Sysfs) -> tuple[set[str], dict[str, list[str]]]:
    default: set[str] = set()
    connected: dict[str, list[str]] = {}
    for line in _lines(_first_existing(sysfs, "proc/1/net/route", "proc/net/route"))[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        iface, dest, gw, mask = f[0], f[1], f[2], f[7]
        try:
            d, g, m = int(dest, 16), int(gw, 16), int(mask, 16)
        except ValueError:
            continue
        if d == 0 and m == 0:
            default.add(iface)
        elif g == 0:
            net = socket.inet_ntoa(struct.pack("<I", d))
            plen = bin(m).count("1")
            connected.setdefault(iface, []).append(f"{net}/{plen} (connected route)")
    return default, connected


def _ipv6(sysfs: Sysfs) -> tuple[set[str], dict[str, list[str]]]:
    default: set[str] = set()
    for line in _lines(_first_existing(sysfs, "proc/1/net/ipv6_route", "proc/net/ipv6_route")):
        f = line.split()
        if len(f) >= 10 and int(f[0], 16) == 0 and f[1] == "00" and f[9] != "lo":
            default.add(f[9])
    addrs: dict[str, list[str]] = {}
    for line in _lines(_first_existing(sysfs, "proc/1/net/if_inet6", "proc/net/if_inet6")):
        f = line.split()
        if len(f) < 6:
            continue
        try:
            scope = int(f[3], 16)
            addr = ipaddress.IPv6Address(int(f[0], 16))
        except ValueError:
            continue
        if scope in _IPV6_SKIP_SCOPES:
            continue
        addrs.setdefault(f[5], []).append(f"{addr}/{int(f[2], 16)}")
    return default, addrs


def _is_up(sysfs: Sysfs, iface: str) -> bool:
    raw = _lines(sysfs.path("sys/class/net", iface, "flags"))
    try:
        return bool(raw and int(raw[0], 16) & _IFF_UP)
    except ValueError:
        return False


# ---- block devices and mounts ---------------------------------------------------------------
def _mounted_majmin(sysfs: Sysfs) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in _lines(_first_existing(sysfs, "proc/1/mountinfo", "proc/self/mountinfo")):
        f = line.split()
        if len(f) >= 5:
            out.setdefault(f[2], []).append(f[4])
    return out


def _swaps(sysfs: Sysfs) -> set[str]:
    names = set()
    for line in _lines(sysfs.path("proc/swaps"))[1:]:
        f = line.split()
        if f and f[0].startswith("/dev/"):
            names.add(os.path.basename(f[0]))
    return names


def _block_usage(sysfs: Sysfs) -> dict[PciAddress, list[str]]:
    """PCI function -> "nvme0n1p2 on /" for every mounted (or swapped-on, or held by a mounted
    dm/md device) block device below it."""
    base = sysfs.path("sys/class/block")
    try:
        names = os.listdir(base)
    except OSError:
        return {}
    mounted = _mounted_majmin(sysfs)
    swaps = _swaps(sysfs)

    def uses(name: str, depth: int = 0) -> list[str]:
        out: list[str] = []
        dev = (_lines(os.path.join(base, name, "dev")) or [""])[0].strip()
        out += [f"{name} on {mp}" for mp in mounted.get(dev, [])]
        if name in swaps:
            out.append(f"{name} as swap")
        if depth < 4:  # dm-crypt on LVM on md ...: follow holders a few levels up
            try:
                holders = os.listdir(os.path.join(base, name, "holders"))
            except OSError:
                holders = []
            for h in holders:
                out += [f"{name} via {u}" for u in uses(h, depth + 1)]
        return out

    result: dict[PciAddress, list[str]] = {}
    for name in names:
        addrs = _pcis_of(os.path.join(base, name))
        u = uses(name) if addrs else []
        for addr in addrs if u else ():
            result.setdefault(addr, []).extend(u)
    return result


# ---- device nodes and who holds them open --------------------------------------------------
def _device_nodes(sysfs: Sysfs) -> dict[PciAddress, list[str]]:
    """PCI function -> /dev nodes of the class devices below it (its driver's nodes)."""
    out: dict[PciAddress, list[str]] = {}
    for kind in ("char", "block"):
        base = sysfs.path("sys/dev", kind)
        try:
            entries = os.listdir(base)
        except OSError:
            continue
        for e in entries:
            for addr in _pcis_of(os.path.join(base, e)):
                for line in _lines(os.path.join(base, e, "uevent")):
                    if line.startswith("DEVNAME="):
                        out.setdefault(addr, []).append("/dev/" + line[8:])
    return out


def _open_nodes(sysfs: Sysfs, interesting: set[str] | None) -> dict[str, list[str]]:
    """/dev path -> ["pid N (comm)"] for every process holding it open (``/proc/*/fd``)."""
    out: dict[str, list[str]] = {}
    proc = sysfs.path("proc")
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return out
    me = str(os.getpid())
    for pid in pids:
        fddir = os.path.join(proc, pid, "fd")
        try:
            fds = os.listdir(fddir)
        except OSError:
            continue  # gone, or a kernel thread
        hits: set[str] = set()
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fddir, fd))
            except OSError:
                continue
            if target.startswith("/dev/") and (interesting is None or target in interesting):
                hits.add(target)
        if not hits:
            continue
        comm = (_lines(os.path.join(proc, pid, "comm")) or ["?"])[0]
        who = f"pid {pid} ({comm})" + (" (this process)" if pid == me else "")
        for h in hits:
            out.setdefault(h, []).append(who)
    return out


def _overrides(
    sysfs: Sysfs, addrs: Iterable[PciAddress]
) -> tuple[dict[PciAddress, str], dict[PciAddress, str]]:
    """(driver_override where one is set, devices whose override could not be read in time)."""
    paths = {os.path.join(sysfs.pci_device_dir(a), "driver_override"): a for a in addrs}
    out: dict[PciAddress, str] = {}
    busy: dict[PciAddress, str] = {}
    for path, value in bounded.read_many(paths, sysfs.read_timeout).items():
        if value == bounded.BUSY:
            busy[paths[path]] = f"driver_override did not answer: {bounded.BUSY}"
        elif value and value != "(null)":
            out[paths[path]] = value
    return out, busy


def _addresses(
    sysfs: Sysfs,
    netdevs: set[str],
    source: AddressSource,
    connected: Mapping[str, list[str]],
    addrs6: Mapping[str, list[str]],
) -> tuple[dict[str, tuple[str, ...]], frozenset[str]]:
    """(up netdevs -> their addresses, up netdevs whose IPv4 addresses are unknown).
    ``connected``/``addrs6``: what /proc shows, the fallback when ``source`` has nothing."""
    up = {n for n in netdevs if _is_up(sysfs, n)}
    listed = source()
    if listed is not None:
        return {n: tuple(listed[n]) for n in sorted(up) if listed.get(n)}, frozenset()
    shown = {n: tuple(connected.get(n, []) + addrs6.get(n, [])) for n in sorted(up)}
    return {n: v for n, v in shown.items() if v}, frozenset(n for n in up if not connected.get(n))


def _would_bind(sysfs: Sysfs, inv: Inventory) -> dict[PciAddress, str]:
    """Driverless VFs -> the host driver the kernel would bind (their modalias match)."""
    vfs = [d for d in inv.devices.values() if d.is_vf and d.driver is None]
    aliases = ModAliases.load(sysfs.root) if vfs else None
    if aliases is None:
        return {}
    out = {}
    for d in vfs:
        drv = would_bind(sysfs.root, aliases, sysfs.pci_device_dir(d.address))
        if drv is not None:
            out[d.address] = drv
    return out


def gather_facts(
    sysfs: Sysfs,
    inv: Inventory,
    *,
    addresses: AddressSource | None = None,
    allocated: Mapping[PciAddress, str] | None = None,
) -> GuardFacts:
    """One pass over /proc and /sys (and one netlink dump) for everything the guards need.
    ``allocated``: devices the device plugin handed to pods, and to whom."""
    default4, connected = _ipv4_routes(sysfs)
    default6, addrs6 = _ipv6(sysfs)
    netdevs = {n for d in inv.devices.values() for n in d.netdevs}
    addressed, unverified = _addresses(
        sysfs, netdevs, addresses or (lambda: host_addresses(sysfs.root)), connected, addrs6
    )
    nodes = _device_nodes(sysfs)
    interesting = {n for ns in nodes.values() for n in ns}
    interesting |= {f"/dev/vfio/{g}" for g in inv.groups}
    overrides, busy = _overrides(sysfs, inv.devices)
    return GuardFacts(
        default_route_ifaces=frozenset((default4 | default6) & netdevs),
        addressed_ifaces=addressed,
        unverified_ifaces=unverified,
        mounts={a: tuple(v) for a, v in _block_usage(sysfs).items()},
        device_nodes={a: tuple(sorted(v)) for a, v in nodes.items()},
        open_nodes={k: tuple(v) for k, v in _open_nodes(sysfs, interesting).items()},
        driver_overrides=overrides,
        allocated=dict(allocated or {}),
        would_bind=_would_bind(sysfs, inv),
        busy=busy,
    )
