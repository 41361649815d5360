"""Mediated-device resources: the node agent creates its instances on a fake mdev kernel and
serves them over real gRPC to the kubelet simulator."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from hostdev.deviceplugin.persist import mdev_owned_path
from hostdev.host.mdev import discover_mdev
from hostdev.testing.fakemdev import FakeMdev, FakeType
from hostdev.testing.fakesysfs import FakeHost
from tests.deviceplugin.conftest import AgentFactory, resources
from tests.fixtures.kubeletsim import KubeletSim
from tests.fixtures.kubevirt import KubeVirtLauncher, vmi

NAME = "example.com/mtty"
MTTY = [FakeType("mtty-1"), FakeType("mtty-2", cost=2)]
OTHER = "99999999-9999-4999-8999-999999999999"


def _mtty(root: Path, capacity: int = 8) -> FakeMdev:
    m = FakeMdev(FakeHost(root))
    m.add_parent("mtty", MTTY, capacity)
    return m


def _entry(count: int, type_: str = "mtty-2") -> dict[str, object]:
    return {"resourceName": NAME, "mdev": {"type": type_, "count": count}}


def _owned(state_dir: str) -> dict[str, str]:
    with open(mdev_owned_path(state_dir)) as f:
        owned: dict[str, str] = json.load(f)["owned"]
    return owned


async def test_creates_advertises_allocates_and_removes(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory, state_dir: str
) -> None:
    m = _mtty(host_root)
    m.add_instance("mtty", "mtty-1", OTHER)  # someone else's: never touched
    async with agent(resources(_entry(3)), mdev_write=m.write) as mgr:
        await kubelet.wait_registered(NAME)
        devs = await kubelet.client(NAME).wait_for(lambda d: len(d) == 3)
        inv = discover_mdev(str(host_root))
        ours = sorted(_owned(state_dir))
        assert sorted(devs) == ours and OTHER not in ours
        assert all(d.health == "Healthy" for d in devs.values())
        assert {inv.instances[u].type_id for u in ours} == {"mtty-2"}
        a, b = ours[1], ours[0]
        resp = (await kubelet.client(NAME).allocate([a, b])).container_responses[0]
        assert dict(resp.envs) == {"MDEV_PCI_RESOURCE_EXAMPLE_COM_MTTY": f"{a},{b}"}
        groups = [inv.instances[u].iommu_group for u in (a, b)]
        assert [d.host_path for d in resp.devices] == [
            "/dev/vfio/vfio",
            *(f"/dev/vfio/{g}" for g in groups),
        ]
        assert {d.permissions for d in resp.devices} == {"mrw"}
        # fewer wanted: a free instance goes, the allocated two stay
        await mgr.apply(resources(_entry(2)))
        assert sorted(_owned(state_dir)) == sorted([a, b])
        # none wanted: the two a pod holds stay (kept, with the reason)
        await mgr.apply(())
        assert sorted(_owned(state_dir)) == sorted([a, b])
        assert "allocated to a pod" in mgr.mdev.last.kept[a]
        assert OTHER in discover_mdev(str(host_root)).instances


async def test_refusals_leave_everything_as_it_was(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory, state_dir: str
) -> None:
    m = _mtty(host_root, capacity=4)
    async with agent(resources(_entry(3)), mdev_write=m.write) as mgr:
        assert mgr.mdev.last.refusals == {
            NAME: "mdev type mtty-2 exhausted: 3 more instances wanted, the parents have 2 left "
            "(mtty: 2)"
        }
        assert discover_mdev(str(host_root)).instances == {}
        await mgr.apply(resources(_entry(1, "mtty-9")))
        assert "unknown mdev type 'mtty-9' on parents mtty" in mgr.mdev.last.refusals[NAME]
        assert discover_mdev(str(host_root)).instances == {}


async def test_kernel_refusal_mid_way_rolls_back(
    host_root: Path,
    kubelet: KubeletSim,
    agent: AgentFactory,
    state_dir: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The kernel says ENOSPC although available_instances promised room (another writer took
    it meanwhile): the instances made in this pass are removed again."""
    m = _mtty(host_root, capacity=8)
    calls = []

    def racing_write(path: str, value: str) -> None:
        calls.append(path)
        if path.endswith("create") and len(calls) == 2:
            m.add_instance("mtty", "mtty-2", OTHER)  # a racing writer takes the rest
            m.add_instance("mtty", "mtty-2", "88888888-8888-4888-8888-888888888888")
            m.add_instance("mtty", "mtty-2", "77777777-7777-4777-8777-777777777777")
        m.write(path, value)

    async with agent(resources(_entry(3)), mdev_write=racing_write) as mgr:
        assert (
            f"{NAME}: mdev type mtty-2 on mtty exhausted (the kernel refused another instance); "
            "the 1 created in this pass were removed again" in caplog.messages
        )
        # the next pass (the first scan) sees what is left and refuses without writing
        assert "the parents have 1 left" in mgr.mdev.last.refusals[NAME]
        assert _owned(state_dir) == {}
        assert len(discover_mdev(str(host_root)).instances) == 3  # only the other writer's


