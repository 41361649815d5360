"""Agent pieces: uevent parsing and the real netlink socket, inotify watcher, config file,
persisted state, metrics and /healthz, the hostdev-node process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hostdev.deviceplugin import persist
from hostdev.deviceplugin.events import DirWatcher, PciEvent, UeventSource, parse_uevent
from hostdev.deviceplugin.metrics import Metrics, serve_http
from hostdev.deviceplugin.resources import ConfigError, load_resources_file
from hostdev.host import PciAddress
from hostdev.testing.fakesysfs import FakeHost
from hostdev.testing.scenarios import sriov_nic_dual_socket
from tests.deviceplugin.conftest import AgentFactory, resources
from tests.fixtures.kubeletsim import KubeletSim
from tests.fixtures.tiers import tier_unavailable


def _uevent(action: str, devpath: str, **env: str) -> bytes:
    lines = [f"{action}@{devpath}", f"ACTION={action}", f"DEVPATH={devpath}"]
    lines += [f"{k}={v}" for k, v in env.items()]
    return "\0".join(lines).encode() + b"\0"


def test_parse_uevent_keeps_pci_bind_unbind_add_remove() -> None:
    dp = "/devices/pci0000:3a/0000:3a:00.0/0000:3b:02.1"
    ev = parse_uevent(_uevent("unbind", dp, SUBSYSTEM="pci", PCI_SLOT_NAME="0000:3b:02.1"))
    assert ev == PciEvent("unbind", PciAddress.parse("0000:3b:02.1"))
    # No PCI_SLOT_NAME: the DEVPATH's last element names the function.
    assert parse_uevent(_uevent("add", dp, SUBSYSTEM="pci")) == PciEvent(
        "add", PciAddress.parse("0000:3b:02.1")
    )
    assert parse_uevent(_uevent("add", "/devices/virtual/net/tap0", SUBSYSTEM="net")) is None
    assert parse_uevent(b"libudev\0\xfe\xed") is None
    assert parse_uevent(_uevent("online", dp, SUBSYSTEM="pci")) is None


async def test_real_netlink_uevent_socket_opens() -> None:
    got: list[PciEvent] = []
    src = UeventSource(got.append)
    try:
        src.open()
    except PermissionError as e:
        tier_unavailable(f"netlink uevent socket not permitted here: {e}")
    try:
        assert src._sock is not None
        assert src._sock.family == socket.AF_NETLINK
        assert src._sock.getsockname()[1] == 1  # subscribed to the kernel's uevent group
    finally:
        src.close()


async def test_dir_watcher_follows_a_directory_created_later(tmp_path: Path) -> None:
    seen: list[tuple[str, str, bool]] = []
    changed = asyncio.Event()

    def cb(d: str, n: str, created: bool) -> None:
        seen.append((d, n, created))
        changed.set()

    w = DirWatcher(cb)
    vfio = tmp_path / "dev" / "vfio"
    w.watch(str(vfio))  # does not exist yet: watched through its parent
    try:
        (tmp_path / "dev").mkdir()
        vfio.mkdir()
        async with asyncio.timeout(5):
            while (str(vfio), "", True) not in seen:
                changed.clear()
                await changed.wait()
        (vfio / "12").write_text("")
        async with asyncio.timeout(5):
            while (str(vfio), "12", True) not in seen:
                changed.clear()
                await changed.wait()
    finally:
        w.close()


def test_config_file_errors_name_the_entry(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("- resourceName: example.com/ok\n  selector: {vendors: ['8086']}\n")
    (r,) = load_resources_file(f)
    assert r.resource_name == "example.com/ok" and r.strategy == "spread"
    for text, msg in [
        ("- resourceName: bad\n  selector: {vendors: ['8086']}\n", "invalid resource name"),
        ("- resourceName: a.io/x\n  selector: {vendors: ['xyz']}\n", "4 hex digits"),
        ("- resourceName: a.io/x\n", "selector is empty"),
        ("- resourceName: a.io/x\n  selector: {vendors: ['8086']}\n  strategy: best\n", "strategy"),
        ("- {resourceName: a.io/x, selector: {vendors: ['8086']}}\n" * 2, "listed twice"),
        ("- resourceName: a.io/x\n  selectr: {}\n", "unknown field"),
        (
            "- {resourceName: a.io/x.y, selector: {vendors: ['8086']}}\n"
            "- {resourceName: a.io/X_y, selector: {vendors: ['10de']}}\n",
            r"resources\[1\]: resource names a.io/x.y and a.io/X_y both become "
            r"PCI_RESOURCE_A_IO_X_Y .* a.io/X_y is refused, rename it",
        ),
        ("{[", "not valid YAML"),
    ]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=msg) as e:
            load_resources_file(f)
        assert str(f) in str(e.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_resources_file(tmp_path / "missing.yaml")


def test_state_encoding_with_cache_is_the_plain_json(tmp_path: Path) -> None:
    """The cached encoder writes what json.dumps of the whole document writes, on the first
    save and after a device changed (the changed one re-encoded, not the stale cached one)."""
    from hostdev.deviceplugin.units import Advertised
    from hostdev.policy.allocation import AllocUnit
    from hostdev.policy.health import Verdict

    def adv(addr: str, healthy: bool) -> Advertised:
        a = PciAddress.parse(addr)
        why = None if healthy else 'gone "away" \u00e9'
        return Advertised(
            AllocUnit(id=addr, addresses=(a,), group=7, numa_node=0, pf=None), Verdict(healthy, why)
        )

    def plain(res: dict[str, persist.SavedResource]) -> bytes:
        doc = {
            "format": persist.FORMAT,
            "resources": {
                n: {
                    "devices": [persist.advertised_to_json(d) for d in r.devices],
                    "allocated": sorted(r.allocated),
                }
                for n, r in sorted(res.items())
            },
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    cache = persist.EncodeCache()
    first = (adv("0000:3b:02.0", True), adv("0000:3b:02.1", True))
    res = {
        "b.io/y": persist.SavedResource(first, frozenset({"0000:3b:02.1"})),
        "a.io/x": persist.SavedResource(),
    }
    assert persist.encode(res, cache) == plain(res)
    res["b.io/y"] = persist.SavedResource((first[0], adv("0000:3b:02.1", False)))
    assert persist.encode(res, cache) == plain(res)
    persist.save(str(tmp_path), persist.encode(res, cache))
    loaded = persist.load(str(tmp_path))
    assert [d.verdict.healthy for d in loaded["b.io/y"].devices] == [True, False]


def test_damaged_state_file_is_survived(tmp_path: Path) -> None:
    assert persist.load(str(tmp_path)) == {}
    Path(persist.state_path(str(tmp_path))).write_text("{not json")
    assert persist.load(str(tmp_path)) == {}
    doc = {
        "format": 1,
        "resources": {
            "a.io/x": {
                "devices": [
                    {
                        "id": "0000:3b:02.0",
                        "addresses": ["0000:3b:02.0"],
                        "group": 7,
                        "numa": 0,
                        "pf": None,
                        "healthy": True,
                        "reason": None,
                    },
                    {"id": "0000:3b:02.1", "addresses": ["junk"], "group": 8},
                ],
                "allocated": ["0000:3b:02.0"],
            }
        },
    }
    Path(persist.state_path(str(tmp_path))).write_text(json.dumps(doc))
    saved = persist.load(str(tmp_path))
    assert [a.unit.id for a in saved["a.io/x"].devices] == ["0000:3b:02.0"]
    assert saved["a.io/x"].allocated == {"0000:3b:02.0"}
    # what the configuration guards read: every function of an allocated unit, and who has it
    assert persist.saved_allocations(str(tmp_path)) == {
        PciAddress.parse("0000:3b:02.0"): "a pod through a.io/x (allocated by the device plugin)"
    }


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_metrics_and_healthz(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    h = sriov_nic_dual_socket(host_root, numvfs=2)
    name = "example.com/e810_vf"
    async with agent(resources({"resourceName": name, "selector": {"devices": ["1889"]}})) as mgr:
        await kubelet.wait_registered(name)
        client = kubelet.client(name)
        await client.wait_for(lambda d: len(d) == 6)
        await client.allocate([str(h.vf_address("0000:3b:00.0", 0))])
        http = await serve_http(mgr.metrics, 0, mgr.health, "127.0.0.1")
        try:
            port = http.sockets[0].getsockname()[1]
            status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz")
            assert status == 200 and f"{name}: serving, registered, 6 devices" in body
            status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
            assert status == 200
            assert f'hostdev_devices{{health="Healthy",resource="{name}"}} 6.0' in body
            assert f'hostdev_allocations_total{{resource="{name}"}} 1.0' in body
            assert f'hostdev_registrations_total{{resource="{name}",result="ok"}} 1.0' in body
            await mgr.plugins[name].stop()
            status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz")
            assert status == 503 and "DOWN" in body
        finally:
            http.close()
            await http.wait_closed()


def test_metrics_registry_is_private() -> None:
    a, b = Metrics(), Metrics()
    a.set_devices("x.io/y", 1, 0)
    assert a.sample("hostdev_devices", {"resource": "x.io/y", "health": "Healthy"}) == 1.0
    assert b.sample("hostdev_devices", {"resource": "x.io/y", "health": "Healthy"}) is None


async def test_hostdev_node_process_serves_and_stops_cleanly(
    host_root: Path, kubelet: KubeletSim, short_tmp: str
) -> None:
    sriov_nic_dual_socket(host_root, numvfs=2)
    cfg = Path(short_tmp) / "r.yaml"
    cfg.write_text("- resourceName: example.com/vf\n  selector: {devices: ['1889']}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hostdev.deviceplugin.agent",
        f"--host-root={host_root}",
        f"--plugin-dir={kubelet.plugin_dir}",
        f"--state-dir={short_tmp}/state",
        f"--config={cfg}",
        "--metrics-port=0",
        "--no-uevents",
        stderr=subprocess.PIPE,
    )
    try:
        await kubelet.wait_registered("example.com/vf", within=20)
        assert len(await kubelet.client("example.com/vf").wait_for(lambda d: len(d) == 6)) == 6
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    assert persist.load(f"{short_tmp}/state")["example.com/vf"].devices
    bad = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hostdev.deviceplugin.agent",
        f"--config={short_tmp}/none.yaml",
        "--metrics-port=0",
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(bad.communicate(), 20)
    assert bad.returncode == 2 and b"cannot read" in err


def _real_pci_device() -> str:
    """A PCI function of this machine whose uevent we may trigger (synthetic "change")."""
    try:
        names = sorted(os.listdir("/sys/bus/pci/devices"))
    except OSError:
        names = []
    for name in names:
        if os.access(f"/sys/bus/pci/devices/{name}/uevent", os.W_OK):
            return name
    tier_unavailable("no writable /sys/bus/pci/devices/*/uevent: cannot make a real uevent")


async def test_a_real_kernel_uevent_drives_a_targeted_rescan(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    real = _real_pci_device()
    h = FakeHost(host_root)
    # The fake node has a VF-like function at the same address as a real one, so the kernel's
    # own uevent for the real device names it.
    h.add_device(real, vendor="8086", device="1889", class_code="020000", driver="vfio-pci")
    name = "example.com/vf"
    async with agent(
        resources({"resourceName": name, "selector": {"devices": ["1889"]}}), uevents=True
    ) as mgr:
        if not mgr.uevents_active:
            tier_unavailable("kernel uevent socket could not be opened here")
        await kubelet.wait_registered(name)
        client = kubelet.client(name)
        await client.wait_for(lambda d: d.get(real) is not None and d[real].health == "Healthy")
        link = h.device_dir(real) / "driver"
        link.unlink()
        link.symlink_to("../../../bus/pci/drivers/ixgbevf")  # /dev/vfio untouched: no inotify
        await asyncio.to_thread(Path(f"/sys/bus/pci/devices/{real}/uevent").write_text, "change")
        devs = await client.wait_for(lambda d: d[real].health == "Unhealthy")
        assert "ixgbevf" in (mgr.plugins[name].devices[real].verdict.reason or "")
        assert len(devs) == 1


async def test_the_agent_logs_what_discovery_skips(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sriov_nic_dual_socket(host_root, numvfs=1)
    bus = host_root / "sys/bus/pci/devices"
    # A function the kernel could never name (device 0x20 > 0x1f): skipped, and said so.
    os.symlink("../../../devices/pci0000:00/0000:00:20.0", bus / "0000:00:20.0")
    caplog.set_level("INFO", logger="hostdev.deviceplugin.manager")
    async with agent(
        resources({"resourceName": "example.com/vf", "selector": {"devices": ["1889"]}})
    ) as mgr:
        said = (
            "host scan: 0000:00:20.0: skipped: invalid PCI address '0000:00:20.0': "
            "device number above 1f"
        )
        assert [r.levelname for r in caplog.records if r.getMessage() == said] == ["WARNING"]
        await mgr.rescan()  # seen again: not logged again
        assert sum(r.getMessage() == said for r in caplog.records) == 1
        (bus / "0000:00:20.0").unlink()
        await mgr.rescan()
        assert any(
            r.getMessage().startswith("host scan: no longer seen: 0000:00:20.0")
            for r in caplog.records
        )
