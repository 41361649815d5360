"""Event sources that make the agent rescan at once instead of polling.

- :class:`UeventSource`: the kernel's uevent netlink socket (``NETLINK_KOBJECT_UEVENT``), the
  same broadcast udev listens to. It is read with the standard library (``socket.AF_NETLINK``):
  the protocol is one datagram of NUL-separated ``KEY=VALUE`` lines per event, so parsing is a
  dozen lines, and pyroute2/pyudev would add a dependency (pyudev also wants libudev, absent in
  slim images) for no gain. No hostNetwork needed: the kernel broadcasts uevents into every
  network namespace owned by the initial user namespace, a normal pod's included
  (tests/chart/test_uevent_netns.py); a pod in a user namespace gets none.
- :class:`DirWatcher`: inotify (``inotify_simple``) on directories: ``/dev/vfio`` (group nodes
  come and go with vfio-pci binds) and the kubelet's device-plugin directory (kubelet.sock
  re-created = kubelet restarted; our own socket deleted = serve again).

Both hook into the asyncio loop with ``add_reader``: no threads, no polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from inotify_simple import INotify, flags

from hostdev.host.address import PciAddress, PciAddressError

log = logging.getLogger(__name__)

NETLINK_KOBJECT_UEVENT = 15
_KERNEL_GROUP = 1
PCI_ACTIONS = frozenset({"add", "remove", "bind", "unbind", "change", "move"})


@dataclass(frozen=True, slots=True)
class PciEvent:
    """A PCI uevent: ``address`` None when the event did not name a function."""

    action: str
    address: PciAddress | None


def parse_uevent(data: bytes) -> PciEvent | None:
    """A PCI-subsystem event from one kernel uevent datagram, else None."""
    parts = data.split(b"\0")
    if not parts or b"@" not in parts[0]:
        return None  # libudev's re-broadcasts start with "libudev"; we only read the kernel's
    env: dict[str, str] = {}
    for p in parts[1:]:
        k, sep, v = p.partition(b"=")
        if sep:
            env[k.decode("ascii", "replace")] = v.decode("ascii", "replace")
    if env.get("SUBSYSTEM") != "pci":
        return None
    action = env.get("ACTION", "")
    if action not in PCI_ACTIONS:
        return None
    slot = env.get("PCI_SLOT_NAME") or os.path.basename(env.get("DEVPATH", ""))
    try:
        addr: PciAddress | None = PciAddress.parse(slot)
    except PciAddressError:
        addr = None
    return PciEvent(action, addr)


class UeventSource:
    """Kernel PCI uevents, delivered to ``callback`` on the event loop."""

    def __init__(self, callback: Callable[[PciEvent], None]) -> None:
        self._callback = callback
        self._sock: socket.socket | None = None

    def open(self) -> None:
        """Open and subscribe; raises OSError where netlink uevents are not permitted."""
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((0, _KERNEL_GROUP))
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        self._sock = s
        asyncio.get_running_loop().add_reader(s.fileno(), self._on_readable)
        log.info("listening to kernel PCI uevents")

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                # ENOBUFS: we fell behind and lost events; a full rescan covers them.
                log.warning("uevent socket: %s; asking for a full rescan", e)
                self._callback(PciEvent("overflow", None))
                return
            ev = parse_uevent(data)
            if ev is not None:
                self._callback(ev)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


WATCH_FLAGS = (
    flags.CREATE
    | flags.DELETE
    | flags.MOVED_TO
    | flags.MOVED_FROM
    | flags.ATTRIB
    | flags.DELETE_SELF
    | flags.MOVE_SELF
)


class DirWatcher:
    """inotify on a set of directories; ``callback(directory, name, created)`` per event
    (``created``: the name was created or moved in; ``name`` "" when the directory itself
    was re-created).

    A directory that does not exist yet (``/dev/vfio`` before vfio is loaded) is watched
    through its parent until it appears.
    """

    def __init__(self, callback: Callable[[str, str, bool], None]) -> None:
        self._callback = callback
        self._ino = INotify()
        self._wd_dir: dict[int, str] = {}
        self._wanted: set[str] = set()
        asyncio.get_running_loop().add_reader(self._ino.fileno(), self._on_readable)

    def watch(self, directory: str) -> None:
        directory = os.path.abspath(directory)
        self._wanted.add(directory)
        self._add(directory)

    def _add(self, directory: str) -> None:
        try:
            wd = self._ino.add_watch(directory, WATCH_FLAGS)
        except FileNotFoundError:
            parent = os.path.dirname(directory)
            if parent != directory:
                self._add(parent)
            return
        self._wd_dir[wd] = directory

    def _on_readable(self) -> None:
        for ev in self._ino.read(timeout=0):
            directory = self._wd_dir.get(ev.wd)
            if directory is None:
                continue
            if ev.mask & (flags.DELETE_SELF | flags.MOVE_SELF | flags.IGNORED):
                self._wd_dir.pop(ev.wd, None)
                if directory in self._wanted:
                    self._add(directory)  # re-watch (or watch the parent until it returns)
                    self._callback(directory, "", True)
                continue
            path = os.path.join(directory, ev.name)
            if directory not in self._wanted:
                # A parent watched on behalf of a missing directory.
                if path in self._wanted or any(w.startswith(path + "/") for w in self._wanted):
                    for w in list(self._wanted):
                        if w == path or w.startswith(path + "/"):
                            self._add(w)
                            self._callback(w, "", True)
                continue
            self._callback(directory, ev.name, bool(ev.mask & (flags.CREATE | flags.MOVED_TO)))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._ino.fileno())
        self._ino.close()
