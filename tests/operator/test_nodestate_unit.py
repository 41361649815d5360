"""Policies + node labels (+ agent reports) -> NodeState specs, conflicts and policy status."""

from __future__ import annotations

from typing import Any

import pytest

from hostdev.policy.nodeconfig import parse_node_config, resolve_devices
from hostdev.policy.nodestate import (
    CONTRADICTION,
    ENV_COLLISION,
    Policy,
    PolicyError,
    policy_outcomes,
    render_cluster,
    rerender,
)
from hostdev.policy.reported import read_node_state
from tests.operator.helpers import device, policy, report

NODES = {
    "n1": {"kubernetes.io/hostname": "n1", "hostdev.io/nic": "x710"},
    "n2": {"kubernetes.io/hostname": "n2", "hostdev.io/nic": "e810"},
    "n3": {"kubernetes.io/hostname": "n3"},
}


def plans_for(policies: list[dict[str, Any]], reports: dict[str, Any] | None = None):
    ps = [Policy.from_object(p) for p in policies]
    reported = {n: read_node_state(n, s) for n, s in (reports or {}).items()}
    return ps, render_cluster(ps, NODES, reported)


@pytest.mark.parametrize(
    ("node_selector", "nodes"),
    [
        (None, ["n1", "n2", "n3"]),
        ({}, ["n1", "n2", "n3"]),
        ({"matchLabels": {"hostdev.io/nic": "x710"}}, ["n1"]),
        ({"matchExpressions": [{"key": "hostdev.io/nic", "operator": "Exists"}]}, ["n1", "n2"]),
        ({"matchExpressions": [{"key": "hostdev.io/nic", "operator": "DoesNotExist"}]}, ["n3"]),
        (
            {
                "matchExpressions": [
                    {"key": "hostdev.io/nic", "operator": "NotIn", "values": ["x710"]}
                ]
            },
            ["n2", "n3"],
        ),
        (
            {
                "matchLabels": {"kubernetes.io/hostname": "n2"},
                "matchExpressions": [
                    {"key": "hostdev.io/nic", "operator": "In", "values": ["x710"]}
                ],
            },
            [],
        ),
    ],
)
def test_node_selection(node_selector: dict[str, Any] | None, nodes: list[str]) -> None:
    _, plans = plans_for([policy("p", node_selector=node_selector)])
    assert sorted(plans) == nodes


def test_spec_without_inventory_is_selector_rules_in_precedence_order() -> None:
    _, plans = plans_for(
        [
            policy("low", "vendor.example/low", {"vendors": ["8086"]}, priority=0),
            policy("high", "vendor.example/high", {"devices": ["154c"]}, priority=5),
            policy(
                "old",
                "vendor.example/old",
                {"classes": ["0200"]},
                priority=5,
                created="2025-01-01T00:00:00Z",
            ),
        ]
    )
    spec = plans["n1"].spec
    assert [d["resourceName"] for d in spec["devices"]] == [
        "vendor.example/old",  # priority 5, older
        "vendor.example/high",  # priority 5, newer
        "vendor.example/low",
    ]
    assert spec["devices"][0] == {
        "selector": {"classes": ["0200"]},
        "driver": "vfio-pci",
        "resourceName": "vendor.example/old",
    }
    assert spec["pfs"] == []
    assert plans["n1"].policies == ("old", "high", "low")
    # The node agent parses exactly this shape.
    assert len(parse_node_config({"spec": spec}).rules) == 3


def test_sriov_pfs_by_name_and_address_with_numvfs_conflict() -> None:
    _, plans = plans_for(
        [
            policy(
                "a",
                "vendor.example/a",
                {"pfNames": ["ens1f0#0-3", "0000:3b:00.1"]},
                num_vfs=8,
                priority=10,
            ),
            policy("b", "vendor.example/b", {"pfNames": ["ens1f0#4-7"]}, num_vfs=8),
            policy("c", "vendor.example/c", {"pfNames": ["ens1f0#0-1"]}, num_vfs=2),
        ]
    )
    plan = plans["n1"]
    assert plan.spec["pfs"] == [
        {"pciAddress": "0000:3b:00.1", "numVfs": 8},
        {"pfName": "ens1f0", "numVfs": 8},
    ]
    # b agrees with a on numVfs: no conflict. c wants 2: it loses to a.
    assert [(c.loser, c.winner, c.target) for c in plan.conflicts] == [("c", "a", "ens1f0")]
    assert "overridden by 8 from policy a" in plan.conflicts[0].message
    assert plan.attribution()["conflicts"][0]["policy"] == "c"
    cfg = parse_node_config({"spec": plan.spec})
    assert {(p.name, str(p.address) if p.address else None, p.num_vfs) for p in cfg.pfs} == {
        ("ens1f0", None, 8),
        (None, "0000:3b:00.1", 8),
    }


