"""Executor + converge loop on fake trees driven by the simulated kernel (fakekernel):
read-back checks, kernel error messages, failure recovery, kill-and-restart convergence."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hostdev.deviceplugin.config.apply import converge
from hostdev.deviceplugin.config.executor import Executor, StepError
from hostdev.deviceplugin.config.memory import DriverMemory, StateFileError
from hostdev.host.address import PciAddress
from hostdev.host.sysfs import Sysfs
from hostdev.policy.nodeconfig import parse_node_config
from hostdev.policy.plan import Step
from hostdev.testing.fakekernel import AgentKilled, FakeKernel
from hostdev.testing.fakesysfs import FakeHost

A = PciAddress.parse
NIC, GPU, AUDIO, PF = "0000:05:00.0", "0000:17:00.0", "0000:17:00.1", "0000:3b:00.0"
SPEC: dict[str, Any] = {
    "pfs": [{"pciAddress": PF, "numVfs": 3}],
    "devices": [
        {"pciAddress": GPU, "resourceName": "example.com/a10"},
        {"pciAddress": NIC},
        {"selector": {"pfNames": [f"{PF}#0-1"]}, "resourceName": "example.com/vf"},
    ],
}


def build(root: Path) -> FakeHost:
    h = FakeHost(root)
    h.add_device("0000:00:00.0", vendor="8086", device="09a2", class_code="060000")
    h.add_device(NIC, vendor="8086", device="10d3", class_code="020000", driver="e1000e")
    g = h.new_group()
    h.add_device(GPU, vendor="10de", device="2236", class_code="030200", driver="nvidia", group=g)
    h.add_device(
        AUDIO, vendor="10de", device="1aef", class_code="040300", driver="snd_hda_intel", group=g
    )
    h.add_pf(PF, vendor="8086", device="1592", vf_device="1889", totalvfs=8, numvfs=2,
             vf_driver="iavf", vf_offset=0x10)  # fmt: skip
    return h


def run(h: FakeHost, state: Path, spec: dict[str, Any], k: FakeKernel | None = None, **kw: Any):  # type: ignore[no-untyped-def]
    kernel = k or FakeKernel(h)
    return converge(
        Sysfs(str(h.root)),
        DriverMemory(str(state)),
        parse_node_config(spec),
        io=kernel,
        echo=print,
        settle=0.05,
        **kw,
    )


def drivers(h: FakeHost) -> dict[str, str | None]:
    inv = Sysfs(str(h.root)).discover()
    return {str(a): d.driver for a, d in inv.devices.items()}


def assert_nothing_half_bound(h: FakeHost) -> None:
    inv = Sysfs(str(h.root)).discover()
    for g in inv.groups.values():
        members = [inv.devices[m] for m in g.members]
        if any(m.on_vfio for m in members):
            assert g.viable, f"group {g.number} half-bound: {g.reason}"


def test_converge_end_to_end_then_restore(tmp_path: Path) -> None:
    h = build(tmp_path / "root")
    state = tmp_path / "state"
    res = run(h, state, SPEC)
    assert res.exit_code == 0 and res.converged and len(res.plans) == 3
    d = drivers(h)
    vfs = [a for a in d if a.startswith("0000:3b:02.")]
    assert len(vfs) == 3
    assert d[GPU] == d[AUDIO] == d[NIC] == d[vfs[0]] == d[vfs[1]] == "vfio-pci"
    assert d[vfs[2]] == "iavf"  # not selected
    saved = json.loads((state / "original-drivers.json").read_text())
    assert saved["devices"][GPU] == {"originalDriver": "nvidia"}
    assert not (state / "in-progress.json").exists()  # every step finished
    again = run(h, state, SPEC)
    assert again.executed == () and again.plans[0].converged
    res = run(h, state, {"pfs": SPEC["pfs"]})
    assert res.exit_code == 0
    d = drivers(h)
    assert (d[GPU], d[AUDIO], d[NIC], d[vfs[0]]) == ("nvidia", "snd_hda_intel", "e1000e", "iavf")
    assert DriverMemory(str(state)).originals == {}
    for a in (GPU, NIC):
        assert (Path(Sysfs(str(h.root)).pci_device_dir(A(a))) / "driver_override").read_text() == (
            "(null)\n"
        )


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    h = build(tmp_path / "root")
    k = FakeKernel(h)
    res = run(h, tmp_path / "state", SPEC, k, dry_run=True)
    assert res.exit_code == 0 and res.executed == () and k.writes == []
    assert res.plans[0].steps and not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("setup", "value", "code", "message"),
    [
        (2, "3", errno.EBUSY, "VFs in use / already enabled (2 VFs): set sriov_numvfs to 0 first"),
        (0, "9", errno.ERANGE, "9 VFs is above sriov_totalvfs (8) (ERANGE)"),
        (None, "1", errno.ENOENT, "PF has no driver: bind it to its host driver first (ENOENT)"),
    ],
)
def test_kernel_errors_are_mapped(
    tmp_path: Path, setup: int | None, value: str, code: int, message: str
) -> None:
    h = build(tmp_path / "root")
    k = FakeKernel(h)
    ex = Executor(Sysfs(str(h.root)), DriverMemory(str(tmp_path / "s")), k, settle=0.05)
    if setup is None:
        ex.apply_step(Step("set-numvfs", A(PF), "0"))
        ex.apply_step(Step("unbind", A(PF), "ice"))
    elif setup == 0:
        ex.apply_step(Step("set-numvfs", A(PF), "0"))
    with pytest.raises(StepError) as e:
        ex.apply_step(Step("set-numvfs", A(PF), value))
    assert e.value.errno == code
    assert message in str(e.value)


def test_injected_failure_stops_the_plan_and_rerun_converges(tmp_path: Path) -> None:
    h = build(tmp_path / "root")
    k = FakeKernel(h)
    k.inject("sriov_numvfs", errno.EBUSY, PF)
    res = run(h, tmp_path / "state", SPEC, k)
    assert res.exit_code == 2 and res.failure is not None
    assert res.failure.failed is not None and res.failure.failed.kind == "set-numvfs"
    assert "set sriov_numvfs to 0 first" in (res.failure.error or "")
    assert any(line.startswith(f"{PF}: driver ice") for line in res.failure.aftermath)
    assert DriverMemory(str(tmp_path / "state")).interrupted_step is None
    res = run(h, tmp_path / "state", SPEC, k)
    assert res.exit_code == 0 and res.converged


def test_failed_probe_rolls_the_device_back(tmp_path: Path) -> None:
    h = build(tmp_path / "root")
    k = FakeKernel(h)
    k.inject("drivers_probe", errno.EINVAL, NIC)
    res = run(h, tmp_path / "state", {"devices": [{"pciAddress": NIC}]}, k)
    assert res.exit_code == 2 and res.failure is not None
    assert f"{NIC}: rolled back to e1000e" in res.failure.aftermath
    assert drivers(h)[NIC] == "e1000e"
    assert f"{NIC}: driver e1000e, driver_override (none)" in res.failure.aftermath


def test_read_back_catches_a_driver_that_never_binds(tmp_path: Path) -> None:
    h = build(tmp_path / "root")
    k = FakeKernel(h)
    (h.root / "sys/bus/pci/drivers/vfio-pci").rename(h.root / "vfio-pci.unloaded")
    ex = Executor(Sysfs(str(h.root)), DriverMemory(str(tmp_path / "s")), k, settle=0.05)
    res = ex.run(
        [
            Step("remember", A(NIC), "e1000e"),
            Step("driver-override", A(NIC), "vfio-pci"),
            Step("unbind", A(NIC), "e1000e"),
            Step("probe", A(NIC), expect="vfio-pci"),
        ]
    )
    assert not res.ok
    assert "bound to no driver after drivers_probe, expected vfio-pci" in (res.error or "")
    assert "(is the vfio-pci driver loaded?)" in (res.error or "")
    assert drivers(h)[NIC] == "e1000e"  # rolled back


def _total_writes(tmp_path: Path) -> int:
    h = build(tmp_path / "probe-root")
    k = FakeKernel(h)
    assert run(h, tmp_path / "probe-state", SPEC, k).exit_code == 0
    return len(k.writes)


def test_killed_after_any_write_a_restart_converges(tmp_path: Path) -> None:
    total = _total_writes(tmp_path)
    assert total > 10
    for n in range(1, total):
        root, state = tmp_path / f"r{n}", tmp_path / f"s{n}"
        h = build(root)
        k = FakeKernel(h)
        k.kill_after(n)
        with pytest.raises(AgentKilled):
            run(h, state, SPEC, k)
        # restart: a new process, a new kernel view, the same tree and state dir
        res = run(h, state, SPEC, FakeKernel(h))
        assert res.exit_code == 0 and res.converged, f"kill after write {n}"
        assert_nothing_half_bound(h)
        d = drivers(h)
        assert d[GPU] == d[AUDIO] == d[NIC] == "vfio-pci"
        back = run(h, state, {"pfs": [{"pciAddress": PF, "numVfs": 0}]}, FakeKernel(h))
        assert back.exit_code == 0
        d = drivers(h)
        assert (d[GPU], d[AUDIO], d[NIC]) == ("nvidia", "snd_hda_intel", "e1000e"), n
        assert DriverMemory(str(state)).originals == {}


_AGENT = """
import os, signal, sys
from hostdev.deviceplugin.config.apply import converge
from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.host.sysfs import Sysfs
from hostdev.policy.nodeconfig import parse_node_config
from hostdev.testing.fakekernel import FakeKernel
from hostdev.testing.fakesysfs import FakeHost
import json
root, state, kill_at, spec = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
def hook(i, step):
    if i == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
