"""The NodeState loop driving the real PluginManager (asyncio, real gRPC servers on unix sockets)
through ManagerSink: a spec change restarts nothing that did not change."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.deviceplugin.manager import PluginManager
from hostdev.deviceplugin.nodestate.first import to_resource_configs
from hostdev.deviceplugin.nodestate.loop import LoopSettings, NodeStateLoop
from hostdev.deviceplugin.nodestate.runner import ManagerSink
from hostdev.deviceplugin.nodestate.sync import Syncer
from hostdev.host import PciAddress, Sysfs
from hostdev.testing import scenarios
from hostdev.testing.fakekernel import FakeKernel
from tests.nodeagent.fakeapi import FakeApi

A = PciAddress.parse
NIC_A = "example.com/ens1f0-vf"
NIC_B = "example.com/ens2f0-vf"


def spec(last_b: int) -> dict[str, object]:
    return {
        "devices": [
            {"selector": {"pfNames": ["ens1f0#0-1"]}, "resourceName": NIC_A},
            {"selector": {"pfNames": [f"ens2f0#0-{last_b}"]}, "resourceName": NIC_B},
        ]
    }


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[PluginManager, FakeKernel]]:
    kernel = FakeKernel(scenarios.sriov_nic_dual_socket(tmp_path / "host", numvfs=4))
    plugin_dir = tempfile.mkdtemp(prefix="dp-", dir="/tmp")  # unix socket paths stay short
    m = PluginManager(Sysfs(str(tmp_path / "host")), plugin_dir, None, uevents=False)
    await m.start()
    try:
        yield m, kernel
    finally:
        await m.close()
        shutil.rmtree(plugin_dir)


async def wait_until(what: str, ok: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 20.0
    while not ok():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_spec_change_updates_only_what_changed(
    node: tuple[PluginManager, FakeKernel], tmp_path: Path
) -> None:
    manager, kernel = node
    api = FakeApi()
    loop = NodeStateLoop(
        api,  # type: ignore[arg-type]
        Syncer(manager.sysfs, DriverMemory(str(tmp_path / "state")), io=kernel, settle=0.5),
        ManagerSink(manager, asyncio.get_running_loop()),
        settings=LoopSettings(coalesce=0.05, resync=3600, allocations_every=3600),
    )
    sink = loop.sink
    assert isinstance(sink, ManagerSink)
    stop = threading.Event()
    api.put(spec(1), generation=1)
    worker = asyncio.create_task(asyncio.to_thread(loop.run, stop))
    try:

        def devices(name: str) -> set[str]:
            p = manager.plugins.get(name)
            return set(p.devices) if p is not None else set()

        vf = ("0000:3b:02.{}", "0000:86:02.{}")
        await wait_until(
            "both resources served",
            lambda: (
                devices(NIC_A) == {vf[0].format(i) for i in (0, 1)}
                and devices(NIC_B) == {vf[1].format(i) for i in (0, 1)}
            ),
        )
        plugin_a, plugin_b = manager.plugins[NIC_A], manager.plugins[NIC_B]
        inode_a = os.stat(plugin_a.socket_path).st_ino
        inode_b = os.stat(plugin_b.socket_path).st_ino

        api.put(spec(3), generation=2)
        await wait_until("B grows", lambda: devices(NIC_B) == {vf[1].format(i) for i in range(4)})
        # A untouched; B updated in place: no server restarted, no socket re-created.
        assert manager.plugins[NIC_A] is plugin_a and manager.plugins[NIC_B] is plugin_b
        assert os.stat(plugin_a.socket_path).st_ino == inode_a
        assert os.stat(plugin_b.socket_path).st_ino == inode_b
        assert devices(NIC_A) == {vf[0].format(i) for i in (0, 1)}

        # A resource dropped from the spec: its server stops, the other keeps running.
        api.put({"devices": spec(3)["devices"][1:]}, generation=3)  # type: ignore[index]
        await wait_until("A gone", lambda: NIC_A not in manager.plugins)
        # Gone from the map means stopped and its socket removed (never half-removed).
        assert not Path(plugin_a.socket_path).exists()  # noqa: ASYNC240 - a stat, in a test
        assert not plugin_a.serving
        assert manager.plugins[NIC_B] is plugin_b
        # The loop thread counts the sync once the manager's apply has returned to it.
        await wait_until("the third sync counted", lambda: loop.syncs >= 3)
        assert loop.syncs == 3
        # Refreshes read the manager's live view (from the loop's thread), not sysfs again. (The
        # rescan each apply asks for may still replace the view: ask until one read matches.)
        deadline = time.monotonic() + 20
        live = await asyncio.to_thread(sink.inventory)
        while live is not manager.view.inventory and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            live = await asyncio.to_thread(sink.inventory)
        assert live is manager.view.inventory
        assert A("0000:86:02.3") in live.devices
    finally:
        stop.set()
        await worker


def test_resource_configs_select_exact_addresses() -> None:
    got = to_resource_configs(
        {
            "b.io/x": (A("0000:3b:02.1"), A("0000:3b:02.0")),
            "a.io/y": (),
            "a.io/z": (A("0000:17:00.0"),),
        }
    )
    assert [c.resource_name for c in got] == ["a.io/z", "b.io/x"]  # empty ones are not served
    assert got[1].selector.pci_addresses == {A("0000:3b:02.0"), A("0000:3b:02.1")}
    assert got[1].strategy == "spread"
