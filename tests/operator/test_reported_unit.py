"""Reading the node agent's NodeState status back: partial and malformed reports."""

from __future__ import annotations

from typing import Any

import pytest

from hostdev.host.address import PciAddress
from hostdev.policy.labels import LabelSelector, LabelSelectorError
from hostdev.policy.reported import read_node_state


@pytest.mark.parametrize(
    ("status", "inventory", "resources"),
    [
        (None, False, {}),
        ({"syncStatus": "InProgress"}, False, {}),
        ({"devices": []}, True, {}),
        (
            {
                "devices": [
                    {"pciAddress": "0000:3b:02.0", "resourceName": "a.b/c"},
                    {"pciAddress": "3b:02.1", "resourceName": "a.b/c"},  # short form: skipped
                    {"resourceName": "a.b/c"},  # no address: skipped
                    "garbage",
                    {"pciAddress": "0000:3b:02.2", "resourceName": ""},  # not advertised
                ]
            },
            True,
            {"a.b/c": ("0000:3b:02.0",)},
        ),
    ],
)
def test_partial_reports(
    status: dict[str, Any] | None, inventory: bool, resources: dict[str, tuple[str, ...]]
) -> None:
    node = read_node_state("n1", status)
    assert (node.inventory is not None) is inventory
    assert dict(node.resources) == resources


def test_vfs_are_linked_to_their_pf() -> None:
    node = read_node_state(
        "n1",
        {
            "devices": [
                {"pciAddress": "0000:3b:00.0", "netdevs": ["ens1f0"], "totalVfs": 8},
                {"pciAddress": "0000:3b:02.1", "physfn": "0000:3b:00.0", "vfIndex": 1},
                {"pciAddress": "0000:3b:02.0", "physfn": "0000:3b:00.0", "vfIndex": 0},
            ]
        },
    )
    assert node.inventory is not None
    pf = node.inventory.devices[PciAddress.parse("0000:3b:00.0")]
    assert [str(a) for a in pf.virtfns] == ["0000:3b:02.0", "0000:3b:02.1"]
    assert pf.is_pf


def test_allocations_match_the_vm_by_vmi_or_launcher_pod() -> None:
    node = read_node_state(
        "n1",
        {
            "allocations": [
                {"pciAddress": "0000:3b:02.0", "resourceName": "a.b/c", "namespace": "ns",
                 "pod": "virt-launcher-vm-abcde"},
                {"pciAddress": "0000:3b:02.1", "resourceName": "a.b/c", "namespace": "ns",
                 "pod": "x", "vmi": "vm"},
                {"pciAddress": "0000:3b:02.2", "resourceName": "a.b/c", "namespace": "ns",
                 "pod": "virt-launcher-vm-2-abcde", "vmi": "vm-2"},
                {"pciAddress": "0000:3b:02.3", "resourceName": "a.b/c", "namespace": "other",
                 "pod": "virt-launcher-vm-abcde"},
            ]
        },
    )  # fmt: skip
    held = [a.pci_address for a in node.allocations if a.held_by_vm("ns", "vm")]
    assert held == ["0000:3b:02.0", "0000:3b:02.1"]


@pytest.mark.parametrize(
    ("selector", "error"),
    [
        ({"matchLabels": ["a"]}, "must be a map"),
        ({"matchExpressions": [{"key": "a", "operator": "Gt"}]}, "expected one of"),
        ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}, "no values"),
    ],
)
def test_bad_label_selectors(selector: dict[str, Any], error: str) -> None:
    with pytest.raises(LabelSelectorError, match=error):
        LabelSelector.from_dict(selector)
