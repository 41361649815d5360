"""Mediated-device instances through the DRA front end, on a fake mdev kernel: one DRA device
per agent-owned instance in the slices (withdrawn when unhealthy), NodePrepareResources over
real gRPC re-reading the instance and writing the CDI spec (``/dev/vfio/vfio``, the instance's
group node, ``MDEV_PCI_RESOURCE_<NAME>``) and the KEP-5304 metadata that upstream's decoder and
KubeVirt v1.9.0's own DRA builders read the mdev UUID from."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from hostdev.deviceplugin.api.dra.v1 import api_pb2 as dra_v1
from hostdev.deviceplugin.api.dra.v1 import api_pb2_grpc as dra_v1_grpc
from hostdev.deviceplugin.dra.frontend import DraFrontEnd, DraSettings
from hostdev.deviceplugin.manager import PluginManager
from hostdev.deviceplugin.resources import ResourceConfig
from hostdev.host import Sysfs
from hostdev.host.mdev import MdevInstance, MdevParent, MdevType, discover_mdev
from hostdev.policy.allocation import AllocUnit
from hostdev.policy.dra import (
    DRIVER,
    ClaimError,
    PreparedUnit,
    claim_devices,
    mdev_attributes,
    mdev_device_name,
    mdev_uuid_of,
    qualified,
    valid_dns_label,
    vfio_cdi_spec,
)
from hostdev.policy.frontends import DRA
from hostdev.policy.mdev import MdevSpec
from hostdev.policy.selector import DeviceSelector
from hostdev.testing.fakemdev import FakeMdev, FakeType
from hostdev.testing.fakesysfs import FakeHost
from tests.dra.test_e2e_real_parts import _in_container
from tests.dra.test_frontend import POOL, FakePublisher, Rig
from tests.fixtures.draharness import DRAHarness
from tests.fixtures.kubeletsim import KubeletSim
from tests.fixtures.kubevirt import KubeVirtLauncher

NAME = "example.com/mtty"
ENV = "MDEV_PCI_RESOURCE_EXAMPLE_COM_MTTY"
U1 = "5c8a6f2e-1b3d-4e5f-8a9b-0c1d2e3f4a5b"


# ---- pure ---------------------------------------------------------------------------------
def test_device_name_is_a_stable_dns_label_and_maps_back() -> None:
    name = mdev_device_name(U1.upper())
    assert name == f"mdev-{U1}" and valid_dns_label(name)
    assert mdev_uuid_of(name) == U1
    assert mdev_uuid_of("mdev-not-a-uuid") is None
    assert mdev_uuid_of("pci-0000-17-00-0") is None


def test_attributes_carry_mdev_uuid_and_no_pci_bus_id() -> None:
    parent = MdevParent(
        "0000:3b:00.0",
        None,
        1,
        (MdevType("nvidia-35", "GRID M60-2Q", None, "vfio-pci", 3),),
    )
    inst = MdevInstance(U1, "nvidia-35", "0000:3b:00.0", 7, True, "nvidia-vgpu-vfio")
    attrs = mdev_attributes(U1, NAME, inst, parent)
    assert attrs == {
        "resourceName": {"string": NAME},
        "mdevUUID": {"string": U1},
        "mdevType": {"string": "nvidia-35"},
        "mdevTypeName": {"string": "GRID M60-2Q"},
        "mdevParent": {"string": "0000:3b:00.0"},
        "iommuGroup": {"int": 7},
        "resource.kubernetes.io/numaNode": {"int": 1},
    }
    # In the metadata file KubeVirt reads the key unqualified; the qualified one stays too.
    q = qualified(attrs)
    assert q["mdevUUID"] == q[f"{DRIVER}/mdevUUID"] == {"string": U1}
    assert "resource.kubernetes.io/pciBusID" not in q


def test_claims_take_mdev_device_names_and_refuse_strangers() -> None:
    def claim(dev: str) -> dict[str, Any]:
        return {
            "metadata": {"namespace": "vms", "name": "c", "uid": "u"},
            "status": {
                "allocation": {
                    "devices": {
                        "results": [{"request": "r", "driver": DRIVER, "pool": POOL, "device": dev}]
                    }
                }
            },
        }

    _, (cd,) = claim_devices(claim(f"mdev-{U1}"), uid="u", pool=POOL)
    assert (cd.address, cd.mdev_uuid) == (None, U1)
    with pytest.raises(ClaimError, match=r"is not a pci\.hostdev\.io device name"):
        claim_devices(claim("mdev-xyz"), uid="u", pool=POOL)


def test_cdi_spec_of_mdev_units() -> None:
    u2 = "0f0e0d0c-0b0a-4909-8807-060504030201"
    units = [
        PreparedUnit(mdev_device_name(u), NAME, AllocUnit(u, (), g, None, None), mdev=True)
        for u, g in ((U1, 11), (u2, 12))
    ]
    spec, ids = vfio_cdi_spec("uid-1", units, iommufd=False)
    assert spec["containerEdits"] == {
        "env": [f"{ENV}={U1},{u2}"],
        "deviceNodes": [{"path": "/dev/vfio/vfio", "permissions": "rwm"}],
    }
    assert [d["containerEdits"]["deviceNodes"][0]["path"] for d in spec["devices"]] == [
        "/dev/vfio/11",
        "/dev/vfio/12",
    ]
    assert ids[f"mdev-{U1}"] == f"{DRIVER}/vfio=uid-1-mdev-{U1}"


# ---- the front end on a fake mdev kernel ------------------------------------------------
def mdev_config(count: int = 2) -> ResourceConfig:
    return ResourceConfig(NAME, DeviceSelector(), allocation=DRA, mdev=MdevSpec("mtty-2", count))


@pytest.fixture
async def mrig(short_tmp: str, kubelet: KubeletSim) -> AsyncIterator[Callable[..., Any]]:
    @asynccontextmanager
    async def make(config: ResourceConfig) -> AsyncIterator[tuple[Rig, FakeMdev]]:
        host = Path(short_tmp) / "host"
        m = FakeMdev(FakeHost(host))
        m.add_parent("mtty", [FakeType("mtty-1"), FakeType("mtty-2", cost=2)], 8)
        state = os.path.join(short_tmp, "state")
        manager = PluginManager(
            Sysfs(str(host)), kubelet.plugin_dir, state, uevents=False, mdev_write=m.write
        )
        pub = FakePublisher()
        holder: dict[str, Rig] = {}
        fe = DraFrontEnd(
            manager,
            DraSettings(
                node=POOL,
                state_dir=state,
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
            await manager.apply([config])
            await manager.rescan()
            await r.until("first refresh after the scan", lambda: pub.slices is not None)
            yield r, m
        finally:
            await fe.close()
            await manager.close()

    yield make


def _metadata_spec(cdi_dir: Path, claim_uid: str) -> Path:
    [spec] = cdi_dir.glob(f"{DRIVER}_metadata_{claim_uid}_*.json")
    return spec


def _owned(r: Rig) -> list[str]:
    return r.manager.mdev.of(NAME)


@pytest.mark.dra
@pytest.mark.kubevirt
async def test_instances_are_offered_prepared_and_read_by_kubevirt(
    mrig: Callable[..., Any], dra_harness: DRAHarness, kubevirt_launcher: KubeVirtLauncher
) -> None:
    async with mrig(mdev_config(2)) as (r, _m):
        owned = _owned(r)
        assert len(owned) == 2
        await r.until("both offered", lambda: len(r.pub.offered()) == 2)
        assert r.pub.offered() == {f"mdev-{u}" for u in owned}
        inv = discover_mdev(os.path.join(r.root, "host"))
        uuid = owned[0]
        name = f"mdev-{uuid}"
        group = inv.instances[uuid].iommu_group
        [dev] = [d for s in r.pub.slices for d in s.devices if d.name == name]
        assert dev.attributes["mdevUUID"] == {"string": uuid}
        assert dev.attributes["resourceName"] == {"string": NAME}
        assert dev.attributes["mdevType"] == {"string": "mtty-2"}
        assert dev.attributes["mdevParent"] == {"string": "mtty"}
        assert dev.attributes["iommuGroup"] == {"int": group}
        assert "resource.kubernetes.io/pciBusID" not in dev.attributes

        async with r.channel(r.fe.socket_path) as ch:
            stub = dra_v1_grpc.DRAPluginStub(ch)
            req = dra_v1.NodePrepareResourcesRequest(claims=[r.claim("uid-1", "a", name)])
            out = (await stub.NodePrepareResources(req)).claims["uid-1"]
            assert out.error == ""
            (d,) = out.devices
            assert (list(d.request_names), d.pool_name, d.device_name) == (["gpu"], POOL, name)
            ids = list(d.cdi_device_ids)
            assert ids == [f"{DRIVER}/vfio=uid-1-{name}", f"{DRIVER}/metadata=uid-1_gpu"]
            # Idempotent: the same answer again, from the checkpoint.
            again = (await stub.NodePrepareResources(req)).claims["uid-1"]
            assert list(again.devices) == list(out.devices)
            # The instance a claim holds is never removed: none wanted is refused as a whole,
            # one wanted removes the other.
            await r.manager.apply([mdev_config(0)])
            assert len(_owned(r)) == 2
            assert "is held by DRA claim vms/a" in r.manager.mdev.last.refusals[NAME]
            await r.manager.apply([mdev_config(1)])
            assert _owned(r) == [uuid]

            cdi_dir = Path(r.root, "cdi")
            cdi = dra_harness.cdi([cdi_dir], ids)  # the CDI project's library
            assert cdi["specErrors"] == {} and cdi["unresolved"] == []
            merged = cdi["merged"]
            assert {n["path"] for n in merged["deviceNodes"]} == {
                "/dev/vfio/vfio",
                f"/dev/vfio/{group}",
            }
            assert merged["env"] == [f"{ENV}={uuid}"]

            base = Path(r.root, "in-container")
            _in_container(_metadata_spec(cdi_dir, "uid-1"), base)
            decoded = dra_harness.metadata(base=base, claim="a", request="gpu")
            assert decoded["devices"][0]["name"] == name
            assert decoded["devices"][0]["pciBusID"] == ""
            vmi = {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstance",
                "metadata": {"name": "vm1", "namespace": "vms"},
                "spec": {
                    "domain": {
                        "devices": {
                            "hostDevices": [{"name": "tty", "claimName": "a", "requestName": "gpu"}]
                        }
                    },
                    "resourceClaims": [{"name": "a", "resourceClaimName": "a"}],
                },
            }
            kv = kubevirt_launcher.run(vmi, dra_metadata_dir=base)
            assert kv["error"] is None, kv["error"]
            assert [(h["type"], h["mdevUUID"]) for h in kv["hostDevices"]] == [("mdev", uuid)]

            seen = r.fe.generation
            un = await stub.NodeUnprepareResources(
                dra_v1.NodeUnprepareResourcesRequest(claims=[r.claim("uid-1", "a", name)])
            )
            assert un.claims["uid-1"].error == ""
            assert os.listdir(cdi_dir) == []
        await r.fe.wait_refreshed(seen)  # the claim's instance is no longer held
        await r.manager.apply([mdev_config(0)])
        assert _owned(r) == []  # no longer held: the unwanted instance goes


async def test_an_unhealthy_instance_is_withdrawn_and_refused(mrig: Callable[..., Any]) -> None:
    async with mrig(mdev_config(2)) as (r, _m):
        await r.until("both offered", lambda: len(r.pub.offered()) == 2)
        uuid = _owned(r)[0]
        name = f"mdev-{uuid}"
        group = discover_mdev(os.path.join(r.root, "host")).instances[uuid].iommu_group
        os.unlink(os.path.join(r.root, "host/dev/vfio", str(group)))
        async with r.channel(r.fe.socket_path) as ch:
            req = dra_v1.NodePrepareResourcesRequest(claims=[r.claim("uid-1", "a", name)])
            out = (await dra_v1_grpc.DRAPluginStub(ch).NodePrepareResources(req)).claims["uid-1"]
        assert f"/dev/vfio/{group} is missing" in out.error
        assert not list(out.devices)
        assert not Path(r.root, "cdi").exists()  # noqa: ASYNC240 - a stat, in a test
        await r.manager.rescan()
        await r.until("withdrawn", lambda: r.pub.offered() == {f"mdev-{_owned(r)[1]}"})
        assert (name, False) in {(n, h) for n, h, _ in r.fe.health_rows or ()}