def test_device_conflict_with_inventory_renders_explicit_winner_and_status() -> None:
    pols = [
        policy("wide", "vendor.example/any-intel", {"vendors": ["8086"]}, priority=0),
        policy("narrow", "vendor.example/vf", {"devices": ["154c"]}, priority=1),
    ]
    reports = {
        "n1": report(
            device("0000:3b:02.0", "8086", "154c"),
            device("0000:3b:02.1", "8086", "154c"),
            device("0000:5e:00.0", "8086", "1572"),
            device("0000:af:00.0", "10de", "2236", cls="030200"),
        )
    }
    ps, plans = plans_for(pols, reports)
    plan = plans["n1"]
    assert plan.holdings == {
        "narrow": ("0000:3b:02.0", "0000:3b:02.1"),
        "wide": ("0000:5e:00.0",),
    }
    explicit = [d for d in plan.spec["devices"] if "pciAddress" in d]
    assert explicit == [
        {"pciAddress": "0000:3b:02.0", "driver": "vfio-pci", "resourceName": "vendor.example/vf"},
        {"pciAddress": "0000:3b:02.1", "driver": "vfio-pci", "resourceName": "vendor.example/vf"},
    ]
    # nodeconfig resolves exactly the precedence the operator computed
    resolved = resolve_devices(
        parse_node_config({"spec": plan.spec}), read_node_state("n1", reports["n1"]).inventory
    )
    assert not resolved.conflicts
    assert {str(a): d.resource_name for a, d in resolved.devices.items()} == {
        "0000:3b:02.0": "vendor.example/vf",
        "0000:3b:02.1": "vendor.example/vf",
        "0000:5e:00.0": "vendor.example/any-intel",
    }
    out = policy_outcomes(ps, plans)
    assert out["narrow"].conflicts == ()
    assert [(c.target, c.winner) for c in out["wide"].conflicts] == [
        ("0000:3b:02.0", "narrow"),
        ("0000:3b:02.1", "narrow"),
    ]
    st = out["wide"].status()
    assert st["matchedNodeCount"] == 3
    assert st["deviceCount"] == 1
    assert st["conflictCount"] == 2
    assert {n["node"]: n["reported"] for n in st["nodes"]} == {"n1": True, "n2": False, "n3": False}


def test_priority_tie_goes_to_older_then_name() -> None:
    reports = {"n1": report(device("0000:3b:02.0"))}
    _, plans = plans_for(
        [
            policy("b", "vendor.example/b", created="2026-01-01T00:00:00Z"),
            policy("a", "vendor.example/a", created="2026-01-01T00:00:00Z"),
            policy("c", "vendor.example/c", created="2026-02-01T00:00:00Z"),
        ],
        reports,
    )
    assert plans["n1"].holdings["a"] == ("0000:3b:02.0",)
    assert sorted(c.loser for c in plans["n1"].conflicts) == ["b", "c"]


def test_vf_ranges_select_vfs_of_named_pf() -> None:
    reports = {
        "n1": report(
            device("0000:3b:00.0", dev="1572", netdevs=["ens1f0"]),
            *[device(f"0000:3b:02.{i}", physfn="0000:3b:00.0", vf_index=i) for i in range(4)],
        )
    }
    _, plans = plans_for(
        [
            policy("lo", "vendor.example/lo", {"pfNames": ["ens1f0#0-1"]}, num_vfs=4),
            policy("hi", "vendor.example/hi", {"pfNames": ["ens1f0#2-3"]}, num_vfs=4),
        ],
        reports,
    )
    assert plans["n1"].holdings == {
        "hi": ("0000:3b:02.2", "0000:3b:02.3"),
        "lo": ("0000:3b:02.0", "0000:3b:02.1"),
    }
    assert plans["n1"].conflicts == ()


@pytest.mark.parametrize(
    ("spec_change", "message"),
    [
        ({"selector": {}}, "selector is empty"),
        ({"selector": {"vendors": ["80861"]}}, "expected 4 hex digits"),
        ({"selector": {"pfNames": ["ens1f0#7-3"]}}, "below start"),
        ({"sriov": {"numVfs": 4}, "selector": {"vendors": ["8086"]}}, "needs selector.pfNames"),
        ({"resourceName": "nodomain"}, "domain/name"),
        (
            {"nodeSelector": {"matchExpressions": [{"key": "k", "operator": "In"}]}},
            "needs at least one value",
        ),
    ],
)
def test_invalid_policies_say_what_to_fix(spec_change: dict[str, Any], message: str) -> None:
    obj = policy("bad")
    obj["spec"].update(spec_change)
    with pytest.raises(PolicyError, match=message):
        Policy.from_object(obj)


