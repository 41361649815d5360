"""Prepare/unprepare on fake host trees: what gets written, idempotence, refusals that write
nothing, and recovery from a crash in the middle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from hostdev.deviceplugin.dra.checkpoint import PREPARED, PREPARING, Checkpoints
from hostdev.deviceplugin.dra.prepare import ClaimKey, Offer, Preparer
from hostdev.host import PciAddress, Sysfs
from hostdev.policy.allocation import build_units
from hostdev.policy.dra import DRIVER, device_name, dra_device
from hostdev.testing import scenarios
from hostdev.testing.fakesysfs import FakeHost

POOL = "node-1"
GPU = "example.com/gpu"


class Node:
    """A fake host with a GPU+audio unit, the plugin's directories and a claim store."""

    def __init__(self, tmp: Path) -> None:
        self.host: FakeHost = scenarios.gpu_with_audio(tmp / "host")
        self.sysfs = Sysfs(str(tmp / "host"))
        self.data = tmp / "plugins" / DRIVER
        self.cdi = tmp / "cdi"
        self.state = tmp / "state"
        self.claims: dict[tuple[str, str], dict[str, Any]] = {}
        self.reads = 0
        self.checkpoints = Checkpoints.open(str(self.state))
        self.preparer = self.new_preparer()

    def new_preparer(self) -> Preparer:
        self.checkpoints = Checkpoints.open(str(self.state))
        return Preparer(
            self.sysfs,
            self.checkpoints,
            pool=POOL,
            plugin_data_dir=str(self.data),
            cdi_dir=str(self.cdi),
            get_claim=self.get_claim,
        )

    def get_claim(self, ns: str, name: str) -> dict[str, Any]:
        self.reads += 1
        try:
            return self.claims[(ns, name)]
        except KeyError:
            raise RuntimeError(f"resourceclaims {name!r} not found") from None

    def offers(self) -> dict[str, Offer]:
        inv = self.sysfs.discover()
        devs = [inv.devices[PciAddress.parse(a)] for a in ("0000:17:00.0", "0000:17:00.1")]
        out = {}
        for u in build_units(devs):
            d = dra_device(u, GPU, inv)
            out[d.name] = Offer(d)
        return out

    def claim(self, uid: str = "uid-1", name: str = "vm-1-gpu", **extra: Any) -> ClaimKey:
        self.claims[("vms", name)] = {
            "metadata": {
                "namespace": "vms",
                "name": name,
                "uid": uid,
                "annotations": {"resource.kubernetes.io/pod-claim-name": "gpus"},
            },
            "status": {
                "allocation": {
                    "devices": {
                        "results": [
                            {
                                "request": "gpu",
                                "driver": DRIVER,
                                "pool": POOL,
                                "device": device_name(PciAddress.parse("0000:17:00.0")),
                                **extra,
                            }
                        ]
                    }
                }
            },
        }
        return ClaimKey("vms", uid, name)

    def contents(self) -> dict[str, bytes]:
        out = {}
        for root in (self.data, self.cdi):
            for dirpath, _, names in os.walk(root):
                out.update({n: Path(dirpath, n).read_bytes() for n in names})
        return out

    def files(self) -> list[str]:
        out = []
        for root in (self.data, self.cdi):
            for dirpath, _, names in os.walk(root):
                out += [os.path.relpath(os.path.join(dirpath, n), root.parent) for n in names]
        return sorted(out)


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def test_prepare_writes_cdi_specs_metadata_and_checkpoint(node: Node) -> None:
    key = node.claim()
    ans = node.preparer.prepare([key], node.offers())[key.uid]
    assert ans.error == ""
    (dev,) = ans.devices
    assert dev.device == "pci-0000-17-00-0" and dev.requests == ("gpu",)
    assert dev.addresses == ("0000:17:00.0", "0000:17:00.1")
    assert dev.cdi_ids == (
        "pci.hostdev.io/vfio=uid-1-pci-0000-17-00-0",
        "pci.hostdev.io/metadata=uid-1_gpu",
    )
    assert node.files() == [
        "cdi/pci.hostdev.io_metadata_uid-1_gpu.json",
        "cdi/pci.hostdev.io_uid-1.json",
        "pci.hostdev.io/dra-device-metadata/vms_vm-1-gpu/gpu/metadata.json",
    ]
    spec = json.loads((node.cdi / "pci.hostdev.io_uid-1.json").read_text())
    group = node.host.device_dir("0000:17:00.0").joinpath("iommu_group").readlink().name
    assert spec["containerEdits"]["env"] == [
        "PCI_RESOURCE_EXAMPLE_COM_GPU=0000:17:00.0,0000:17:00.1"
    ]
    assert spec["devices"][0]["containerEdits"]["deviceNodes"] == [
        {"path": f"/dev/vfio/{group}", "permissions": "rwm"}
    ]
    meta = node.cdi / "pci.hostdev.io_metadata_uid-1_gpu.json"
    mount = json.loads(meta.read_text())["devices"][0]["containerEdits"]["mounts"][0]
    assert mount["hostPath"] == str(
        node.data / "dra-device-metadata/vms_vm-1-gpu/gpu/metadata.json"
    )
    assert mount["containerPath"].endswith(
        "resourceclaimtemplates/gpus/gpu/pci.hostdev.io-metadata.json"
    )
    mode = os.stat(mount["hostPath"]).st_mode & 0o777
    assert mode == 0o644  # readable by the VM's (non-root) launcher
    assert node.checkpoints.records[key.uid].state == PREPARED


