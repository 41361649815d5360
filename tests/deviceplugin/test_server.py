"""The device-plugin servers over real gRPC on unix sockets, against the kubelet simulator."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from hostdev.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as pb
from hostdev.deviceplugin.events import PciEvent
from hostdev.host import PciAddress
from hostdev.policy.naming import socket_name
from hostdev.policy.nodestatus import PodDevices
from hostdev.testing.fakesysfs import FakeHost
from hostdev.testing.scenarios import gpu_with_audio, sriov_nic_dual_socket
from tests.deviceplugin.conftest import AgentFactory, resources
from tests.fixtures.kubeletsim import KubeletSim

VF = {"vendors": ["8086"], "devices": ["1889"]}
NAME = "example.com/e810_vf"


def _specs(resp: pb.ContainerAllocateResponse) -> list[tuple[str, str, str]]:
    return [(d.container_path, d.host_path, d.permissions) for d in resp.devices]


def _exists(path: str) -> bool:
    return os.path.exists(path)


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
