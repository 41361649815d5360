"""Runs of consecutive functions in status lists (hostdev.policy.runs): made only of alike,
consecutive entries, and undone exactly."""

from __future__ import annotations

from typing import Any

import pytest

from hostdev.host.address import PciAddress
from hostdev.policy.runs import compact, expand, next_address


def vf(i: int, **over: Any) -> dict[str, Any]:
    """VF i of a PF at 0000:3b:00.0 whose VFs start at 0000:3b:02.0, each in its own group."""
    a: PciAddress | None = PciAddress.parse("0000:3b:02.0")
    for _ in range(i):
        assert a is not None
        a = next_address(a)
    e = {
        "pciAddress": str(a),
        "vendor": "8086",
        "device": "1889",
        "iommuGroup": 100 + i,
        "physfn": "0000:3b:00.0",
        "vfIndex": i,
        "driver": "vfio-pci",
        "resourceName": "example.com/vf",
        "health": "Healthy",
    }
    return {**e, **over}


def test_next_address_carries_into_device_and_bus() -> None:
    assert str(next_address(PciAddress.parse("0000:3b:02.6"))) == "0000:3b:02.7"
    assert str(next_address(PciAddress.parse("0000:3b:02.7"))) == "0000:3b:03.0"
    assert str(next_address(PciAddress.parse("0000:3b:1f.7"))) == "0000:3c:00.0"
    assert next_address(PciAddress.parse("0000:ff:1f.7")) is None


def test_alike_consecutive_vfs_become_one_entry_and_come_back() -> None:
    entries = [vf(i) for i in range(256)]
    runs = compact(entries)
    assert runs == [
        {
            "pciAddress": "0000:3b:02.0",
            "lastPciAddress": "0000:3c:01.7",  # 30 devices of 3b, 2 of 3c
            "count": 256,
            **{k: v for k, v in vf(0).items() if k != "pciAddress"},
        }
    ]
    assert expand(runs) == entries


@pytest.mark.parametrize(
    ("odd", "change"),
    [
        ("unhealthy", {"health": "Unhealthy", "message": "left vfio-pci"}),
        ("other driver", {"driver": "iavf"}),
        ("group not next", {"iommuGroup": 999}),
        ("no group", {"iommuGroup": None}),
        ("netdev", {"netdevs": ["ens1f0v5"]}),
    ],
)
def test_a_vf_that_differs_breaks_the_run_and_stays_itself(
    odd: str, change: dict[str, Any]
) -> None:
    entries = [vf(i) for i in range(10)]
    entries[5] = {k: v for k, v in {**entries[5], **change}.items() if v is not None}
    runs = compact(entries)
    assert [r.get("count", 1) for r in runs] == [5, 1, 4]
    assert runs[1] == entries[5]
    assert expand(runs) == entries


def test_gaps_and_other_entries_are_not_merged() -> None:
    entries = [vf(0), vf(1), vf(3), vf(4)]  # VF 2 missing: two runs
    entries.insert(0, {"pciAddress": "0000:3b:00.0", "totalVfs": 64, "netdevs": ["ens1f0"]})
    runs = compact(entries)
    assert [(r["pciAddress"], r.get("count", 1)) for r in runs] == [
        ("0000:3b:00.0", 1),
        ("0000:3b:02.0", 2),
        ("0000:3b:02.3", 2),
    ]
    assert expand(runs) == entries


def test_allocation_rows_of_one_pod_merge_too() -> None:
    rows = [
        {"pciAddress": str(PciAddress(0, 0x3B, 2, f)), "pod": "virt-launcher-a", "namespace": "vms"}
        for f in range(4)
    ]
    rows.append({"pciAddress": "0000:3b:02.4", "pod": "virt-launcher-b", "namespace": "vms"})
    assert [r.get("count", 1) for r in compact(rows)] == [4, 1]
    assert expand(compact(rows)) == rows


def test_expand_tolerates_bad_runs() -> None:
    bad: list[Any] = [
        {"pciAddress": "0000:3b:02.0", "count": "many", "vfIndex": 0},
        {"pciAddress": "not an address", "count": 3},
        "garbage",
        {"pciAddress": "0000:ff:1f.6", "count": 5},  # runs off the end of the domain
    ]
    got = expand(bad)
    assert [e["pciAddress"] for e in got] == [
        "0000:3b:02.0",
        "not an address",
        "0000:ff:1f.6",
        "0000:ff:1f.7",
    ]