def test_prepare_is_idempotent_and_survives_an_agent_restart(node: Node) -> None:
    key = node.claim()
    first = node.preparer.prepare([key], node.offers())[key.uid]
    before = node.contents()
    reads = node.reads
    again = node.new_preparer().prepare([key], node.offers())[key.uid]  # a new process
    assert again == first
    assert node.reads == reads  # answered from the checkpoint: no API read, no re-check
    assert node.contents() == before
    # A missing file (e.g. /var/run/cdi on tmpfs after a reboot) is written again.
    (node.cdi / "pci.hostdev.io_uid-1.json").unlink()
    assert node.new_preparer().prepare([key], node.offers())[key.uid] == first
    assert (node.cdi / "pci.hostdev.io_uid-1.json").exists()


def test_unprepare_removes_everything_and_is_idempotent(node: Node) -> None:
    key = node.claim()
    node.preparer.prepare([key], node.offers())
    assert node.preparer.unprepare([key]) == {key.uid: ""}
    assert node.files() == []
    assert key.uid not in node.checkpoints.records
    assert not (node.state / "dra/claims" / f"{key.uid}.json").exists()
    assert node.preparer.unprepare([key]) == {key.uid: ""}  # never prepared: fine too


def test_a_unit_that_left_vfio_pci_is_refused_and_nothing_is_written(node: Node) -> None:
    key = node.claim()
    offers = node.offers()  # as advertised before the change
    node.host.bind("0000:17:00.1", "snd_hda_intel")
    ans = node.preparer.prepare([key], offers)[key.uid]
    assert "0000:17:00.1 is bound to snd_hda_intel, not vfio-pci" in ans.error
    assert ans.devices == ()
    assert node.files() == []
    assert node.checkpoints.records == {}


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"pool": "node-2"}, "not this node's pool"),
        ({"device": "pci-0000-99-00-0"}, "is not served through DRA on this node"),
        ({"adminAccess": True}, "admin access"),
    ],
)
def test_foreign_claims_are_refused(node: Node, extra: dict[str, Any], why: str) -> None:
    key = node.claim(**extra)
    ans = node.preparer.prepare([key], node.offers())[key.uid]
    assert why in ans.error
    assert node.files() == []


def test_claims_not_found_replaced_or_malformed_are_refused(node: Node) -> None:
    missing = ClaimKey("vms", "uid-9", "nope")
    replaced = node.claim(uid="uid-2", name="replaced")
    bad_name = ClaimKey("../etc", "uid-3", "x")
    ans = node.preparer.prepare(
        [missing, ClaimKey("vms", "uid-other", "replaced"), bad_name], node.offers()
    )
    assert "cannot read it from the API server" in ans["uid-9"].error
    assert "it was replaced" in ans["uid-other"].error
    assert "not a valid namespace, name and UID" in ans["uid-3"].error
    assert node.files() == []
    assert replaced.uid not in ans


def test_a_device_held_elsewhere_is_refused(node: Node) -> None:
    first = node.claim(uid="uid-1", name="a")
    assert node.preparer.prepare([first], node.offers())[first.uid].error == ""
    second = node.claim(uid="uid-2", name="b")
    ans = node.preparer.prepare([second], node.offers())[second.uid]
    assert "is prepared for claim vms/a already" in ans.error
    held = {
        k: Offer(o.device, "a pod holds it through the device plugin")
        for k, o in node.offers().items()
    }
    third = node.claim(uid="uid-3", name="c")
    assert "through the device plugin" in node.preparer.prepare([third], held)[third.uid].error


def test_a_crash_between_checkpoint_and_files_is_cleaned_by_unprepare(node: Node) -> None:
    key = node.claim()
    # A directory where the metadata spec goes: the prepare fails after the vfio spec and the
    # metadata file were written (as a crash there would leave them).
    blocker = node.cdi / f"pci.hostdev.io_metadata_{key.uid}_gpu.json"
    (blocker / "x").mkdir(parents=True)
    ans = node.preparer.prepare([key], node.offers())[key.uid]
    assert ans.error and ans.devices == ()
    (blocker / "x").rmdir()
    blocker.rmdir()
    node.preparer = node.new_preparer()  # the agent restarts
    rec = node.checkpoints.records[key.uid]
    assert rec.state == PREPARING and len(rec.files) == 3
    # What a crash would have left: the files written before it, found through the checkpoint.
    for f in rec.files:
        Path(f).parent.mkdir(parents=True, exist_ok=True)
        Path(f).write_text("partial")
    assert node.preparer.unprepare([key]) == {key.uid: ""}
    assert node.files() == []
    assert node.checkpoints.records == {}
