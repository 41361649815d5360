"""Runs INSIDE the backports QEMU guest (Linux 6.12, QEMU 10): the node agent's engine against a
real SR-IOV NIC, the emulated Intel 82576 (``igb`` PF, 7 VFs on ``igbvf``).

Regression tests of issue 11 (each failed before its fix): a PF moved to vfio-pci while a VF
is held by a VM; a VF bound by igbvf between plan and probe; a refused resize or release that
still changed VFs; /32 and noprefixroute addresses the address guard did not see; a scan that
hung on a PF mid-unbind. Plus the cases that already passed: default route, addresses, resize.
Every test leaves the NIC as it found it: PF on igb, no VFs, autoprobe on, nothing remembered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
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
    SYS,
    Uevents,
    apply,
    devices,
    driver,
    inv,
    ip,
    uevents,
    vfio_holder,
    wait_for,
    write,
)

from hostdev.deviceplugin import persist
from hostdev.deviceplugin.config.executor import Executor, StepError
from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.deviceplugin.plugin import advertised_from_json
from hostdev.host.model import PciDevice
from hostdev.policy.blockers import find_blockers
from hostdev.policy.nodeconfig import NodeConfigError, parse_node_config
from hostdev.policy.plan import Step

pytestmark = pytest.mark.igb
__all__ = ["uevents"]  # a fixture from guestlib

INTEL, IGB_PF, IGB_VF = "8086", "10c9", "10ca"
RESOURCE = "hostdev.io/igbvf"


def igb_pf() -> PciDevice:
    pfs = [d for d in devices(INTEL, IGB_PF) if d.is_pf]
    if len(pfs) != 1:
        pytest.fail(
            f"expected the emulated 82576 SR-IOV PF (igb, QEMU >= 8) in this guest, found {pfs} "
            f"(RK_IGB={os.environ.get('RK_IGB')}): a guest without it must not run igb tests"
        )
    return pfs[0]


def vfs_of(pf: PciDevice) -> list[PciDevice]:
    i = inv()
    return [i.devices[a] for a in i.devices[pf.address].virtfns]


def spec(pf: PciDevice, num: int, vfio: str | None = None) -> dict[str, Any]:
    """numVfs for the PF, and VFs ``vfio`` ("0-3") of it on vfio-pci."""
    out: dict[str, Any] = {"pfs": [{"pciAddress": str(pf.address), "numVfs": num}]}
    if vfio is not None:
        rule = {"selector": {"pfNames": [f"{pf.address}#{vfio}"]}, "resourceName": RESOURCE}
        out["devices"] = [rule]
    return out


def text_of(res: Any) -> str:
    return "\n".join(r.describe() for r in res.refusals)


def dmesg() -> str:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout


def settle() -> None:
    """Let udev finish (module loads, netdev renames) before reading names."""
    subprocess.run(["udevadm", "settle", "--timeout=60"], check=False)


@pytest.fixture(scope="module", autouse=True)
def _nic_setup() -> None:
    subprocess.run(["modprobe", "vfio-pci"], check=True)
    subprocess.run(["modprobe", "vfio_iommu_type1"], check=True)
    pf = igb_pf()
    assert (pf.driver, pf.sriov_totalvfs, pf.sriov_numvfs) == ("igb", 7, 0), pf
    assert pf.sriov_autoprobe is True and pf.sriov_vf_device == IGB_VF, pf


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "state"
    yield d
    res = apply(spec(igb_pf(), 0), d)  # drop the VFs; restore whatever hostdev moved
    assert res.exit_code == 0, "cleanup did not converge"
    memory = DriverMemory(str(d))
    assert memory.originals == {} and memory.autoprobe == {}
    pf = igb_pf()
    assert pf.driver == "igb" and pf.sriov_numvfs == 0 and pf.sriov_autoprobe is True


# ---- 1. a PF driver change destroys its VFs: refused while any VF is used ------------------
def test_pf_driver_change_refused_while_a_vf_is_held_or_wanted(state: Path) -> None:
    pf = igb_pf()
    assert apply(spec(pf, 6, "0-5"), state).exit_code == 0
    vfs = vfs_of(pf)
    assert len(vfs) == 6 and all(v.driver == "vfio-pci" for v in vfs)
    with vfio_holder(vfs[0]) as holder:
        # the admin adds the PF itself to devices (allowUnsafe, even): still refused
        move = {"devices": [*spec(pf, 6, "0-5")["devices"], {"pciAddress": str(pf.address)}]}
        move["devices"][-1]["allowUnsafe"] = True
        res = apply(move, state)
        text = text_of(res)
        print(text)
        assert res.exit_code == 1 and res.executed == ()
        g = vfs[0].iommu_group
        assert f"VF {vfs[0].address} is in use: /dev/vfio/{g} is held open by pid {holder.pid}" in (
            text
        )
        assert all(f"VF {v.address} is wanted in the desired state" in text for v in vfs)
        assert "destroys its 6 VF(s)" in text
        assert not res.refusals[0].overridable
        assert driver(pf.address) == "igb" and igb_pf().sriov_numvfs == 6
        assert holder.poll() is None and all(driver(v.address) == "vfio-pci" for v in vfs)
    # "PF on vfio-pci with numVfs > 0" is a contradiction in the desired state itself
    with pytest.raises(NodeConfigError, match="contradiction") as e:
        parse_node_config({**spec(pf, 6), "devices": [{"pciAddress": str(pf.address)}]})
    print(e.value)


def test_pf_driver_change_refused_while_a_vf_is_allocated(state: Path) -> None:
    pf = igb_pf()
    assert apply(spec(pf, 2, "0-1"), state).exit_code == 0
    vf0 = vfs_of(pf)[0]
    # the device plugin's saved lists (same --state-dir): VF0 was handed to a pod
    unit = {
        "id": str(vf0.address),
        "addresses": [str(vf0.address)],
        "group": vf0.iommu_group,
        "numa": vf0.numa_node,
        "pf": str(pf.address),
        "healthy": True,
        "reason": "",
    }
    saved = persist.SavedResource((advertised_from_json(unit),), frozenset({str(vf0.address)}))
    persist.save(str(state), persist.encode({RESOURCE: saved}))
    # nothing wants the VFs any more and none is open: only the allocation stands in the way.
    # hostdev apply reads it from the shared --state-dir (the agent passes its live set).
    cfg = state.parent / "node.yaml"
    cfg.write_text(f"devices:\n  - {{pciAddress: '{pf.address}', allowUnsafe: true}}\n")
    cli = [sys.executable, "-m", "hostdev.cli", "apply", "--config", str(cfg)]
    run = subprocess.run(
        [*cli, "--state-dir", str(state)], capture_output=True, text=True, check=False
    )
    print(run.stdout, run.stderr)
    assert run.returncode == 1
    assert f"VF {vf0.address} is allocated to a pod through {RESOURCE}" in run.stdout
    assert driver(pf.address) == "igb" and igb_pf().sriov_numvfs == 2
    os.unlink(persist.state_path(str(state)))


def test_pf_driver_change_needs_allow_unsafe_and_says_what_it_destroys(state: Path) -> None:
    pf = igb_pf()
    # host VFs on igbvf, nobody uses them, made by the admin (VFs hostdev made would go back
    # to 0 first, guarded, once the PF leaves pfs: nothing left for the move to destroy)
    write(SYS.path("sys/bus/pci/devices", str(pf.address), "sriov_numvfs"), "2")
    settle()
    wait_for(lambda: [v.driver for v in vfs_of(pf)] == ["igbvf"] * 2, "VFs on igbvf", 120)
    vfs = vfs_of(pf)
    move: dict[str, Any] = {"devices": [{"pciAddress": str(pf.address)}]}
    res = apply(move, state)
    text = text_of(res)
    print(text)
    names = ", ".join(str(v.address) for v in vfs)
    assert res.exit_code == 1 and res.executed == () and res.refusals[0].overridable
    assert f"moving PF {pf.address} from igb to vfio-pci destroys its 2 VF(s) ({names})" in text
    move["devices"][0]["allowUnsafe"] = True
    res = apply(move, state)
    assert res.exit_code == 0 and res.converged, text_of(res)
    assert "destroys its 2 VF(s) (allowUnsafe)" in res.plans[0].render()
    assert driver(pf.address) == "vfio-pci" and igb_pf().virtfns == ()
    # sriov_numvfs on a PF bound to vfio-pci: the kernel's ENOENT, explained by that driver
    ex = Executor(SYS, DriverMemory(str(state)))
    with pytest.raises(StepError) as e:
        ex.apply_step(Step("set-numvfs", pf.address, "2"))
    print(e.value)
    assert e.value.errno == 2 and "the PF is bound to vfio-pci, which makes no VFs" in str(e.value)
    assert "give the PF back to its host driver (igb) first" in str(e.value)
    # numVfs alone: the PF goes back to igb first (restore), then gets its VFs (next round)
    res = apply(spec(pf, 2), state)
    assert res.exit_code == 0 and res.converged, text_of(res)
    assert driver(pf.address) == "igb" and igb_pf().sriov_numvfs == 2


def test_scan_and_engine_do_not_hang_on_a_pf_mid_unbind(state: Path) -> None:
    pf = igb_pf()
    assert apply(spec(pf, 2, "0"), state).exit_code == 0
    vf0 = vfs_of(pf)[0]
    unbind: subprocess.Popen[bytes] | None = None
    slept = threading.Event()
    try:
        with vfio_holder(vf0) as holder:
            # Should anything below sleep in the kernel on the PF after all (the bug this test
            # is about), ending the holder lets the kernel go: the test fails, it does not hang
            # the guest (a signal cannot reach a thread asleep in the kernel).
            guard = threading.Timer(420, lambda: (slept.set(), holder.kill()))
            guard.start()
            unbind = subprocess.Popen(
                ["sh", "-c", f"echo {pf.address} > /sys/bus/pci/drivers/igb/unbind"]
            )
            try:
                mid_unbind(pf, unbind, state)
            finally:
                guard.cancel()
                if slept.is_set():
                    pytest.fail("scan or the engine slept in the kernel on the PF mid-unbind")
        assert unbind.wait(timeout=120) == 0  # the holder is gone: the unbind finishes
        wait_for(lambda: inv().devices[pf.address].busy is None, "the PF to answer again", 60)
        assert driver(pf.address) is None and igb_pf().virtfns == ()
    finally:  # whatever failed: let the unbind end and give the PF back to igb
        if unbind is not None:
            unbind.wait(timeout=120)
        if driver(pf.address) is None:
            write(SYS.path("sys/bus/pci/drivers_probe"), str(pf.address))
            wait_for(lambda: driver(pf.address) == "igb", "igb to bind the PF again")


def mid_unbind(pf: PciDevice, unbind: subprocess.Popen[bytes], state: Path) -> None:
    """What scan and the engine do while the PF's unbind waits for a VF's VFIO user."""
    # igb's remove disables SR-IOV, which waits for VF0's VFIO user, holding the PF's lock
    wait_for(
        lambda: "blocked until released by user" in dmesg(),
        "the PF's unbind to wait for VF0's user",
        timeout=60,
    )
    t0 = time.monotonic()
    scan = subprocess.run(
        [sys.executable, "-m", "hostdev.cli", "scan", "--json"],
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard, not a measurement
        check=False,
    )
    print(f"hostdev scan returned rc {scan.returncode} after {time.monotonic() - t0:.1f}s")
    assert scan.returncode == 0, scan.stderr
    (row,) = [d for d in json.loads(scan.stdout)["devices"] if d["address"] == str(pf.address)]
    print(row)
    assert "the kernel holds the device lock (unbind in progress?)" in row["busy"]
    assert row["sriovNumVfs"] is None and row["assignable"] == "no"
    assert inv().devices[pf.address].busy is not None  # in-process discovery returns too
    res = apply(spec(pf, 0), state)  # the engine touches nothing it cannot read
    text = text_of(res)
    print(text)
    assert res.exit_code == 1 and res.executed == () and "device lock" in text
    assert unbind.poll() is None  # the kernel is still waiting for the holder


# ---- 2. VFs created for vfio-pci never meet a host driver ----------------------------------
def test_vfs_for_vfio_never_bind_to_the_host_vf_driver(state: Path, uevents: Uevents) -> None:
    # as on a node where no VF was made yet: udev loads igbvf when the first VFs appear
    subprocess.run(["modprobe", "-r", "igbvf"], check=True)
    assert not os.path.isdir("/sys/module/igbvf")
    pf = igb_pf()
    uevents.drain()
    res = apply(spec(pf, 4, "0-2"), state)
    assert res.exit_code == 0 and res.converged, text_of(res)
    vfs = vfs_of(pf)
    mine = {str(v.address) for v in vfs[:3]}
    settle()
    binds = [
        (e.get("PCI_SLOT_NAME"), e.get("DRIVER"))
        for e in uevents.drain()
        if e.get("ACTION") == "bind" and e.get("SUBSYSTEM") == "pci"
    ]
    print(f"pci bind uevents: {binds}")
    assert os.path.isdir("/sys/module/igbvf")  # udev did load it meanwhile
    assert {(a, d) for a, d in binds if a in mine} == {(a, "vfio-pci") for a in mine}
    assert not [b for b in binds if b[0] in mine and b[1] == "igbvf"]
    assert [driver(v.address) for v in vfs] == ["vfio-pci"] * 3 + ["igbvf"]  # VF3: no rule
    originals = DriverMemory(str(state)).originals
    assert {str(a): d for a, d in originals.items()} == {a: "igbvf" for a in mine}
    assert igb_pf().sriov_autoprobe is True and DriverMemory(str(state)).autoprobe == {}
    # release: no rule wants them any more -> back on igbvf, where the kernel would have put them
    res = apply(spec(pf, 4), state)
    assert res.exit_code == 0 and res.converged, text_of(res)
    assert [driver(v.address) for v in vfs] == ["igbvf"] * 4
    assert DriverMemory(str(state)).originals == {}


def test_resize_vfs_for_vfio(state: Path) -> None:
    pf = igb_pf()
    for n, rng in ((2, "0-1"), (3, "0-2"), (1, "0")):
        res = apply(spec(pf, n, rng), state)
        assert res.exit_code == 0 and res.converged, text_of(res)
        vfs = vfs_of(pf)
        assert len(vfs) == n and all(v.driver == "vfio-pci" for v in vfs)
        kinds = [s.kind for s in res.executed if s.address == pf.address]
        print(n, kinds)
        assert kinds[:2] == ["remember-autoprobe", "set-autoprobe"]  # before the VFs appear
        assert igb_pf().sriov_autoprobe is True
    res = apply(spec(pf, 0), state)
    assert res.exit_code == 0 and igb_pf().sriov_numvfs == 0


# ---- 3. a refused change leaves everything that served it untouched ------------------------
def test_refused_resize_and_release_change_nothing(state: Path) -> None:
    pf = igb_pf()
    assert apply(spec(pf, 4, "0-3"), state).exit_code == 0
    vfs = vfs_of(pf)
    (ifname,) = pf.netdevs
    ip("addr", "add", "10.98.0.1/24", "dev", ifname)
    ip("link", "set", ifname, "up")
    ip("route", "add", "default", "via", "10.98.0.254")
    try:
        for attempt in (spec(pf, 2, "0-1"), spec(pf, 0)):  # resize 4 -> 2, then release
            res = apply(attempt, state)
            text = text_of(res)
            print(text)
            assert res.exit_code == 1 and res.executed == ()
            assert f"carries the default route (via {ifname})" in text and "held back" in text
            assert igb_pf().sriov_numvfs == 4
            assert [driver(v.address) for v in vfs] == ["vfio-pci"] * 4
    finally:
        subprocess.run(["ip", "route", "del", "default"], check=False)
        subprocess.run(["ip", "addr", "flush", "dev", ifname], check=False)
        subprocess.run(["ip", "link", "set", ifname, "down"], check=False)
    res = apply(spec(pf, 2, "0-1"), state)  # the same resize, once nothing is in the way
    assert res.exit_code == 0 and res.converged and igb_pf().sriov_numvfs == 2


# ---- 4. the address guard reads the kernel's own address list ------------------------------
ADDRESSES = ("10.97.0.1/24", "203.0.113.5/32", "203.0.113.6/24 noprefixroute", "2001:db8::5/64")


def test_address_guard_sees_every_address(state: Path) -> None:
    pf = igb_pf()
    assert apply(spec(pf, 1), state).exit_code == 0
    settle()
    (vf0,) = vfs_of(pf)
    assert vf0.driver == "igbvf"
    (ifname,) = vf0.netdevs
    ip("link", "set", ifname, "up")
    bind = {**spec(pf, 1), "devices": [{"pciAddress": str(vf0.address)}]}
    for address in ADDRESSES:  # one VF for all of them: creating VFs is slow under TCG
        words = address.split()
        nodad = ["nodad"] if ":" in words[0] else []
        ip("addr", "add", words[0], "dev", ifname, *words[1:], *nodad)
        try:
            res = apply(bind, state)
            text = text_of(res)
            print(text)
            assert res.exit_code == 1 and res.executed == (), address
            assert driver(vf0.address) == "igbvf", address
            assert f"has an address on an up interface ({ifname}: {address})" in text
            assert res.refusals[0].overridable
        finally:
            subprocess.run(["ip", "addr", "flush", "dev", ifname], check=False)
    res = apply(bind, state)  # up, no address (link-local aside): nothing in the way
    assert res.exit_code == 0 and driver(vf0.address) == "vfio-pci", text_of(res)


def test_default_route_through_a_vf_is_refused(state: Path) -> None:
    pf = igb_pf()
    assert apply(spec(pf, 1), state).exit_code == 0
    settle()
    (vf0,) = vfs_of(pf)
    (ifname,) = vf0.netdevs
    ip("link", "set", ifname, "up")
    ip("addr", "add", "10.96.0.1/24", "dev", ifname)
    ip("route", "add", "default", "via", "10.96.0.254")
    try:
        res = apply({**spec(pf, 1), "devices": [{"pciAddress": str(vf0.address)}]}, state)
        text = text_of(res)
        print(text)
        assert res.exit_code == 1 and driver(vf0.address) == "igbvf"
        assert f"{vf0.address} carries the default route (via {ifname})" in text
    finally:
        subprocess.run(["ip", "route", "del", "default"], check=False)
        subprocess.run(["ip", "addr", "flush", "dev", ifname], check=False)


def test_discovery_of_the_nic(state: Path) -> None:
    pf = igb_pf()
    assert pf.netdevs and pf.numa_node == 1 and pf.sriov_offset and pf.sriov_stride
    assert apply(spec(pf, 3), state).exit_code == 0
    vfs = vfs_of(pf)
    # where the kernel put the VFs is where the planner predicts them (offset + index * stride)
    assert [v.address for v in vfs] == [pf.vf_address(i) for i in range(3)]
    assert all(v.device == IGB_VF and v.physfn == pf.address and v.numa_node == 1 for v in vfs)
    assert len({v.iommu_group for v in vfs}) == 3


# ---- 5. a PF dropped from the desired state goes back to 0 VFs (issue 14) -----------------
def test_pf_dropped_from_the_desired_state_goes_to_zero_vfs_once_no_vm_holds_them(
    state: Path,
) -> None:
    pf = igb_pf()
    assert apply(spec(pf, 2, "0"), state).exit_code == 0
    vf0, vf1 = vfs_of(pf)
    assert (vf0.driver, vf1.driver) == ("vfio-pci", "igbvf")
    assert DriverMemory(str(state)).numvfs == {pf.address}
    with vfio_holder(vf0) as holder:
        res = apply({}, state)  # the policy is gone: nothing lists the PF or its VFs
        text = text_of(res)
        print(text)
        assert res.exit_code == 1 and res.executed == ()
        g = vf0.iommu_group
        assert (
            f"{pf.address}: refused to set numVfs 0 (PF removed from the desired state): "
            f"VF {vf0.address} is in use: /dev/vfio/{g} is held open by pid {holder.pid}"
        ) in text
        # what the agent puts in the NodeState's status.blockers: the VF and who holds it
        blockers = find_blockers(res.refusals, ())
        assert {(b.pci_address, b.action) for b in blockers} >= {
            (vf0.address, f"set numVfs 0 (PF removed from the desired state) ({pf.address})")
        }
        assert igb_pf().sriov_numvfs == 2 and holder.poll() is None
        assert (driver(vf0.address), driver(vf1.address)) == ("vfio-pci", "igbvf")
    res = apply({}, state)  # released: the same desired state now applies
    assert res.exit_code == 0 and res.converged, text_of(res)
    after = igb_pf()
    assert after.driver == "igb" and after.sriov_numvfs == 0 and after.virtfns == ()
    assert after.sriov_autoprobe is True
    memory = DriverMemory(str(state))
    assert memory.numvfs == frozenset() and memory.originals == {} and memory.autoprobe == {}