def test_colliding_resource_names_lose_to_precedence_on_the_node() -> None:
    pols = [
        policy("dots", "example.com/vf.a", {"vendors": ["8086"]}, priority=0),
        policy("under", "example.com/vf_a", {"devices": ["154c"]}, priority=1),
        policy("also-under", "example.com/vf_a", {"devices": ["1572"]}, priority=0),
    ]
    reports = {"n1": report(device("0000:3b:02.0", "8086", "154c"))}
    ps, plans = plans_for(pols, reports)
    plan = plans["n1"]
    # "under" has precedence, so its name keeps the env var; "dots" renders nothing here.
    assert [d["resourceName"] for d in plan.spec["devices"]] == [
        "example.com/vf_a",
        "example.com/vf_a",
    ]
    assert plan.holdings == {"under": ("0000:3b:02.0",), "also-under": ()}
    assert plan.policies == ("under", "also-under", "dots")
    parse_node_config({"spec": plan.spec})  # the agent accepts what is rendered
    out = policy_outcomes(ps, plans)
    assert out["under"].conflicts == () and out["also-under"].conflicts == ()
    (c, *_) = out["dots"].conflicts
    assert {x.node for x in out["dots"].conflicts} == {"n1", "n2", "n3"}
    assert (c.target, c.winner, c.reason) == (
        "PCI_RESOURCE_EXAMPLE_COM_VF_A",
        "under",
        ENV_COLLISION,
    )
    assert "resource names example.com/vf_a and example.com/vf.a both become" in c.message
    assert c.message.endswith("policy under has precedence (priority 1, then age, then name)")
    assert out["dots"].status()["deviceCount"] == 0


def test_a_policy_whose_units_hold_several_functions_is_told() -> None:
    gpu = {"iommuGroup": 12}
    reports = {
        "n1": report(
            {**device("0000:17:00.0", "10de", "2236", cls="030200"), **gpu},
            {**device("0000:17:00.1", "10de", "1aef", cls="040300"), **gpu},
            {**device("0000:65:00.0", "10de", "2236", cls="030200"), "iommuGroup": 13},
        )
    }
    pols = [
        policy("by-vendor", "example.com/a10", {"vendors": ["10de"]}, priority=1),
        policy("by-class", "example.com/a10-gpu", {"classes": ["0302"]}),
    ]
    ps, plans = plans_for(pols, reports)
    out = policy_outcomes(ps, plans)
    (note,) = out["by-vendor"].multi_function
    assert note.startswith(
        "node n1: example.com/a10: 0000:17:00.0 and 0000:17:00.1 share IOMMU group 12 and form "
        "one unit, of which a VM entry attaches 0000:17:00.0 only"
    )
    # The class selector would take the GPUs alone (here it lost them to precedence anyway).
    assert out["by-class"].multi_function == ()
    ps, plans = plans_for([pols[1]], reports)
    assert plans["n1"].holdings["by-class"] == ("0000:17:00.0", "0000:65:00.0")
    assert policy_outcomes(ps, plans)["by-class"].multi_function == ()


def test_a_policy_putting_a_pf_with_vfs_on_vfio_is_a_contradiction() -> None:
    pols = [
        policy("vfs", "vendor.example/vf", {"pfNames": ["ens1f0#0-3"]}, num_vfs=4),
        policy("whole-nic", "vendor.example/nic", {"devices": ["1592"]}),
    ]
    reports = {
        "n1": report(
            device("0000:3b:00.0", "8086", "1592", netdevs=["ens1f0"]),
            device("0000:3b:02.0", "8086", "1889", physfn="0000:3b:00.0", vf_index=0),
        )
    }
    ps, plans = plans_for(pols, reports)
    out = policy_outcomes(ps, plans)
    (c,) = [c for c in out["whole-nic"].conflicts if c.node == "n1"]
    assert (c.target, c.winner, c.reason) == ("ens1f0", "vfs", CONTRADICTION)
    assert c.message.startswith(
        "contradiction: policy whole-nic puts PF 0000:3b:00.0 on vfio-pci while policy vfs "
        "gives it numVfs 4"
    )
    assert out["vfs"].conflicts == ()
    # the rendered spec still claims the PF for vfio-pci: the agent's planner refuses the PF
    # as the same contradiction (tests/config/test_plan.py) and leaves it as it is
    resolved = resolve_devices(
        parse_node_config({"spec": plans["n1"].spec}),
        read_node_state("n1", reports["n1"]).inventory,
    )
    assert [str(a) for a in resolved.devices] == ["0000:3b:00.0", "0000:3b:02.0"]


def test_rerender_reuses_exactly_the_plans_whose_inputs_did_not_change() -> None:
    nic = {"matchLabels": {"hostdev.io/nic": "x710"}}
    ps = [
        Policy.from_object(policy("a", "example.com/a")),
        Policy.from_object(policy("b", "example.com/b", node_selector=nic, priority=1)),
    ]
    dev = device("0000:3b:02.0")
    reported = {"n1": read_node_state("n1", report(dev)), "n2": read_node_state("n2", report(dev))}
    first = rerender(ps, NODES, reported, {})
    assert {n: r.plan for n, r in first.items()} == render_cluster(ps, NODES, reported)
    # The same inputs (equal, not identical: a fresh parse of the same report) reuse every plan.
    again = {**reported, "n2": read_node_state("n2", report(dev))}
    assert all(r is first[n] for n, r in rerender(ps, NODES, again, first).items())
    # b changes: only n1 (the node it selects) is rendered again, to what a full render gives.
    ps2 = [ps[0], Policy.from_object(policy("b", "example.com/b2", node_selector=nic, priority=1))]
    second = rerender(ps2, NODES, again, first)
    assert [n for n, r in second.items() if r is not first[n]] == ["n1"]
    assert {n: r.plan for n, r in second.items()} == render_cluster(ps2, NODES, again)
