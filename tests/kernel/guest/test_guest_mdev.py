"""Runs INSIDE the QEMU guest, as root: mediated devices on the real kernel.

The kernel's own vfio-mdev sample ``mtty`` (a virtual serial-port parent, not PCI; built for
this guest kernel by scripts/setup.d/40-mdev-samples.sh from Debian's linux-source and
linux-headers) is loaded; the real node agent (PluginManager, real gRPC over a unix socket, the
kubelet simulator) creates instances through sysfs, advertises them, hands them out with
``MDEV_PCI_RESOURCE_<NAME>`` and their ``/dev/vfio/<group>`` (which must exist and open),
follows their health when the parent goes away, and removes them, never one that is allocated
or open. Bad input: an unknown type, more than ``available_instances``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from guestlib import group_status_viable, vfio_group_holder, wait_for

from hostdev.deviceplugin.manager import PluginManager
from hostdev.deviceplugin.resources import parse_resources
from hostdev.host.mdev import discover_mdev
from hostdev.host.sysfs import Sysfs
from tests.fixtures.kubeletsim import KubeletSim

if os.environ.get("RK_GUEST") != "1":  # pragma: no cover - guarded twice (conftest too)
    pytest.skip(
        "guest-only tests: run through tests/kernel/test_real_kernel.py", allow_module_level=True
    )

SYS = Sysfs("/")
NAME = "example.com/mtty"
CACHE = Path(os.environ.get("HOSTDEV_CACHE") or Path.home() / ".cache/hostdev")
MODULES = CACHE / "mdev" / os.uname().release


def _load_mtty() -> None:
    subprocess.run(["modprobe", "-a", "mdev", "vfio_iommu_type1"], check=True)
    subprocess.run(["insmod", str(MODULES / "mtty.ko")], check=True)
    wait_for(lambda: "mtty" in discover_mdev("/").parents, "the mtty parent")


def _unload_mtty() -> None:
    subprocess.run(["rmmod", "mtty"], check=True)
    wait_for(lambda: "mtty" not in discover_mdev("/").parents, "mtty gone")


@pytest.fixture
def mtty() -> Iterator[None]:
    assert (MODULES / "mtty.ko").exists(), (
        f"{MODULES}/mtty.ko missing: run scripts/setup.d/40-mdev-samples.sh on the host"
    )
    _load_mtty()
    yield
    with contextlib.suppress(subprocess.CalledProcessError):
        _unload_mtty()  # removes whatever instances are left with their parent
    assert not discover_mdev("/").instances


@pytest.fixture
async def kubelet() -> AsyncIterator[KubeletSim]:
    short = tempfile.mkdtemp(prefix="rk-", dir="/tmp")  # unix socket paths stay short
    sim = KubeletSim(os.path.join(short, "dp"))
    await sim.start()
    yield sim
    await sim.stop()
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
async def agent(kubelet: KubeletSim, tmp_path: Path) -> AsyncIterator[PluginManager]:
    mgr = PluginManager(SYS, kubelet.plugin_dir, str(tmp_path / "state"), uevents=False)
    await mgr.start()
    yield mgr
    await mgr.close()


def _res(count: int, type_: str = "mtty-2") -> object:
    return parse_resources([{"resourceName": NAME, "mdev": {"type": type_, "count": count}}])


async def test_agent_creates_advertises_allocates_and_removes_real_instances(
    mtty: None, kubelet: KubeletSim, agent: PluginManager
) -> None:
    before = discover_mdev("/").parents["mtty"].type("mtty-2")
    assert before is not None and before.device_api == "vfio-pci"
    await agent.apply(_res(3))  # type: ignore[arg-type]
    await agent.rescan()
    inv = discover_mdev("/")
    ours = agent.mdev.of(NAME)
    assert len(ours) == 3 and set(ours) <= set(inv.instances)
    for u in ours:
        i = inv.instances[u]
        assert (i.parent, i.type_id) == ("mtty", "mtty-2") and i.iommu_group is not None
        assert os.path.exists(f"/dev/vfio/{i.iommu_group}")  # noqa: ASYNC240 - a stat, in a test
    after = inv.parents["mtty"].type("mtty-2")
    assert after is not None and after.available_instances == before.available_instances - 3
    await kubelet.wait_registered(NAME, within=60)
    client = kubelet.client(NAME)
    devs = await client.wait_for(lambda d: len(d) == 3, within=60)
    assert sorted(devs) == sorted(ours) and {d.health for d in devs.values()} == {"Healthy"}
    a, b, c = ours
    (resp,) = (await client.allocate([b, a])).container_responses
    assert dict(resp.envs) == {"MDEV_PCI_RESOURCE_EXAMPLE_COM_MTTY": f"{b},{a}"}
    nodes = [d.host_path for d in resp.devices]
    assert nodes == [
        "/dev/vfio/vfio",
        f"/dev/vfio/{inv.instances[b].iommu_group}",
        f"/dev/vfio/{inv.instances[a].iommu_group}",
    ]
    for n in nodes[1:]:
        fd = os.open(n, os.O_RDWR)  # the group node opens, and VFIO calls the group viable
        os.close(fd)
        assert group_status_viable(int(n.rsplit("/", 1)[1]))
    # c is open by a VFIO user (as QEMU holds it): nothing removes it, nor the allocated a, b
    gc = inv.instances[c].iommu_group
    assert gc is not None
    with vfio_group_holder(gc, c) as holder:
        await agent.apply(())
        assert sorted(agent.mdev.of(NAME)) == sorted(ours)
        kept = agent.mdev.last.kept
        assert kept[c].startswith(f"{NAME} is no longer wanted but /dev/vfio/{gc} is open by ")
        assert f"pid {holder.pid}" in kept[c]
        assert "allocated to a pod" in kept[a] and "allocated to a pod" in kept[b]
        assert set(ours) <= set(discover_mdev("/").instances)
    # the holder is gone: c goes; a and b stay while pods hold them
    await agent.reconcile_mdev()
    assert sorted(agent.mdev.of(NAME)) == sorted([a, b])
    assert c not in discover_mdev("/").instances
    assert not os.path.exists(f"/dev/vfio/{gc}")  # noqa: ASYNC240 - a stat, in a test


async def test_bad_input_is_refused_and_nothing_is_created(
    mtty: None, kubelet: KubeletSim, agent: PluginManager
) -> None:
    await agent.apply(_res(1, "mtty-9"))  # type: ignore[arg-type]
    why = agent.mdev.last.refusals[NAME]
    assert why.startswith("unknown mdev type 'mtty-9' on parents mtty (they offer mtty-1")
    assert not discover_mdev("/").instances
    t = discover_mdev("/").parents["mtty"].type("mtty-2")
    assert t is not None and t.available_instances
    await agent.apply(_res(t.available_instances + 1))  # type: ignore[arg-type]
    assert agent.mdev.last.refusals[NAME] == (
        f"mdev type mtty-2 exhausted: {t.available_instances + 1} more instances wanted, the "
        f"parents have {t.available_instances} left (mtty: {t.available_instances})"
    )
    assert not discover_mdev("/").instances
    assert not agent.mdev.of(NAME)


async def test_parent_unloaded_turns_allocated_instance_unhealthy_and_comes_back(
    mtty: None, kubelet: KubeletSim, agent: PluginManager
) -> None:
    await agent.apply(_res(2, "mtty-1"))  # type: ignore[arg-type]
    await agent.rescan()
    await kubelet.wait_registered(NAME, within=60)
    client = kubelet.client(NAME)
    devs = await client.wait_for(lambda d: len(d) == 2, within=60)
    held, _free = sorted(devs)
    await client.allocate([held])
    _unload_mtty()  # the parent disappears, its instances with it
    # /dev/vfio/<group> vanished: the agent's inotify watch rescans without being told
    devs = await client.wait_for(lambda d: list(d) == [held], within=60)
    assert devs[held].health == "Unhealthy"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.allocate([held])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"mdev instance {held} is not handed to a VM: mdev instance {held} is gone" in str(
        err.value.details()
    )
    _load_mtty()  # back: the next resync makes the two it wants again
    await agent.rescan()
    devs = await client.wait_for(
        lambda d: sum(x.health == "Healthy" for x in d.values()) == 2, within=60
    )
    assert len(discover_mdev("/").instances) == 2


@pytest.fixture
def mdpy() -> Iterator[None]:
    assert (MODULES / "mdpy.ko").exists(), f"{MODULES}/mdpy.ko missing"
    subprocess.run(["modprobe", "-a", "mdev", "vfio_iommu_type1"], check=True)
    subprocess.run(["insmod", str(MODULES / "mdpy.ko")], check=True)
    wait_for(lambda: "mdpy" in discover_mdev("/").parents, "the mdpy parent")
    yield
    subprocess.run(["rmmod", "mdpy"], check=False)  # its instances go with it
    assert "mdpy" not in discover_mdev("/").parents


async def test_mdpy_display_instance_is_created_handed_out_and_kept_while_allocated(
    mdpy: None, kubelet: KubeletSim, agent: PluginManager
) -> None:
    """The kernel's mdpy sample (a display device): its first type made, allocated, and kept
    (allocated) when the resource goes away."""
    t = discover_mdev("/").parents["mdpy"].types[0]
    assert t.device_api == "vfio-pci" and t.available_instances
    res = "example.com/mdpy"
    await agent.apply(parse_resources([{"resourceName": res, "mdev": {"type": t.id, "count": 1}}]))
    await kubelet.wait_registered(res, within=60)
    client = kubelet.client(res)
    devs = await client.wait_for(lambda d: len(d) == 1, within=60)
    (uuid,) = devs
    (resp,) = (await client.allocate([uuid])).container_responses
    assert dict(resp.envs) == {"MDEV_PCI_RESOURCE_EXAMPLE_COM_MDPY": uuid}
    group = discover_mdev("/").instances[uuid].iommu_group
    assert [d.host_path for d in resp.devices] == ["/dev/vfio/vfio", f"/dev/vfio/{group}"]
    await agent.apply(())
    assert "allocated to a pod" in agent.mdev.last.kept[uuid]
    assert uuid in discover_mdev("/").instances
