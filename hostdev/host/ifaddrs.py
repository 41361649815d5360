"""The host's interface addresses, IPv4 and IPv6, from the kernel over rtnetlink (RTM_GETADDR).

``/proc`` lists IPv6 addresses per interface but not IPv4 ones; inferring IPv4 addresses from
connected routes misses every address without a prefix route (a /32, ``noprefixroute``). The
kernel's own address list is one netlink dump away, so this module asks for it with a plain
``AF_NETLINK`` socket: the two messages and four attributes used do not justify a dependency
(pyroute2 would bring its own netns machinery, which forks).

Addresses belong to a network namespace. The dump runs in the host's: directly when this
process is in it (the CLI on a node, the agent with ``hostNetwork``), else by entering
``<host-root>/proc/1/ns/net`` on a throw-away thread, which needs ``CAP_SYS_ADMIN``. Without
either, :func:`host_addresses` returns None and the caller must treat IPv4 as unknown.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterator, Mapping

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR = 16, 18, 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP, NLM_F_MULTI = 0x1, 0x300, 0x2
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFLA_IFNAME = 3
IFA_F_NOPREFIXROUTE = 0x200
RT_SCOPE_LINK, RT_SCOPE_HOST = 253, 254
CLONE_NEWNET = 0x40000000
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTA = struct.Struct("=HH")

Addresses = Mapping[str, tuple[str, ...]]  # interface name -> "203.0.113.5/32 noprefixroute"


def _attrs(buf: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    while offset + _RTA.size <= len(buf):
        length, kind = _RTA.unpack_from(buf, offset)
        if length < _RTA.size:
            return
        yield kind & 0x3FFF, buf[offset + _RTA.size : offset + length]
        offset += (length + 3) & ~3


def _dump(sock: socket.socket, msg_type: int, body: bytes, seq: int) -> Iterator[tuple[int, bytes]]:
    """(type, message body) of every reply to one dump request."""
    sock.send(
        _NLMSG.pack(_NLMSG.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body
    )
    while True:
        data = sock.recv(65536)
        off = 0
        while off + _NLMSG.size <= len(data):
            length, kind, _flags, rseq, _pid = _NLMSG.unpack_from(data, off)
            if length < _NLMSG.size:
                return
            payload = data[off + _NLMSG.size : off + length]
            off += (length + 3) & ~3
            if rseq != seq:
                continue
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", payload)
                if code:
                    raise OSError(-code, os.strerror(-code))
                return
            yield kind, payload


def _format(family: int, raw: bytes, plen: int, flags: int) -> str:
    if family == socket.AF_INET:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(raw[:4])
    else:
        addr = ipaddress.IPv6Address(raw[:16])
    return f"{addr}/{plen}" + (" noprefixroute" if flags & IFA_F_NOPREFIXROUTE else "")


def read_addresses() -> dict[str, tuple[str, ...]]:
    """Every address of this thread's network namespace except host- and link-scope ones
    (loopback; the fe80:: every up IPv6 interface has), per interface name."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        names: dict[int, str] = {}
        for kind, body in _dump(sock, RTM_GETLINK, _IFINFO.pack(0, 0, 0, 0, 0), 1):
            if kind != RTM_NEWLINK or len(body) < _IFINFO.size:
                continue
            index = _IFINFO.unpack_from(body)[2]
            for attr, value in _attrs(body, _IFINFO.size):
                if attr == IFLA_IFNAME:
                    names[index] = value.rstrip(b"\0").decode("utf-8", "replace")
        out: dict[str, list[str]] = {}
        for kind, body in _dump(sock, RTM_GETADDR, _IFADDR.pack(0, 0, 0, 0, 0), 2):
            if kind != RTM_NEWADDR or len(body) < _IFADDR.size:
                continue
            family, plen, flags8, scope, index = _IFADDR.unpack_from(body)
            if scope in (RT_SCOPE_LINK, RT_SCOPE_HOST) or family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                continue
            attrs = dict(_attrs(body, _IFADDR.size))
            # IPv4: IFA_LOCAL is the address (IFA_ADDRESS is the peer on point-to-point links)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw is None:
                continue
            flags = struct.unpack("=I", attrs[IFA_FLAGS][:4])[0] if IFA_FLAGS in attrs else flags8
            out.setdefault(names.get(index, f"if{index}"), []).append(
                _format(family, raw, plen, flags)
            )
        return {k: tuple(v) for k, v in out.items()}


def _same_file(a: str, b: str) -> bool | None:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return None
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _in_namespace(ns_path: str) -> dict[str, tuple[str, ...]]:
    """read_addresses() with this call's thread moved into the namespace at ``ns_path``."""
    result: list[dict[str, tuple[str, ...]]] = []
    failure: list[OSError] = []

    def enter_and_read() -> None:
        try:
            fd = os.open(ns_path, os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns_path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(read_addresses())
        except OSError as e:
            failure.append(e)

    # setns moves only the calling thread; this one ends right after, so nothing else moves.
    t = threading.Thread(target=enter_and_read, name="netns-addresses", daemon=True)
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return result[0]


def host_addresses(host_root: str) -> dict[str, tuple[str, ...]] | None:
    """The addresses of the network namespace of ``<host_root>/proc/1`` (the host's init), or
    None when this process can neither be in it nor enter it (the reason is not an error: the
    caller falls back to what ``/proc`` shows)."""
    host_ns = os.path.join(host_root, "proc/1/ns/net")
    same = _same_file("/proc/self/ns/net", host_ns)
    try:
        if same:
            return read_addresses()
        if same is None:
            return None  # no such namespace file: a saved or fake tree, or no access to pid 1
        return _in_namespace(host_ns)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOSYS):
            return None
        raise
