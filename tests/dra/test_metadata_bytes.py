"""hostdev's KEP-5304 files are byte-identical to what the upstream Go helper
(k8s.io/dynamic-resource-allocation/kubeletplugin v0.37.2, EnableDeviceMetadata) wrote for the
same claim, request and device: tests/data/dra/ (made by the kvharness Go tool, see its README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostdev.policy.dra import (
    ATTR_PCI_BUS_ID,
    ATTR_PCIE_ROOT,
    DRIVER,
    ClaimRef,
    MetadataDevice,
    cdi_bytes,
    integer,
    metadata_cdi_file,
    metadata_cdi_spec,
    metadata_host_path,
    metadata_stream,
    string,
)

REF = Path(__file__).resolve().parents[1] / "data" / "dra"
UID = "3f0c2a4e-9d1b-4c55-8e1a-2b7d6c9e0f11"
DATA_DIR = f"/var/lib/kubelet/plugins/{DRIVER}"
DEVICE = MetadataDevice(
    "node-1",
    "pci-0000-17-00-0",
    {
        ATTR_PCI_BUS_ID: string("0000:17:00.0"),
        ATTR_PCIE_ROOT: string("pci0000:00"),
        f"{DRIVER}/iommuGroup": integer(40),
    },
)
CASES = {
    "claim": (ClaimRef("vms", "gpu-claim", UID), None),
    "template": (ClaimRef("vms", "vm1-gpu-x7k2p", UID, "gpu"), None),
    "v1beta1-only": (ClaimRef("vms", "gpu-claim", UID), ("metadata.resource.k8s.io/v1beta1",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_metadata_and_cdi_spec_match_the_upstream_writer_byte_for_byte(case: str) -> None:
    ref, versions = CASES[case]
    host = metadata_host_path(DATA_DIR, ref, "gpu")
    expected_meta = (REF / case / host.lstrip("/")).read_bytes()
    stream = (
        metadata_stream(ref, "gpu", [DEVICE])
        if versions is None
        else metadata_stream(ref, "gpu", [DEVICE], versions)
    )
    assert stream == expected_meta
    spec, cdi_id = metadata_cdi_spec(ref, "gpu", host)
    cdi_file = metadata_cdi_file("/var/run/cdi", UID, "gpu")
    assert cdi_bytes(spec) == (REF / case / cdi_file.lstrip("/")).read_bytes()
    assert cdi_id == (REF / case / "cdi-id").read_text().strip()
