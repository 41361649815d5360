"""Why the agent DaemonSet does not need hostNetwork: on the running kernel, a PCI device's
uevent reaches a NETLINK_KOBJECT_UEVENT listener inside a *new* network namespace (as a pod's
is), because uevents of kobjects without a network-namespace tag are broadcast into every
network namespace owned by the initial user namespace (lib/kobject_uevent.c).

Triggers one synthetic "change" uevent on a PCI function (writing "change" to its ``uevent``
file: what ``udevadm trigger`` does; no driver or device state changes). Needs root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.fixtures.tiers import tier_unavailable

LISTENER = r"""
import os, socket, sys
s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)  # NETLINK_KOBJECT_UEVENT
s.bind((0, 1))  # multicast group 1: the kernel's uevents
s.settimeout(10)
print(os.readlink("/proc/self/ns/net"), flush=True)
want = sys.argv[1].encode()
try:
    while True:
        fields = s.recv(65536).split(b"\0")
        if b"ACTION=change" in fields and b"DEVPATH=" + want in fields:
            print("GOT", flush=True)
            break
except TimeoutError:
    print("TIMEOUT", flush=True)
"""


def test_pci_uevents_reach_a_non_host_network_namespace() -> None:
    if os.geteuid() != 0:
        tier_unavailable("needs root: joins a new network namespace and triggers a uevent")
    unshare = shutil.which("unshare")
    if unshare is None:
        tier_unavailable("needs unshare(1) (util-linux)")
    devices = sorted(Path("/sys/bus/pci/devices").glob("*"))
    if not devices:
        tier_unavailable("this machine has no PCI devices to trigger a uevent on")
    dev = devices[0].resolve()
    devpath = "/" + str(dev.relative_to("/sys"))
    with subprocess.Popen(
        [unshare, "--net", sys.executable, "-c", LISTENER, devpath],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        netns = proc.stdout.readline().strip()
        if not netns:
            proc.wait(timeout=30)
            tier_unavailable(f"unshare --net failed here: {proc.stderr.read()}")
        assert netns != os.readlink("/proc/self/ns/net"), "the listener must be in its own netns"
        (dev / "uevent").write_text("change\n")
        verdict = proc.stdout.readline().strip()
        proc.wait(timeout=30)
    assert verdict == "GOT", f"no uevent for {devpath} in a new network namespace ({verdict})"
