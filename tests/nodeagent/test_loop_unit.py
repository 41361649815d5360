"""The NodeState loop's control flow with an in-memory API (no cluster): watch expiry, deletion
and re-creation, a bad spec, device plugins that refuse the resources, a kernel write failing."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.deviceplugin.nodestate.loop import LoopSettings, NodeStateLoop
from hostdev.deviceplugin.nodestate.sync import Syncer
from hostdev.host import PciAddress, Sysfs
from hostdev.host.model import Inventory
from hostdev.testing import scenarios
from hostdev.testing.fakekernel import FakeKernel
from tests.nodeagent.fakeapi import FakeApi

A = PciAddress.parse
GPU = "example.com/a10"
GOOD = {"devices": [{"pciAddress": "0000:17:00.0", "resourceName": GPU}]}


class Manager:
    def __init__(self) -> None:
        self.applies: list[dict[str, tuple[PciAddress, ...]]] = []
        self.fail: str | None = None

    def apply(
        self, resources: Mapping[str, tuple[PciAddress, ...]], dra: frozenset[str] = frozenset()
    ) -> None:
        if self.fail:
            raise RuntimeError(self.fail)
        self.applies.append(dict(resources))


def wait_for(what: str, ok: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


class Harness:
    def __init__(
        self,
        tmp_path: Path,
        build: Callable[[Path], Any] = scenarios.gpu_with_audio,
        resync: float = 3600,
        refresh: float = 3600,
        retry: float = 3600,
    ):
        host = build(tmp_path / "host")
        self.kernel = FakeKernel(host)
        self.sysfs = Sysfs(str(tmp_path / "host"))
        self.api = FakeApi()
        self.manager = Manager()
        self.loop = NodeStateLoop(
            self.api,  # type: ignore[arg-type]
            Syncer(self.sysfs, DriverMemory(str(tmp_path / "state")), io=self.kernel, settle=0.5),
            self.manager,
            settings=LoopSettings(
                coalesce=0.05,
                resync=resync,
                allocations_every=refresh,
                backoff=0.1,
                retry=retry,
            ),
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop.run, args=(self.stop,), daemon=True)

    def synced(self, generation: int, state: str) -> dict[str, Any]:
        def ok() -> bool:
            st = self.api.status()
            return st.get("observedGeneration") == generation and st.get("syncStatus") == state

        wait_for(f"generation {generation} {state}", ok)
        return self.api.status()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.stop.set()
    harness.thread.join(10)
    assert not harness.thread.is_alive()


def test_watch_expiry_lists_again_without_a_new_sync(h: Harness) -> None:
    h.api.put(GOOD, generation=1)
    h.api.expire_next_watch = True
    h.thread.start()
    h.synced(1, "Succeeded")
    wait_for("a second list after the 410", lambda: h.api.lists >= 2)
    # Items: the first list, the list after the 410 (the put's event comes after them).
    wait_for("the re-listed object handled", lambda: h.loop.handled >= 2)
    assert h.loop.syncs == 1  # the re-listed object has the same generation
    assert h.manager.applies == [{GPU: (A("0000:17:00.0"),)}]


def test_waits_for_the_object_then_resyncs_a_recreated_one(h: Harness) -> None:
    h.thread.start()
    wait_for("the empty list handled", lambda: h.loop.handled >= 1)
    assert h.loop.syncs == 0 and h.api.patches == []  # nothing to apply, nothing to write
    h.api.put(GOOD, generation=1)
    h.synced(1, "Succeeded")
    h.api.delete()
    wait_for("the deletion handled", lambda: h.loop.handled >= 3)  # list, put, delete
    assert h.loop.syncs == 1  # deletion keeps the node as it is
    h.api.put(GOOD, generation=1, uid="u2")  # re-created: same generation, new object
    h.synced(1, "Succeeded")
    wait_for("the second sync", lambda: h.loop.syncs == 2)
    # Same resources as before: the plugins are not told again.
    assert h.manager.applies == [{GPU: (A("0000:17:00.0"),)}]


def test_bad_spec_fails_and_keeps_serving(h: Harness) -> None:
    h.api.put(GOOD, generation=1)
    h.thread.start()
    h.synced(1, "Succeeded")
    h.api.put({"devices": [{"pciAddress": "0000:17:00.0", "resourceNme": GPU}]}, generation=2)
    st = h.synced(2, "Failed")
    assert st["lastError"].startswith("spec: devices[0]: unknown field(s) ['resourceNme']")
    assert h.manager.applies == [{GPU: (A("0000:17:00.0"),)}]
    gpu = next(d for d in st["devices"] if d["pciAddress"] == "0000:17:00.0")
    assert gpu["resourceName"] == GPU  # still served, and the status says so


def test_plugins_refusing_resources_is_a_failed_sync(h: Harness) -> None:
    h.manager.fail = "socket dir not writable"
    h.api.put(GOOD, generation=1)
    h.thread.start()
    st = h.synced(1, "Failed")
    assert st["lastError"] == "device plugins: socket dir not writable"
    gpu = next(d for d in st["devices"] if d["pciAddress"] == "0000:17:00.0")
    assert "resourceName" not in gpu  # not served, so not reported as served
    # The next generation tries again and succeeds.
    h.manager.fail = None
    h.api.put({**GOOD, "pfs": []}, generation=2)
    h.synced(2, "Succeeded")
    assert h.manager.applies == [{GPU: (A("0000:17:00.0"),)}]


def test_kernel_write_failure_is_reported_with_device_state(tmp_path: Path) -> None:
    h = Harness(tmp_path, lambda root: scenarios.sriov_nic_dual_socket(root, numvfs=0))
    h.kernel.inject("sriov_numvfs", errno.ENOMEM, "0000:3b:00.0")
    h.api.put({"pfs": [{"pciAddress": "0000:3b:00.0", "numVfs": 4}]}, generation=1)
    h.thread.start()
    try:
        st = h.synced(1, "Failed")
    finally:
        h.stop.set()
        h.thread.join(10)
    assert "ran out of resources for 4 VFs (ENOMEM)" in st["lastError"]
    assert "sriov_numvfs 0" in st["lastError"]  # what the device looks like now
    assert h.sysfs.discover().devices[A("0000:3b:00.0")].sriov_numvfs == 0
    assert h.manager.applies == [{}]  # the first sync always says what to serve: nothing


def test_failed_sync_is_retried_with_backoff_without_a_spec_change(tmp_path: Path) -> None:
    """A transient kernel error (EBUSY twice) fails the sync; the loop retries on its own
    (10 ms, then 20 ms here) and converges with the same spec generation."""
    h = Harness(tmp_path, lambda root: scenarios.sriov_nic_dual_socket(root, numvfs=0), retry=0.01)
    h.kernel.inject("sriov_numvfs", errno.EBUSY, "0000:3b:00.0", times=2)
    h.api.put({"pfs": [{"pciAddress": "0000:3b:00.0", "numVfs": 4}]}, generation=1)
    h.thread.start()
    try:
        st = h.synced(1, "Succeeded")
    finally:
        h.stop.set()
        h.thread.join(10)
    assert not st.get("lastError")
    assert h.sysfs.discover().devices[A("0000:3b:00.0")].sriov_numvfs == 4
    assert h.loop.syncs == 3  # failed, failed, succeeded


def test_periodic_resync_writes_nothing_when_nothing_changed(tmp_path: Path) -> None:
    h = Harness(tmp_path, resync=0.1)
    h.api.put(GOOD, generation=1)
    h.thread.start()
    try:
        h.synced(1, "Succeeded")
        wait_for("three re-syncs", lambda: h.loop.syncs >= 4)
        writes = len(h.api.patches)
        wait_for("three more", lambda: h.loop.syncs >= 7)
        assert len(h.api.patches) == writes == 1
        # Something changes on the host behind the agent's back: the next re-sync repairs it
        # and the status does not change (the node is back where the spec wants it).
        h.kernel.host.bind("0000:17:00.0", None)
        syncs = h.loop.syncs
        wait_for("the repair", lambda: h.loop.syncs > syncs + 1)
        assert h.sysfs.discover().devices[A("0000:17:00.0")].driver == "vfio-pci"
        assert len(h.api.patches) == 1
    finally:
        h.stop.set()
        h.thread.join(10)


def test_an_unexpected_error_fails_the_sync_and_the_loop_goes_on(h: Harness) -> None:
    real = h.loop.syncer.sync
    calls = []

    def broken(obj: Mapping[str, Any]) -> Any:
        calls.append(obj)
        if len(calls) == 1:
            raise KeyError("bug")
        return real(obj)

    h.loop.syncer.sync = broken  # type: ignore[method-assign]
    h.api.put(GOOD, generation=1)
    h.thread.start()
    st = h.synced(1, "Failed")
    assert st["lastError"] == "internal error: KeyError: 'bug'"
    h.api.put({**GOOD, "pfs": []}, generation=2)
    h.synced(2, "Succeeded")
    assert h.thread.is_alive()


ROUTE = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "ens1f0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
)


def test_safety_guard_refusal_then_admin_override(tmp_path: Path) -> None:
    h = Harness(tmp_path, lambda root: scenarios.sriov_nic_dual_socket(root, numvfs=0))
    (tmp_path / "host/proc/net").mkdir(parents=True, exist_ok=True)
    (tmp_path / "host/proc/net/route").write_text(ROUTE)  # ens1f0 carries the default route
    pf = {"pciAddress": "0000:3b:00.0", "numVfs": 2}
    h.api.put({"pfs": [pf]}, generation=1)
    h.thread.start()
    try:
        st = h.synced(1, "Failed")
        assert "carries the default route (via ens1f0)" in st["lastError"]
        assert "set allowUnsafe: true on this entry to override" in st["lastError"]
        pf_status = next(d for d in st["devices"] if d["pciAddress"] == "0000:3b:00.0")
        assert "refused to set numVfs 2" in pf_status["message"]
        assert h.kernel.writes == []  # refused: not one write
        # The admin overrides the guard for this PF: now it is applied.
        h.api.put({"pfs": [{**pf, "allowUnsafe": True}]}, generation=2)
        st = h.synced(2, "Succeeded")
        assert h.sysfs.discover().devices[A("0000:3b:00.0")].sriov_numvfs == 2
        assert st["lastError"] == ""
        pf_status = next(d for d in st["devices"] if d["pciAddress"] == "0000:3b:00.0")
        assert "message" not in pf_status
    finally:
        h.stop.set()
        h.thread.join(10)


def test_refresh_reads_the_live_view_not_sysfs(tmp_path: Path) -> None:
    h = Harness(tmp_path, refresh=0.05)
    live = h.sysfs.discover()
    gpu = A("0000:17:00.0")
    # The plugins' view saw the GPU leave vfio-pci (a uevent the agent got before any rescan).
    moved = replace(
        live, devices={**live.devices, gpu: replace(live.devices[gpu], driver="nvidia")}
    )
    views: list[Inventory] = []

    def view() -> Inventory:
        views.append(moved)
        return moved

    h.loop.live_inventory = view
    h.api.put(GOOD, generation=1)
    h.thread.start()
    try:
        h.synced(1, "Succeeded")

        def unhealthy() -> bool:
            d = next(d for d in h.api.status()["devices"] if d["pciAddress"] == str(gpu))
            return d["driver"] == "nvidia" and d["health"] == "Unhealthy"

        wait_for("the live view in the status", unhealthy)
        assert views
    finally:
        h.stop.set()
        h.thread.join(10)


def test_a_sync_refuses_to_destroy_a_vf_the_plugins_handed_to_a_pod(tmp_path: Path) -> None:
    """The agent's allocations (live from its device plugins) reach the guards: a resize that
    would destroy an allocated VF is refused, and nothing is written."""
    host = scenarios.sriov_nic_dual_socket(tmp_path / "host", numvfs=4)
    kernel = FakeKernel(host)
    vf = host.vf_address("0000:3b:00.0", 3)
    syncer = Syncer(
        Sysfs(str(tmp_path / "host")),
        DriverMemory(str(tmp_path / "state")),
        io=kernel,
        settle=0.5,
        allocated=lambda: {vf: "a pod through example.com/vf (allocated by the device plugin)"},
    )
    obj = {"metadata": {"name": "n1", "generation": 1}, "spec": {"pfs": [
        {"pciAddress": "0000:3b:00.0", "numVfs": 2, "allowUnsafe": True}]}}  # fmt: skip
    result = syncer.sync(obj)
    assert result.outcome.state == "Failed" and kernel.writes == []
    assert f"VF {vf} is allocated to a pod through example.com/vf" in result.outcome.error
