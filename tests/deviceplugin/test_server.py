"""The device-plugin servers over real gRPC on unix sockets, against the kubelet simulator."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from hostdev.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as pb
from hostdev.deviceplugin.events import PciEvent
from hostdev.deviceplugin.manager import PluginManager
from hostdev.host import PciAddress
from hostdev.policy.naming import socket_name
from hostdev.policy.nodestatus import PodDevices
from hostdev.testing.fakesysfs import FakeHost
from hostdev.testing.scenarios import (
    gpu_with_audio,
    gpus_behind_switch_without_acs,
    sriov_nic_dual_socket,
    two_gpus_with_audio,
)
from tests.deviceplugin.conftest import AgentFactory, resources
from tests.fixtures.kubeletsim import KubeletSim, PluginClient

VF = {"vendors": ["8086"], "devices": ["1889"]}
NAME = "example.com/e810_vf"


def _specs(resp: pb.ContainerAllocateResponse) -> list[tuple[str, str, str]]:
    return [(d.container_path, d.host_path, d.permissions) for d in resp.devices]


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _group_of(root: Path, bus: str) -> str:
    """The IOMMU group of function 0 on ``bus``, as the fake kernel linked it."""
    return os.path.basename(os.readlink(root / f"sys/bus/pci/devices/0000:{bus}:00.0/iommu_group"))


def _group(h: FakeHost, addr: str) -> int:
    return int(os.path.basename(os.readlink(h.device_dir(addr) / "iommu_group")))


async def test_registers_with_the_kubelet_v1beta1_contract(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    sriov_nic_dual_socket(host_root)
    async with agent(resources({"resourceName": NAME, "selector": VF})):
        await kubelet.wait_registered(NAME)
        req = kubelet.registrations[0].request
        assert req.version == "v1beta1"
        assert req.resource_name == NAME
        assert req.endpoint == "hostdev-example.com_e810_vf.sock" == socket_name(NAME)
        assert req.options.get_preferred_allocation_available is True
        assert req.options.pre_start_required is False
        assert _exists(os.path.join(kubelet.plugin_dir, req.endpoint))
        opts = await kubelet.client(NAME).options()
        assert opts.get_preferred_allocation_available and not opts.pre_start_required


async def test_list_and_watch_initial_list_with_numa_topology(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    h = sriov_nic_dual_socket(host_root, numvfs=4)
    async with agent(resources({"resourceName": NAME, "selector": VF})):
        await kubelet.wait_registered(NAME)
        devs = await kubelet.client(NAME).wait_for(lambda d: len(d) == 12)
        expected = {
            str(h.vf_address(pf, i)): numa
            for pf, numa in (("0000:3b:00.0", 0), ("0000:3b:00.1", 0), ("0000:86:00.0", 1))
            for i in range(4)
        }
        assert {k: [n.ID for n in d.topology.nodes] for k, d in devs.items()} == {
            k: [v] for k, v in expected.items()
        }
        assert {d.health for d in devs.values()} == {"Healthy"}


@pytest.mark.parametrize(
    ("name", "env"),
    [
        ("example.com/e810_vf", "PCI_RESOURCE_EXAMPLE_COM_E810_VF"),
        ("intel.com/e810-vf.v2", "PCI_RESOURCE_INTEL_COM_E810-VF_V2"),
        ("hostdev.io/NIC-vf", "PCI_RESOURCE_HOSTDEV_IO_NIC-VF"),
    ],
)
async def test_allocate_env_and_specs_follow_the_kubevirt_contract(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory, name: str, env: str
) -> None:
    h = sriov_nic_dual_socket(host_root, numvfs=2)
    a, b = str(h.vf_address("0000:3b:00.0", 1)), str(h.vf_address("0000:86:00.0", 0))
    async with agent(resources({"resourceName": name, "selector": VF})):
        await kubelet.wait_registered(name)
        client = kubelet.client(name)
        await client.wait_for(lambda d: len(d) == 6)
        resp = await client.allocate([a, b], [b])
        first, second = resp.container_responses
        assert dict(first.envs) == {env: f"{a},{b}"}
        assert _specs(first) == [
            ("/dev/vfio/vfio", "/dev/vfio/vfio", "mrw"),
            (f"/dev/vfio/{_group(h, a)}", f"/dev/vfio/{_group(h, a)}", "mrw"),
            (f"/dev/vfio/{_group(h, b)}", f"/dev/vfio/{_group(h, b)}", "mrw"),
        ]
        assert dict(second.envs) == {env: b}
        assert not first.mounts and not first.cdi_devices
        # No iommufd on this host: neither /dev/iommu nor cdevs.
        assert not any("iommu" in p or "devices" in p for p, _, _ in _specs(first))


async def test_iommufd_specs_only_for_nodes_that_exist(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    h = sriov_nic_dual_socket(host_root, numvfs=2, iommufd=True)
    a, b = str(h.vf_address("0000:3b:00.0", 0)), str(h.vf_address("0000:3b:00.0", 1))
    cdev_a = next((h.device_dir(a) / "vfio-dev").iterdir()).name
    cdev_b = next((h.device_dir(b) / "vfio-dev").iterdir()).name
    # The kernel creates /dev/vfio/devices/vfioN for each cdev; here only a's exists.
    (host_root / "dev/vfio/devices").mkdir()
    (host_root / "dev/vfio/devices" / cdev_a).write_text("")
    async with agent(resources({"resourceName": NAME, "selector": VF})):
        await kubelet.wait_registered(NAME)
        client = kubelet.client(NAME)
        await client.wait_for(lambda d: len(d) == 6)
        (resp,) = (await client.allocate([a, b])).container_responses
        paths = [p for p, _, _ in _specs(resp)]
        assert paths == [
            "/dev/vfio/vfio",
            f"/dev/vfio/{_group(h, a)}",
            f"/dev/vfio/{_group(h, b)}",
            "/dev/iommu",
            f"/dev/vfio/devices/{cdev_a}",
        ]
        assert f"/dev/vfio/devices/{cdev_b}" not in paths
        os.unlink(host_root / "dev/iommu")
        (resp,) = (await client.allocate([a])).container_responses
        assert [p for p, _, _ in _specs(resp)] == ["/dev/vfio/vfio", f"/dev/vfio/{_group(h, a)}"]


async def test_a_shared_iommu_group_is_one_allocatable_unit(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    gpu_with_audio(host_root)
    res = resources({"resourceName": "nvidia.com/a10", "selector": {"vendors": ["10de"]}})
    async with agent(res):
        await kubelet.wait_registered("nvidia.com/a10")
        client = kubelet.client("nvidia.com/a10")
        devs = await client.wait_for(lambda d: len(d) == 1)
        assert list(devs) == ["0000:17:00.0"]
        (resp,) = (await client.allocate(["0000:17:00.0"])).container_responses
        assert dict(resp.envs) == {"PCI_RESOURCE_NVIDIA_COM_A10": "0000:17:00.0,0000:17:00.1"}
        paths = [p for p, _, _ in _specs(resp)]
        assert len(paths) == 2 and paths[0] == "/dev/vfio/vfio"
        assert paths[1] == "/dev/vfio/" + os.path.basename(
            os.readlink(host_root / "sys/bus/pci/devices/0000:17:00.1/iommu_group")
        )


async def test_preferred_allocation_numa_and_pf_choices(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    h = sriov_nic_dual_socket(host_root, numvfs=4)
    vf = h.vf_address
    async with agent(resources({"resourceName": NAME, "selector": VF})):
        await kubelet.wait_registered(NAME)
        client = kubelet.client(NAME)
        devs = await client.wait_for(lambda d: len(d) == 12)
        avail = sorted(devs)
        # NUMA 0 has 8 free (two PFs): spread takes one VF from each of its PFs.
        got = await client.preferred(avail, [], 2)
        assert got == [str(vf("0000:3b:00.0", 0)), str(vf("0000:3b:00.1", 0))]
        # A must-include VF on NUMA 1 pulls the rest of the request to NUMA 1.
        must = str(vf("0000:86:00.0", 2))
        got = await client.preferred(avail, [must], 3)
        assert got[0] == must
        assert sorted(got[1:]) == [str(vf("0000:86:00.0", 0)), str(vf("0000:86:00.0", 1))]


async def test_preferred_allocation_pack_strategy(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    h = sriov_nic_dual_socket(host_root, numvfs=4)
    async with agent(resources({"resourceName": NAME, "selector": VF, "strategy": "pack"})):
        await kubelet.wait_registered(NAME)
        client = kubelet.client(NAME)
        avail = sorted(await client.wait_for(lambda d: len(d) == 12))
        got = await client.preferred(avail, [], 3)
        # NUMA 1 (4 free) is the tightest node that fits; one PF filled first.
        assert got == [str(h.vf_address("0000:86:00.0", i)) for i in range(3)]


async def test_unbound_from_vfio_turns_unhealthy_via_dev_vfio_inotify(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    h = sriov_nic_dual_socket(host_root, numvfs=2)
    a = str(h.vf_address("0000:3b:00.0", 1))
    async with agent(resources({"resourceName": NAME, "selector": VF})):
        await kubelet.wait_registered(NAME)
        client = kubelet.client(NAME)
        await client.wait_for(lambda d: len(d) == 6)
        h.bind(a, "iavf")  # the kernel removes /dev/vfio/<group> on unbind: inotify sees it
        await client.wait_for(lambda d: d[a].health == "Unhealthy")
        assert sum(v == "Healthy" for v in client.health().values()) == 5
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.allocate([a])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert a in (err.value.details() or "") and "iavf" in (err.value.details() or "")
        h.bind(a, "vfio-pci")
        await client.wait_for(lambda d: d[a].health == "Healthy")


async def test_driver_change_seen_through_an_injected_uevent(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    h = sriov_nic_dual_socket(host_root, numvfs=2)
    a = str(h.vf_address("0000:86:00.0", 0))
    async with agent(resources({"resourceName": NAME, "selector": VF})) as mgr:
        await kubelet.wait_registered(NAME)
        client = kubelet.client(NAME)
        await client.wait_for(lambda d: len(d) == 6)
        # Rewrite only the driver link (no /dev/vfio change): only the uevent can tell.
        link = h.device_dir(a) / "driver"
        link.unlink()
        link.symlink_to("../../../bus/pci/drivers/iavf")
        mgr.notify(PciEvent("unbind", PciAddress.parse(a)))
        await client.wait_for(lambda d: d[a].health == "Unhealthy")


async def test_allocate_rechecks_the_host_even_before_any_event(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    h = sriov_nic_dual_socket(host_root, numvfs=2)
    a = str(h.vf_address("0000:86:00.0", 1))
    async with agent(resources({"resourceName": NAME, "selector": VF})):
        await kubelet.wait_registered(NAME)
        client = kubelet.client(NAME)
        await client.wait_for(lambda d: len(d) == 6)
        link = h.device_dir(a) / "driver"
        link.unlink()  # no event at all: Allocate's own re-read must catch it
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.allocate([a])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"{a} is bound to no driver" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.allocate(["0000:99:00.0"])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_new_vf_appears_without_restart(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    h = sriov_nic_dual_socket(host_root, numvfs=2)
    res = resources({"resourceName": NAME, "selector": {"pfNames": ["ens1f0#0-3"]}})
    async with agent(res):
        await kubelet.wait_registered(NAME)
        client = kubelet.client(NAME)
        await client.wait_for(lambda d: len(d) == 2)
        h.set_numvfs("0000:3b:00.0", 6)  # VFs 2..5 appear; the selector wants 0..3
        devs = await client.wait_for(lambda d: len(d) == 4)
        assert sorted(devs) == [str(h.vf_address("0000:3b:00.0", i)) for i in range(4)]
        assert {d.health for d in devs.values()} == {"Healthy"}


async def test_device_in_use_stays_listed_unhealthy_others_are_dropped(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    h = sriov_nic_dual_socket(host_root, numvfs=2)
    used, free = str(h.vf_address("0000:3b:00.0", 1)), str(h.vf_address("0000:3b:00.1", 1))
    async with agent(resources({"resourceName": NAME, "selector": VF})):
        await kubelet.wait_registered(NAME)
        client = kubelet.client(NAME)
        await client.wait_for(lambda d: len(d) == 6)
        await client.allocate([used])
        h.set_numvfs("0000:3b:00.0", 1)
        h.set_numvfs("0000:3b:00.1", 1)
        devs = await client.wait_for(lambda d: free not in d and d[used].health == "Unhealthy")
        assert len(devs) == 5


async def test_kubelet_restart_re_registers(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    sriov_nic_dual_socket(host_root, numvfs=2)
    res = resources(
        {"resourceName": NAME, "selector": VF},
        {"resourceName": "example.com/pf", "selector": {"devices": ["1592"]}},
    )
    async with agent(res):
        await kubelet.wait_registered(NAME)
        await kubelet.wait_registered("example.com/pf")
        await kubelet.restart()  # wipes every socket, then serves kubelet.sock again
        await kubelet.wait_registered(NAME, count=2)
        await kubelet.wait_registered("example.com/pf", count=2)
        devs = await kubelet.client(NAME).wait_for(lambda d: len(d) == 6)
        assert {d.health for d in devs.values()} == {"Healthy"}
        assert len(await kubelet.client("example.com/pf").wait_for(lambda d: len(d) == 3)) == 3


async def test_deleted_plugin_socket_is_served_again(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    sriov_nic_dual_socket(host_root, numvfs=2)
    async with agent(resources({"resourceName": NAME, "selector": VF})):
        await kubelet.wait_registered(NAME)
        sock = os.path.join(kubelet.plugin_dir, socket_name(NAME))
        os.unlink(sock)
        await kubelet.wait_registered(NAME, count=2)
        assert _exists(sock)
        assert len(await kubelet.client(NAME).wait_for(lambda d: len(d) == 6)) == 6


async def test_a_socket_path_the_kubelet_holds_is_given_up_for_a_fresh_one(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The kubelet refuses our path as "already connected" (a stale endpoint it will keep until
    it restarts): the agent serves and registers on the next generation's path instead."""
    caplog.set_level("INFO", logger="hostdev.deviceplugin.manager")
    sriov_nic_dual_socket(host_root, numvfs=2)
    first, second = (os.path.join(kubelet.plugin_dir, socket_name(NAME, g)) for g in (1, 2))
    leftover = os.path.join(kubelet.plugin_dir, socket_name(NAME, 3))  # an earlier run's
    Path(leftover).touch()  # noqa: ASYNC240 - a test's set-up
    kubelet.held_endpoints.add(socket_name(NAME))
    async with agent(resources({"resourceName": NAME, "selector": VF})) as mgr:
        await kubelet.wait_registered(NAME)
        assert kubelet.registrations[0].request.endpoint == socket_name(NAME, 2)
        assert mgr.plugins[NAME].socket_path == second
        assert _exists(second) and not _exists(first) and not _exists(leftover)
        assert len(await kubelet.client(NAME).wait_for(lambda d: len(d) == 6)) == 6
        said = [r for r in caplog.records if "refuses to register" in r.getMessage()]
        assert [r.levelname for r in said] == ["WARNING"]
        assert NAME in said[0].getMessage()
        assert f"{first} again" in said[0].getMessage()
        assert f"serving on {second} instead" in said[0].getMessage()
        _, text = mgr.health()
        assert f"{NAME}: serving, registered as {socket_name(NAME, 2)}, 6 devices" in text
        # The new path is the plugin's socket now: deleting it makes the agent serve it again.
        os.unlink(second)
        await kubelet.wait_registered(NAME, count=2)
        assert kubelet.registrations[1].request.endpoint == socket_name(NAME, 2)
        assert len(await kubelet.client(NAME).wait_for(lambda d: len(d) == 6)) == 6
        assert _exists(second)
    assert not _exists(second)  # removed at shutdown
    # The next run starts from the plain name again.
    kubelet.held_endpoints.clear()
    async with agent(resources({"resourceName": NAME, "selector": VF})):
        await kubelet.wait_registered(NAME, count=3)
        assert kubelet.registrations[2].request.endpoint == socket_name(NAME)
        assert len(await kubelet.client(NAME).wait_for(lambda d: len(d) == 6)) == 6


