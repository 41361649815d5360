"""The NodeState loop waits for the VMs in the way and applies the moment one goes: blockers in
the status, a sync on the pod-gone event (not on a clock), none for other pods."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.deviceplugin.nodestate.loop import LoopSettings, NodeStateLoop
from hostdev.deviceplugin.nodestate.sync import Syncer
from hostdev.host import PciAddress, Sysfs
from hostdev.host.model import Inventory
from hostdev.policy.nodestatus import AllocationRow
from hostdev.testing import scenarios
from hostdev.testing.fakekernel import FakeKernel
from hostdev.testing.fakeprocs import hold_open, let_go
from tests.nodeagent.fakeapi import FakeApi
from tests.nodeagent.test_loop_unit import Manager, wait_for

A = PciAddress.parse
PF, RES = "0000:3b:00.0", "example.com/vf"


def spec(vfs: str) -> dict[str, Any]:
    return {
        "pfs": [{"pciAddress": PF, "numVfs": 2}],
        "devices": [{"selector": {"pfNames": [f"ens1f0#{vfs}"]}, "resourceName": RES}],
    }


class Kubelet:
    """Allocations as the kubelet would list them (``rows``), read by the loop."""

    def __init__(self) -> None:
        self.rows: tuple[AllocationRow, ...] = ()

    def read(self, served: Any, inventory: Inventory) -> tuple[AllocationRow, ...]:
        return self.rows


class PodEvents:
    """A pod watch the test drives: ``gone(ns, pod)`` is what the loop registered."""

    def __init__(self) -> None:
        self.gone: Callable[[str, str], None] | None = None

    def run(self, stop: threading.Event, gone: Callable[[str, str], None]) -> None:
        self.gone = gone
        stop.wait()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[NodeStateLoop, FakeApi, Kubelet, PodEvents, Path]]:
    root = tmp_path / "host"
    kernel = FakeKernel(scenarios.sriov_nic_dual_socket(root, numvfs=0), vf_drivers={PF: "iavf"})
    api, kubelet, pods = FakeApi(), Kubelet(), PodEvents()
    # Every clock an hour: whatever re-applies below does it because of an event.
    loop = NodeStateLoop(
        api,  # type: ignore[arg-type]
        Syncer(Sysfs(str(root)), DriverMemory(str(tmp_path / "state")), io=kernel, settle=0.5),
        Manager(),
        allocations=kubelet,
        settings=LoopSettings(coalesce=0.05, resync=3600, allocations_every=3600, retry=3600),
        pods_gone=pods,
    )
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    yield loop, api, kubelet, pods, root
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


def test_applies_when_the_blocking_pod_goes_and_not_before(
    agent: tuple[NodeStateLoop, FakeApi, Kubelet, PodEvents, Path],
) -> None:
    loop, api, kubelet, pods, root = agent
    api.put(spec("0-1"), generation=1)
    wait_for("first sync", lambda: api.status().get("syncStatus") == "Succeeded")
    sysfs = Sysfs(str(root))
    vf0, vf1 = sysfs.discover().devices[A(PF)].virtfns
    hold_open(root, 777, f"/dev/vfio/{sysfs.discover().devices[vf0].iommu_group}")
    kubelet.rows = (AllocationRow(vf0, RES, "ns", "virt-launcher-a-1", "compute", "a"),)
    api.put(spec("1"), generation=2)  # VF 0 goes back to iavf: VM a is in the way
    wait_for("blocked", lambda: api.status().get("observedGeneration") == 2
             and api.status().get("blockers"))  # fmt: skip
    st = api.status()
    assert st["syncStatus"] == "Failed"
    assert [(b["vmi"], b["pciAddress"], b["action"]) for b in st["blockers"]] == [
        ("a", str(vf0), "restore iavf")
    ]
    blocked = {c["type"]: c for c in st["conditions"]}["Blocked"]
    assert blocked["status"] == "True" and "VM ns/a (0000:3b:02.0)" in blocked["message"]
    syncs = loop.syncs
    assert pods.gone is not None
    # Another pod on the node goes: nothing to do for it.
    handled = loop.handled
    pods.gone("ns", "virt-launcher-other-1")
    wait_for("the event taken", lambda: loop.handled > handled)
    assert loop.syncs == syncs
    # VM a stops: QEMU exits, the kubelet forgets the device, the pod goes -> applied at once.
    let_go(root, 777)
    kubelet.rows = ()
    pods.gone("ns", "virt-launcher-a-1")
    wait_for("applied", lambda: api.status().get("syncStatus") == "Succeeded")
    assert loop.syncs == syncs + 1
    assert sysfs.discover().devices[vf0].driver == "iavf"
    assert sysfs.discover().devices[vf1].driver == "vfio-pci"
    final = api.status()
    assert final["blockers"] == []
    assert {c["type"]: c["status"] for c in final["conditions"]}["Blocked"] == "False"
