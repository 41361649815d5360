"""The DRA front end over real gRPC on unix sockets, on a fake host: registration, prepare and
unprepare through DRA v1 and v1beta1, the health stream (v1, v1alpha1) following host events,
the slices it asks for, and resources moving between the two front ends."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from hostdev.deviceplugin.api.dra.v1 import api_pb2 as dra_v1
from hostdev.deviceplugin.api.dra.v1 import api_pb2_grpc as dra_v1_grpc
from hostdev.deviceplugin.api.dra.v1beta1 import api_pb2 as dra_v1beta1
from hostdev.deviceplugin.api.dra.v1beta1 import api_pb2_grpc as dra_v1beta1_grpc
from hostdev.deviceplugin.api.drahealth.v1 import api_pb2 as health_v1
from hostdev.deviceplugin.api.drahealth.v1 import api_pb2_grpc as health_v1_grpc
from hostdev.deviceplugin.api.drahealth.v1alpha1 import api_pb2 as health_v1alpha1
from hostdev.deviceplugin.api.drahealth.v1alpha1 import api_pb2_grpc as health_v1alpha1_grpc
from hostdev.deviceplugin.api.pluginregistration.v1 import api_pb2 as reg
from hostdev.deviceplugin.api.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from hostdev.deviceplugin.dra.frontend import DraFrontEnd, DraSettings
from hostdev.deviceplugin.events import PciEvent
from hostdev.deviceplugin.manager import PluginManager
from hostdev.deviceplugin.resources import ResourceConfig
from hostdev.host import PciAddress, Sysfs
from hostdev.policy.dra import DRIVER, SliceContent, device_name
from hostdev.policy.frontends import DRA
from hostdev.policy.selector import DeviceSelector
from hostdev.testing import scenarios
from hostdev.testing.fakesysfs import FakeHost
from tests.fixtures.kubeletsim import KubeletSim

GPU = "example.com/gpu"
VF = "example.com/vf"
POOL = "node-1"
GPU0 = device_name(PciAddress.parse("0000:17:00.0"))


class FakePublisher:
    """Stands in for the API writer: remembers the newest slices asked for."""

    def __init__(self) -> None:
        self.slices: tuple[SliceContent, ...] | None = None
        self.submits = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def submit(self, slices: tuple[SliceContent, ...]) -> None:
        self.slices = tuple(slices)
        self.submits += 1

    @property
    def last_error(self) -> None:
        return None

    def offered(self) -> set[str]:
        return {d.name for s in self.slices or () for d in s.devices}


def gpu_config(allocation: str = DRA) -> ResourceConfig:
    sel = DeviceSelector(vendors=frozenset({"10de"}), classes=frozenset({"0302", "0403"}))
    return ResourceConfig(GPU, sel, allocation=allocation)  # type: ignore[arg-type]


class Rig:
    def __init__(self, root: str, manager: PluginManager, fe: DraFrontEnd, pub: FakePublisher):
        self.root, self.manager, self.fe, self.pub = root, manager, fe, pub
        self.claims: dict[tuple[str, str], dict[str, Any]] = {}

    def channel(self, path: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"unix://{path}")

    def claim(self, uid: str, name: str, device: str = GPU0) -> dra_v1.Claim:
        self.claims[("vms", name)] = {
            "metadata": {"namespace": "vms", "name": name, "uid": uid},
            "status": {
                "allocation": {
                    "devices": {
                        "results": [
                            {"request": "gpu", "driver": DRIVER, "pool": POOL, "device": device}
                        ]
                    }
                }
            },
        }
        return dra_v1.Claim(namespace="vms", uid=uid, name=name)

    async def until(self, what: str, ok: Callable[[], bool], within: float = 20) -> None:
        """Wait (refresh by refresh) until ``ok()``."""
        try:
            async with asyncio.timeout(within):
                while not ok():
                    await self.fe.wait_refreshed(self.fe.generation)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for: {what}") from None


@pytest.fixture
async def rig(short_tmp: str, kubelet: KubeletSim) -> AsyncIterator[Callable[..., Any]]:
    @asynccontextmanager
    async def make(*configs: ResourceConfig, scenario: Callable[[Path], Any] | None = None):
        host = Path(short_tmp) / "host"
        (scenario or scenarios.gpu_with_audio)(host)
        manager = PluginManager(
            Sysfs(str(host)), kubelet.plugin_dir, os.path.join(short_tmp, "state"), uevents=False
        )
        pub = FakePublisher()
        holder: dict[str, Rig] = {}
        fe = DraFrontEnd(
            manager,
            DraSettings(
                node=POOL,
                state_dir=os.path.join(short_tmp, "state"),
                registry_dir=os.path.join(short_tmp, "reg"),
                plugins_dir=os.path.join(short_tmp, "plugins"),
                cdi_dir=os.path.join(short_tmp, "cdi"),
                health_interval=0.5,
            ),
            get_claim=lambda ns, name: holder["rig"].claims[(ns, name)],
            publisher=pub,  # type: ignore[arg-type]
        )
        await manager.start()
        await fe.start()
        r = Rig(short_tmp, manager, fe, pub)
        holder["rig"] = r
        try:
            await manager.apply(configs)
            await manager.rescan()
            await r.until("first refresh after the scan", lambda: pub.slices is not None)
            yield r
        finally:
            await fe.close()
            await manager.close()

    yield make


async def test_registration_info(rig: Callable[..., Any]) -> None:
    async with rig(gpu_config()) as r, r.channel(r.fe.registration_path) as ch:
        info = await reg_grpc.RegistrationStub(ch).GetInfo(reg.InfoRequest())
        assert info.type == "DRAPlugin"
        assert info.name == "pci.hostdev.io"
        assert info.endpoint == r.fe.socket_path == f"{r.root}/plugins/pci.hostdev.io/dra.sock"
        assert list(info.supported_versions) == [
            "v1.DRAPlugin",
            "v1beta1.DRAPlugin",
            "v1.DRAResourceHealth",
            "v1alpha1.DRAResourceHealth",
        ]
        assert os.path.basename(r.fe.registration_path) == "pci.hostdev.io-reg.sock"
        await reg_grpc.RegistrationStub(ch).NotifyRegistrationStatus(
            reg.RegistrationStatus(plugin_registered=True)
        )
        assert r.fe.registered


async def test_the_unit_is_offered_and_prepared_through_v1_and_v1beta1(
    rig: Callable[..., Any],
) -> None:
    async with rig(gpu_config()) as r, r.channel(r.fe.socket_path) as ch:
        assert r.pub.offered() == {GPU0}
        (s,) = r.pub.slices
        (dev,) = s.devices
        assert dev.attributes["resourceName"] == {"string": GPU}
        assert dev.attributes["functions"] == {"int": 2}

        v1 = dra_v1_grpc.DRAPluginStub(ch)
        resp = await v1.NodePrepareResources(
            dra_v1.NodePrepareResourcesRequest(claims=[r.claim("uid-1", "a")])
        )
        out = resp.claims["uid-1"]
        assert out.error == ""
        (d,) = out.devices
        assert (list(d.request_names), d.pool_name, d.device_name) == (["gpu"], POOL, GPU0)
        assert list(d.cdi_device_ids) == [
            f"pci.hostdev.io/vfio=uid-1-{GPU0}",
            "pci.hostdev.io/metadata=uid-1_gpu",
        ]
        un = await v1.NodeUnprepareResources(
            dra_v1.NodeUnprepareResourcesRequest(claims=[r.claim("uid-1", "a")])
        )
        assert un.claims["uid-1"].error == ""

        beta = dra_v1beta1_grpc.DRAPluginStub(ch)
        claim = r.claim("uid-2", "b")
        resp2 = await beta.NodePrepareResources(
            dra_v1beta1.NodePrepareResourcesRequest(
                claims=[dra_v1beta1.Claim(namespace="vms", uid="uid-2", name=claim.name)]
            )
        )
        assert resp2.claims["uid-2"].devices[0].device_name == GPU0
        un2 = await beta.NodeUnprepareResources(
            dra_v1beta1.NodeUnprepareResourcesRequest(
                claims=[dra_v1beta1.Claim(namespace="vms", uid="uid-2", name="b")]
            )
        )
        assert un2.claims["uid-2"].error == ""
        assert os.listdir(os.path.join(r.root, "cdi")) == []


async def test_a_claim_for_a_unit_that_left_vfio_is_refused(rig: Callable[..., Any]) -> None:
    async with rig(gpu_config()) as r, r.channel(r.fe.socket_path) as ch:
        host = scenarios_host(r)
        host.bind("0000:17:00.1", "snd_hda_intel")  # not rescanned yet: still offered
        resp = await dra_v1_grpc.DRAPluginStub(ch).NodePrepareResources(
            dra_v1.NodePrepareResourcesRequest(claims=[r.claim("uid-1", "a")])
        )
        err = resp.claims["uid-1"].error
        assert "0000:17:00.1 is bound to snd_hda_intel, not vfio-pci" in err
        assert not list(resp.claims["uid-1"].devices)
        assert not Path(r.root, "cdi").exists()  # noqa: ASYNC240 - a stat, in a test


def scenarios_host(r: Rig) -> FakeHost:
    return FakeHost(Path(r.root) / "host")


@pytest.mark.parametrize(
    ("stub", "mod"), [(health_v1_grpc, health_v1), (health_v1alpha1_grpc, health_v1alpha1)]
)
async def test_health_stream_follows_a_unit_leaving_vfio(
    rig: Callable[..., Any], stub: Any, mod: Any
) -> None:
    async with rig(gpu_config()) as r, r.channel(r.fe.socket_path) as ch:
        stream = stub.DRAResourceHealthStub(ch).NodeWatchResources(mod.NodeWatchResourcesRequest())
        first = await stream.read()
        assert [(d.device.pool_name, d.device.device_name, d.health) for d in first.devices] == [
            (POOL, GPU0, mod.HEALTHY)
        ]
        scenarios_host(r).bind("0000:17:00.1", "snd_hda_intel")
        r.manager.notify(PciEvent("bind", PciAddress.parse("0000:17:00.1")))
        while True:
            msg = await asyncio.wait_for(stream.read(), 20)
            if msg.devices[0].health == mod.UNHEALTHY:
                break
        assert "0000:17:00.1 is bound to snd_hda_intel" in msg.devices[0].message
        assert msg.devices[0].last_updated_time > 0
        await r.until("withdrawn from the slice", lambda: r.pub.offered() == set())
        # Periodic resends keep the kubelet from timing the status out to Unknown.
        again = await asyncio.wait_for(stream.read(), 5)
        assert again.devices[0].health == mod.UNHEALTHY
        stream.cancel()


async def test_health_changes_carry_only_the_changed_devices_and_resends_carry_all(
    rig: Callable[..., Any],
) -> None:
    gpu1 = device_name(PciAddress.parse("0000:65:00.0"))
    async with (
        rig(gpu_config(), scenario=scenarios.two_gpus_with_audio) as r,
        r.channel(r.fe.socket_path) as ch,
    ):
        stream = health_v1_grpc.DRAResourceHealthStub(ch).NodeWatchResources(
            health_v1.NodeWatchResourcesRequest()
        )

        def rows(msg: Any) -> dict[str, int]:
            return {d.device.device_name: d.health for d in msg.devices}

        first = await stream.read()
        assert rows(first) == {GPU0: health_v1.HEALTHY, gpu1: health_v1.HEALTHY}
        scenarios_host(r).bind("0000:65:00.1", "snd_hda_intel")
        r.manager.notify(PciEvent("bind", PciAddress.parse("0000:65:00.1")))
        # Periodic full resends may come first; the change itself names gpu1 alone.
        while len(rows(msg := await asyncio.wait_for(stream.read(), 20))) == 2:
            assert rows(msg)[gpu1] == health_v1.HEALTHY
        assert rows(msg) == {gpu1: health_v1.UNHEALTHY}
        assert "0000:65:00.1 is bound to snd_hda_intel" in msg.devices[0].message
        # The next resend (health_interval 0.5 s) tells the kubelet about both again.
        again = await asyncio.wait_for(stream.read(), 5)
        assert rows(again) == {GPU0: health_v1.HEALTHY, gpu1: health_v1.UNHEALTHY}
        stream.cancel()


async def test_moving_a_resource_between_front_ends_never_hands_a_unit_out_twice(
    rig: Callable[..., Any], kubelet: KubeletSim
) -> None:
    async with rig(gpu_config("DevicePlugin")) as r:
        await kubelet.wait_registered(GPU)
        # A pod holds the unit through the device plugin.
        await kubelet.client(GPU).allocate(["0000:17:00.0"])
        await r.manager.apply([gpu_config(DRA)])
        assert GPU not in r.manager.plugins and GPU in r.manager.dra_units
        await r.until("switch seen", lambda: r.pub.offered() == set() and GPU0 in r.fe.offers)
        assert r.fe.offers[GPU0].blocked == "a pod holds it through the device plugin"
        # The pod ends (PodResources says so after the grace): the unit is offered.
        r.manager.units[GPU].set_in_use([], grace=0)
        r.manager.units[GPU].update(r.manager.view.inventory)
        r.fe.refresh()
        assert r.pub.offered() == {GPU0}
        async with r.channel(r.fe.socket_path) as ch:
            resp = await dra_v1_grpc.DRAPluginStub(ch).NodePrepareResources(
                dra_v1.NodePrepareResourcesRequest(claims=[r.claim("uid-1", "a")])
            )
            assert resp.claims["uid-1"].error == ""
        # Back to the device plugin while the claim is prepared: that unit is Unhealthy there.
        await r.manager.apply([gpu_config("DevicePlugin")])
        await kubelet.wait_registered(GPU, count=2)
        devs = await kubelet.client(GPU).wait_for(
            lambda d: "0000:17:00.0" in d and d["0000:17:00.0"].health == "Unhealthy"
        )
        assert devs["0000:17:00.0"].health == "Unhealthy"
        reason = r.manager.plugins[GPU].devices["0000:17:00.0"].verdict.reason or ""
        assert "held by DRA claim vms/a" in reason
