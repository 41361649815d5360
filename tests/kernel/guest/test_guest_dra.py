"""Runs INSIDE the backports QEMU guest: the node agent's DRA front end prepares a claim for an
igb VF that is really on vfio-pci (issue 12).

The front end is the agent's own (real gRPC on its unix socket, as the kubelet calls it); only
the claim comes from a stub reader at the edge, as in tests/dra (no API server in the guest).
What the real kernel adds: the CDI spec's device nodes exist and open, the re-check reads the
VF's real driver and group, and a VF that left vfio-pci is refused with nothing written.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("RK_GUEST") != "1":  # pragma: no cover - guarded twice (conftest too)
    pytest.skip(
        "guest-only tests: run through tests/kernel/test_real_kernel.py", allow_module_level=True
    )

import grpc
from guestlib import SYS, apply, driver
from test_guest_nic import RESOURCE, igb_pf, spec, vfs_of

from hostdev.deviceplugin.api.dra.v1 import api_pb2 as dra
from hostdev.deviceplugin.api.dra.v1 import api_pb2_grpc as dra_grpc
from hostdev.deviceplugin.dra.frontend import DraFrontEnd, DraSettings
from hostdev.deviceplugin.manager import PluginManager
from hostdev.deviceplugin.resources import ResourceConfig
from hostdev.policy.dra import DRIVER, device_name
from hostdev.policy.frontends import DRA
from hostdev.policy.selector import DeviceSelector

pytestmark = pytest.mark.igb
POOL = "guest-node"


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "state"
    yield d
    assert apply(spec(igb_pf(), 0), d).exit_code == 0, "cleanup did not converge"
    assert igb_pf().sriov_numvfs == 0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay under 108 bytes: not under pytest's tmp_path."""
    d = Path(tempfile.mkdtemp(prefix="dra-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def allocation(uid: str, name: str, device: str) -> dict[str, Any]:
    """A claim as the scheduler's allocator leaves it (what the agent reads from the API)."""
    result = {"request": "nic", "driver": DRIVER, "pool": POOL, "device": device}
    return {
        "metadata": {
            "namespace": "vms",
            "name": name,
            "uid": uid,
            "annotations": {"resource.kubernetes.io/pod-claim-name": "nics"},
        },
        "status": {"allocation": {"devices": {"results": [result]}}},
    }


def files_under(*roots: Path) -> list[str]:
    return sorted(str(Path(d, n)) for r in roots for d, _, ns in os.walk(r) for n in ns)


async def test_dra_prepares_a_vf_really_on_vfio_pci(state: Path, short_dir: Path) -> None:
    pf = igb_pf()
    assert apply(spec(pf, 1, "0"), state).exit_code == 0
    (vf,) = vfs_of(pf)
    assert vf.driver == "vfio-pci" and vf.iommu_group is not None
    name = device_name(vf.address)
    claims: dict[tuple[str, str], dict[str, Any]] = {
        ("vms", "vm-a-nic"): allocation("uid-a", "vm-a-nic", name),
        ("vms", "vm-b-nic"): allocation("uid-b", "vm-b-nic", name),
    }
    cdi, plugins = short_dir / "cdi", short_dir / "plugins"
    manager = PluginManager(
        SYS, str(short_dir / "dp"), str(short_dir / "agent-state"), uevents=False
    )
    fe = DraFrontEnd(
        manager,
        DraSettings(
            node=POOL,
            state_dir=str(short_dir / "agent-state"),
            registry_dir=str(short_dir / "reg"),
            plugins_dir=str(plugins),
            cdi_dir=str(cdi),
        ),
        get_claim=lambda ns, n: claims[(ns, n)],
    )
    await manager.start()
    await fe.start()
    try:
        sel = DeviceSelector(pci_addresses=frozenset({vf.address}))
        await manager.apply((ResourceConfig(RESOURCE, sel, allocation=DRA),))
        await manager.rescan()
        async with asyncio.timeout(120):
            while name not in fe.offers:
                await fe.wait_refreshed(fe.generation)
        async with grpc.aio.insecure_channel(f"unix://{fe.socket_path}") as ch:
            stub = dra_grpc.DRAPluginStub(ch)
            a = dra.Claim(namespace="vms", uid="uid-a", name="vm-a-nic")
            resp = await stub.NodePrepareResources(dra.NodePrepareResourcesRequest(claims=[a]))
            out = resp.claims["uid-a"]
            assert out.error == ""
            (d,) = out.devices
            assert (d.pool_name, d.device_name) == (POOL, name)
            assert list(d.cdi_device_ids) == [
                f"{DRIVER}/vfio=uid-a-{name}",
                f"{DRIVER}/metadata=uid-a_nic",
            ]
            vfio_spec = json.loads((cdi / f"{DRIVER}_uid-a.json").read_text())
            nodes = [n["path"] for n in vfio_spec["containerEdits"]["deviceNodes"]]
            nodes += [
                n["path"]
                for dev in vfio_spec["devices"]
                for n in dev["containerEdits"]["deviceNodes"]
            ]
            assert "/dev/vfio/vfio" in nodes and f"/dev/vfio/{vf.iommu_group}" in nodes
            for node in nodes:  # what the runtime will hand the VM's launcher: real, openable
                fd = os.open(node, os.O_RDWR)
                os.close(fd)
            assert vfio_spec["containerEdits"]["env"] == [
                f"PCI_RESOURCE_HOSTDEV_IO_IGBVF={vf.address}"
            ]
            meta = plugins / DRIVER / "dra-device-metadata/vms_vm-a-nic/nic/metadata.json"
            text = meta.read_text()
            assert '"resource.kubernetes.io/pciBusID"' in text and str(vf.address) in text
            prepared = files_under(cdi, plugins / DRIVER / "dra-device-metadata")
            assert len(prepared) == 3, prepared  # the vfio spec, the metadata spec and file
            again = await stub.NodePrepareResources(dra.NodePrepareResourcesRequest(claims=[a]))
            assert again.claims["uid-a"] == out  # idempotent
            un = await stub.NodeUnprepareResources(dra.NodeUnprepareResourcesRequest(claims=[a]))
            assert un.claims["uid-a"].error == ""
            assert files_under(cdi, plugins / DRIVER / "dra-device-metadata") == []

            # The VF goes back to igbvf (its policy entry is gone) while still offered: the
            # re-check at prepare reads the kernel and refuses, writing nothing.
            assert apply(spec(pf, 1), state).exit_code == 0
            assert driver(vf.address) == "igbvf"
            assert name in fe.offers  # no rescan yet: only the re-check stands in the way
            b = dra.Claim(namespace="vms", uid="uid-b", name="vm-b-nic")
            resp = await stub.NodePrepareResources(dra.NodePrepareResourcesRequest(claims=[b]))
            err = resp.claims["uid-b"].error
            print(err)
            assert f"{vf.address} is bound to igbvf, not vfio-pci" in err
            assert not list(resp.claims["uid-b"].devices)
            assert files_under(cdi, plugins / DRIVER / "dra-device-metadata") == []
    finally:
        await fe.close()
        await manager.close()