converge(Sysfs(root), DriverMemory(state), parse_node_config(spec), io=FakeKernel(FakeHost(root)),
         on_step=hook, settle=0.05)
"""


@pytest.mark.parametrize("kill_at", [2, 4, 7, 12])
def test_agent_process_sigkilled_between_steps_restart_converges(
    tmp_path: Path, kill_at: int
) -> None:
    h = build(tmp_path / "root")
    FakeKernel(h)  # records the kernel's driver table in the tree before the agent runs
    state = tmp_path / "state"
    spec = {"devices": [{"pciAddress": GPU}, {"pciAddress": NIC}]}
    proc = subprocess.run(
        [sys.executable, "-c", _AGENT, str(h.root), str(state), str(kill_at), json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    mem = DriverMemory(str(state))
    assert mem.originals  # the original driver was on disk before the first write
    res = run(h, state, spec)
    assert res.exit_code == 0 and res.converged
    assert_nothing_half_bound(h)
    d = drivers(h)
    assert d[GPU] == d[AUDIO] == d[NIC] == "vfio-pci"


def test_interrupted_step_is_reported_on_restart(tmp_path: Path) -> None:
    h = build(tmp_path / "root")
    k = FakeKernel(h)
    k.kill_after(2)  # dies right after a write, before its read-back finished
    with pytest.raises(AgentKilled):
        run(h, tmp_path / "state", SPEC, k)
    assert DriverMemory(str(tmp_path / "state")).interrupted_step is not None
    lines: list[str] = []
    converge(
        Sysfs(str(h.root)),
        DriverMemory(str(tmp_path / "state")),
        parse_node_config(SPEC),
        io=FakeKernel(h),
        echo=lines.append,
        settle=0.05,
    )
    assert lines[0].startswith("note: a previous run stopped during step")


def test_corrupt_state_file_is_an_error_and_left_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    f = state / "original-drivers.json"
    f.write_text("{not json")
    with pytest.raises(StateFileError, match="fix it or move it away"):
        DriverMemory(str(state))
    assert f.read_text() == "{not json"
    f.write_text(json.dumps({"version": 99}))
    with pytest.raises(StateFileError, match="expected"):
        DriverMemory(str(state))


def test_state_file_writes_are_atomic(tmp_path: Path) -> None:
    mem = DriverMemory(str(tmp_path))
    mem.remember(A(NIC), "e1000e")
    mem.remember(A(NIC), "vfio-pci")  # the first original wins
    mem.remember(A(GPU), None)
    assert DriverMemory(str(tmp_path)).originals == {A(NIC): "e1000e", A(GPU): None}
    assert sorted(os.listdir(tmp_path)) == ["original-drivers.json"]  # no temp files left
    mem.forget(A(NIC))
    assert DriverMemory(str(tmp_path)).originals == {A(GPU): None}
    mem.begin({"op": "unbind", "device": GPU})
    assert DriverMemory(str(tmp_path)).interrupted_step == {"op": "unbind", "device": GPU}
    mem.done()
    assert sorted(os.listdir(tmp_path)) == ["original-drivers.json"]


def test_torn_journal_is_ignored_originals_kept(tmp_path: Path) -> None:
    """After a power loss the unsynced journal may be torn; the fsynced originals are not."""
    DriverMemory(str(tmp_path)).remember(A(GPU), "nvidia")
    (tmp_path / "in-progress.json").write_text("")
    mem = DriverMemory(str(tmp_path))
    assert mem.interrupted_step is None and mem.originals == {A(GPU): "nvidia"}


def test_autoprobe_steps_write_read_back_and_are_remembered(tmp_path: Path) -> None:
    h = build(tmp_path / "root")
    mem = DriverMemory(str(tmp_path / "s"))
    ex = Executor(Sysfs(str(h.root)), mem, FakeKernel(h), settle=0.05)
    res = ex.run(
        [
            Step("remember-autoprobe", A(PF), "1"),
            Step("set-autoprobe", A(PF), "0"),
            Step("set-numvfs", A(PF), "0"),
            Step("set-numvfs", A(PF), "3"),
        ]
    )
    assert res.ok, res.error
    assert drivers(h)["0000:3b:02.0"] is None  # created with autoprobe off: no host driver
    assert DriverMemory(str(tmp_path / "s")).autoprobe == {A(PF): True}  # survives a restart
    saved = json.loads((tmp_path / "s/original-drivers.json").read_text())
    assert saved["pfs"] == {PF: {"sriovDriversAutoprobe": True}}
    ex.run([Step("set-autoprobe", A(PF), "1"), Step("forget-autoprobe", A(PF))])
    assert (h.device_dir(PF) / "sriov_drivers_autoprobe").read_text() == "1\n"
    assert DriverMemory(str(tmp_path / "s")).autoprobe == {}


def test_numvfs_on_a_pf_bound_to_vfio_is_explained_by_that_driver(tmp_path: Path) -> None:
    h = build(tmp_path / "root")
    k = FakeKernel(h)
    mem = DriverMemory(str(tmp_path / "s"))
    ex = Executor(Sysfs(str(h.root)), mem, k, settle=0.05)
    ex.run(
        [
            Step("set-numvfs", A(PF), "0"),
            Step("remember", A(PF), "ice"),
            Step("driver-override", A(PF), "vfio-pci"),
            Step("unbind", A(PF), "ice"),
            Step("probe", A(PF), expect="vfio-pci"),
        ]
    )
    with pytest.raises(StepError) as e:
        ex.apply_step(Step("set-numvfs", A(PF), "2"))
    assert e.value.errno == errno.ENOENT
    assert str(e.value) == (
        f"{PF}: the PF is bound to vfio-pci, which makes no VFs for the host (vfio-pci's SR-IOV "
        "enable is off: module option enable_sriov) (ENOENT): give the PF back to its host "
        "driver (ice) first"
    )


def test_a_read_back_that_does_not_answer_fails_the_step_as_busy(tmp_path: Path) -> None:
    h = build(tmp_path / "root")
    attr = h.device_dir(NIC) / "driver_override"
    attr.unlink()
    os.mkfifo(attr)  # its reads block, as under a held device lock

    class NoWrites:  # (a FIFO's writer would block too: only the read-back is the point)
        def write(self, path: str, value: str) -> None:
            pass

    ex = Executor(
        Sysfs(str(h.root), read_timeout=0.1), DriverMemory(str(tmp_path / "s")), NoWrites()
    )
    ex.settle = 0.3
    try:
        with pytest.raises(StepError) as e:
            ex.apply_step(Step("driver-override", A(NIC), ""))
        assert "the kernel holds the device lock (unbind in progress?)" in str(e.value)
        assert "busy: the kernel holds" in ex.state_line(A(NIC))
    finally:
        fd = os.open(attr, os.O_WRONLY | os.O_NONBLOCK)  # let the stuck reader go
        os.close(fd)


def test_rollback_of_a_vf_names_its_driver_when_autoprobe_is_off(tmp_path: Path) -> None:
    """A VF created with autoprobe off and a failed bind goes back to the host VF driver it was
    remembered with, although nothing probes it by itself."""
    h = build(tmp_path / "root")
    k = FakeKernel(h)
    vf = "0000:3b:02.0"
    (h.device_dir(PF) / "sriov_drivers_autoprobe").write_text("0\n")
    h.bind(vf, None)
    k.inject("drivers_probe", errno.EINVAL, vf)
    ex = Executor(Sysfs(str(h.root)), DriverMemory(str(tmp_path / "s")), k, settle=0.05)
    res = ex.run(
        [
            Step("remember", A(vf), "iavf"),
            Step("driver-override", A(vf), "vfio-pci"),
            Step("probe", A(vf), expect="vfio-pci"),
        ]
    )
    assert not res.ok and f"{vf}: rolled back to iavf" in res.aftermath
    assert drivers(h)[vf] == "iavf"
    assert (h.device_dir(vf) / "driver_override").read_text() == "(null)\n"


def test_state_file_from_before_autoprobe_memory_still_loads(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir()
    body = {"version": 1, "devices": {NIC: {"originalDriver": "e1000e"}}}
    (state / "original-drivers.json").write_text(json.dumps(body))
    mem = DriverMemory(str(state))
    assert mem.originals == {A(NIC): "e1000e"} and mem.autoprobe == {}
    (state / "original-drivers.json").write_text(json.dumps({**body, "pfs": []}))
    with pytest.raises(StateFileError, match="'pfs' must be a mapping"):
        DriverMemory(str(state))