async def test_parent_gone_turns_allocated_instances_unhealthy_and_refuses_allocate(
    host_root: Path, kubelet: KubeletSim, agent: AgentFactory
) -> None:
    m = _mtty(host_root)
    async with agent(resources(_entry(2)), mdev_write=m.write) as mgr:
        await kubelet.wait_registered(NAME)
        client = kubelet.client(NAME)
        devs = await client.wait_for(lambda d: len(d) == 2)
        held, free = sorted(devs)
        await client.allocate([held])
        m.remove_parent("mtty")
        await mgr.rescan()
        devs = await client.wait_for(lambda d: list(d) == [held])
        assert devs[held].health == "Unhealthy"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.allocate([held])
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"mdev instance {held} is not handed to a VM" in str(e.value.details())
        m.add_parent("mtty", MTTY, 8)  # back (driver reloaded): the agent makes new ones
        await mgr.rescan()
        devs = await client.wait_for(lambda d: sum(x.health == "Healthy" for x in d.values()) == 2)
        assert free not in devs


@pytest.mark.kubevirt
async def test_kubevirt_launcher_accepts_the_allocate_env(
    host_root: Path,
    kubelet: KubeletSim,
    agent: AgentFactory,
    kubevirt_launcher: KubeVirtLauncher,
) -> None:
    """The env the agent's Allocate returns for three instances, read by KubeVirt v1.9.0's own
    virt-launcher code: one UUID per VM entry, in the order of the device IDs, gpus and
    hostDevices each from the front of the list."""
    m = _mtty(host_root, capacity=8)
    async with agent(resources(_entry(3, "mtty-1")), mdev_write=m.write):
        await kubelet.wait_registered(NAME)
        client = kubelet.client(NAME)
        devs = await client.wait_for(lambda d: len(d) == 3)
        order = sorted(devs, reverse=True)
        (resp,) = (await client.allocate(order)).container_responses
        env = dict(resp.envs)
        gpus = [{"name": f"g{i}", "deviceName": NAME} for i in range(2)]
        hostdevs = [{"name": f"h{i}", "deviceName": NAME} for i in range(3)]
        out = kubevirt_launcher.run(vmi(gpus=gpus, host_devices=hostdevs), env)
        assert out["error"] is None, out
        assert [(d["type"], d["mdevUUID"]) for d in out["gpus"]] == [("mdev", u) for u in order[:2]]
        assert [d["display"] for d in out["gpus"]] == ["on", ""]  # the first GPU's display
        assert [d["mdevUUID"] for d in out["hostDevices"]] == order
        # one instance fewer than entries: KubeVirt refuses (the agent never hands out fewer)
        (short,) = (await client.allocate(order[:2])).container_responses
        out = kubevirt_launcher.run(vmi(host_devices=hostdevs), dict(short.envs))
        assert out["error"] is not None and "do not match" in out["error"]["message"]