async def test_agent_restart_advertises_saved_devices_before_scanning(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    h = sriov_nic_dual_socket(host_root, numvfs=2)
    res = resources({"resourceName": NAME, "selector": VF})
    used = str(h.vf_address("0000:3b:00.0", 0))
    async with agent(res):
        await kubelet.wait_registered(NAME)
        before = await kubelet.client(NAME).wait_for(lambda d: len(d) == 6)
        await kubelet.client(NAME).allocate([used])
    ids = sorted(before)
    # Second life: no scan yet; the host even looks empty. The kubelet must still get the list.
    os.rename(host_root / "sys", host_root / "sys.away")
    async with agent(res, scan=False) as mgr:
        await kubelet.wait_registered(NAME, count=2)
        devs = await kubelet.client(NAME).wait_for(lambda d: sorted(d) == ids)
        assert {d.health for d in devs.values()} == {"Healthy"}
        assert used in mgr.plugins[NAME].allocated
        os.rename(host_root / "sys.away", host_root / "sys")
        await mgr.rescan()
        assert sorted(await kubelet.client(NAME).wait_for(lambda d: sorted(d) == ids)) == ids


async def test_apply_changes_only_what_changed(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    sriov_nic_dual_socket(host_root, numvfs=2)
    vf = {"resourceName": NAME, "selector": VF}
    async with agent(resources(vf)) as mgr:
        await kubelet.wait_registered(NAME)
        server = mgr.plugins[NAME]
        await mgr.apply(
            resources(vf, {"resourceName": "example.com/pf", "selector": {"devices": ["1592"]}})
        )
        await kubelet.wait_registered("example.com/pf")
        narrowed = {"resourceName": NAME, "selector": {"pfNames": ["ens2f0"]}}
        await mgr.apply(resources(narrowed))
        assert mgr.plugins[NAME] is server  # same server, same registration
        assert sum(r.request.resource_name == NAME for r in kubelet.registrations) == 1
        assert not _exists(os.path.join(kubelet.plugin_dir, socket_name("example.com/pf")))
        assert len(await kubelet.client(NAME).wait_for(lambda d: len(d) == 2)) == 2


async def test_devices_freed_by_ended_pods_leave_the_list_once_gone(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    h = sriov_nic_dual_socket(host_root, numvfs=2)
    a, b = str(h.vf_address("0000:3b:00.0", 0)), str(h.vf_address("0000:3b:00.0", 1))
    held: list[PodDevices] = []
    async with agent(
        resources({"resourceName": NAME, "selector": VF}), in_use_source=lambda: held
    ) as mgr:
        await kubelet.wait_registered(NAME)
        client = kubelet.client(NAME)
        await client.wait_for(lambda d: len(d) == 6)
        await client.allocate([a, b])
        plugin = mgr.plugins[NAME]
        # The kubelet lists only b as held (a's pod ended); a was allocated moments ago, so the
        # grace period still keeps it ...
        held.append(PodDevices("ns", "virt-launcher-x", "compute", NAME, (b,)))
        await mgr.refresh_in_use()
        assert plugin.allocated == {a, b}
        # ... until the grace period is over.
        plugin.set_in_use([b], grace=0)
        assert plugin.allocated == {b}
        h.set_numvfs("0000:3b:00.0", 0)
        devs = await client.wait_for(lambda d: a not in d and b in d)
        assert devs[b].health == "Unhealthy"
        # A failing PodResources call changes nothing.
        mgr.in_use_source = lambda: (_ for _ in ()).throw(OSError("kubelet down"))
        await mgr.refresh_in_use()
        assert plugin.allocated == {b}


async def test_a_group_split_across_resources_is_unhealthy_in_both(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    gpu_with_audio(host_root)
    gpu = {"resourceName": "nvidia.com/a10", "selector": {"devices": ["2236"]}}
    audio = {"resourceName": "nvidia.com/a10-audio", "selector": {"devices": ["1aef"]}}
    async with agent(resources(gpu, audio)) as mgr:
        await kubelet.wait_registered("nvidia.com/a10")
        await kubelet.wait_registered("nvidia.com/a10-audio")
        for name, dev in (
            ("nvidia.com/a10", "0000:17:00.0"),
            ("nvidia.com/a10-audio", "0000:17:00.1"),
        ):
            devs = await kubelet.client(name).wait_for(lambda d, dev=dev: dev in d)
            assert devs[dev].health == "Unhealthy"
        reason = mgr.plugins["nvidia.com/a10"].devices["0000:17:00.0"].verdict.reason or ""
        assert "nvidia.com/a10-audio" in reason and "one VM" in reason
        await mgr.apply(resources(gpu))  # the audio function is nobody's now: GPU usable
        devs = await kubelet.client("nvidia.com/a10").wait_for(
            lambda d: d["0000:17:00.0"].health == "Healthy"
        )
        assert list(devs) == ["0000:17:00.0"]


# ---- multi-function units: one primary per kubelet device (KubeVirt attaches one per entry) ---
async def test_two_gpu_audio_units_list_both_gpus_first_in_request_order(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    two_gpus_with_audio(host_root)
    name = "nvidia.com/a10"
    async with agent(resources({"resourceName": name, "selector": {"vendors": ["10de"]}})):
        await kubelet.wait_registered(name)
        client = kubelet.client(name)
        assert sorted(await client.wait_for(lambda d: len(d) == 2)) == [
            "0000:17:00.0",
            "0000:65:00.0",
        ]
        # A VM with two gpus entries: KubeVirt takes the first two addresses, one per entry.
        (resp,) = (await client.allocate(["0000:65:00.0", "0000:17:00.0"])).container_responses
        assert dict(resp.envs) == {
            "PCI_RESOURCE_NVIDIA_COM_A10": "0000:65:00.0,0000:17:00.0,0000:65:00.1,0000:17:00.1"
        }
        groups = [p for p, _, _ in _specs(resp)][1:]
        assert groups == [f"/dev/vfio/{_group_of(host_root, a)}" for a in ("65", "17")]
        (one,) = (await client.allocate(["0000:17:00.0"])).container_responses
        assert dict(one.envs) == {"PCI_RESOURCE_NVIDIA_COM_A10": "0000:17:00.0,0000:17:00.1"}


@pytest.mark.parametrize(
    ("build", "selector", "unit", "listed"),
    [
        # A group of two GPUs behind a switch without ACS: one unit; the VM attaches 42:00.0,
        # 43:00.0 goes with the group but to no entry. The switch ports are bridges: unlisted.
        (gpus_behind_switch_without_acs, {"devices": ["20b5"]}, "0000:42:00.0", "0000:43:00.0"),
        # A selector that matched only the audio function: only it is listed (the GPU beside it
        # is no part of the resource), yet the whole group is handed over and had to be viable.
        (gpu_with_audio, {"classes": ["0403"]}, "0000:17:00.1", ""),
    ],
)
async def test_the_primary_is_the_lowest_function_the_selector_matched(
    host_root: Path,
    kubelet: KubeletSim,
    agent: AgentFactory,
    build: Callable[[Path], FakeHost],
    selector: dict[str, list[str]],
    unit: str,
    listed: str,
) -> None:
    build(host_root)
    name = "example.com/gpu-part"
    async with agent(resources({"resourceName": name, "selector": selector})):
        await kubelet.wait_registered(name)
        client = kubelet.client(name)
        assert list(await client.wait_for(lambda d: len(d) == 1)) == [unit]
        (resp,) = (await client.allocate([unit])).container_responses
        env = ",".join(a for a in (unit, listed) if a)
        assert dict(resp.envs) == {"PCI_RESOURCE_EXAMPLE_COM_GPU-PART": env}
        assert [p for p, _, _ in _specs(resp)] == [
            "/dev/vfio/vfio",
            f"/dev/vfio/{_group_of(host_root, unit[5:7])}",
        ]


# ---- Allocate re-checks the whole IOMMU group, as VFIO does -----------------------------------
def _rebind_quietly(h: FakeHost, addr: str, driver: str) -> None:
    """Only the driver link changes: no uevent, no /dev/vfio change (the GPU keeps the group's
    node alive), so only Allocate's own re-read can notice."""
    link = h.device_dir(addr) / "driver"
    link.unlink()
    link.symlink_to(f"../../../bus/pci/drivers/{driver}")


GPU_ONLY = "nvidia.com/a10"
GPU = "0000:17:00.0"


@asynccontextmanager
async def _gpu_only(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> AsyncIterator[tuple[FakeHost, PluginManager, PluginClient, str]]:
    """GPU + audio in one group, the GPU alone served (the audio function is a group member
    outside the resource), advertised Healthy: (host, agent, kubelet client, group)."""
    h = gpu_with_audio(host_root)
    async with agent(
        resources({"resourceName": GPU_ONLY, "selector": {"devices": ["2236"]}})
    ) as mgr:
        await kubelet.wait_registered(GPU_ONLY)
        client = kubelet.client(GPU_ONLY)
        await client.wait_for(lambda d: d.get(GPU) is not None and d[GPU].health == "Healthy")
        yield h, mgr, client, _group_of(host_root, "17")


async def test_allocate_refuses_a_gpu_whose_audio_companion_went_to_a_host_driver(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    name, gpu = GPU_ONLY, GPU
    async with _gpu_only(host_root, kubelet, agent) as (h, mgr, client, group):
        _rebind_quietly(h, "0000:17:00.1", "snd_hda_intel")
        reason = (
            f"IOMMU group {group} of {gpu} cannot be assigned: 0000:17:00.1 is bound to host "
            "driver snd_hda_intel; bind it to vfio-pci as well (VFIO assigns an IOMMU group "
            "whole: every function in it except bridges must be on vfio-pci, pci-stub or no "
            "driver)"
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.allocate([gpu])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details() == f"{name}: device {gpu} is not handed to a VM: {reason}"
        # The refusal made the agent re-read the group: the kubelet sees it Unhealthy, with the
        # very same sentence as the reason.
        await client.wait_for(lambda d: d[gpu].health == "Unhealthy")
        assert mgr.plugins[name].devices[gpu].verdict.reason == reason
        h.bind("0000:17:00.1", "vfio-pci")
        mgr.notify(PciEvent("bind", PciAddress.parse("0000:17:00.1")))
        await client.wait_for(lambda d: d[gpu].health == "Healthy")
        (resp,) = (await client.allocate([gpu])).container_responses
        assert dict(resp.envs) == {"PCI_RESOURCE_NVIDIA_COM_A10": gpu}


async def test_allocate_refuses_a_group_whose_members_changed_since_advertised(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    gpu = GPU
    async with _gpu_only(host_root, kubelet, agent) as (h, mgr, client, group):
        scans = mgr.scan_count
        # A function hot-added to the group, no event seen yet (on vfio-pci: VFIO would accept
        # the group, but it is not the group that was advertised).
        h.add_device(
            "0000:17:00.2", vendor="10de", device="1ada", class_code="0c0330", group=int(group)
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.allocate([gpu])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (
            f"IOMMU group {group} of {gpu} changed since it was advertised (members now "
            f"0000:17:00.0, 0000:17:00.1, 0000:17:00.2; were 0000:17:00.0, 0000:17:00.1)"
        ) in (err.value.details() or "")
        # The refusal triggered a re-read: the new group is judged (viable) and handed out.
        while mgr.scan_count == scans:
            await mgr.wait_scan()
        assert client.health()[gpu] == "Healthy"
        (resp,) = (await client.allocate([gpu])).container_responses
        assert dict(resp.envs) == {"PCI_RESOURCE_NVIDIA_COM_A10": gpu}
