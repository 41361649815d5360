"""node.yaml / PassthroughNodeState spec parsing, and the `hostdev apply` CLI on fake trees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hostdev.cli import main
from hostdev.cli_apply import load_yaml
from hostdev.deviceplugin import persist
from hostdev.deviceplugin.plugin import advertised_from_json
from hostdev.host.address import PciAddress
from hostdev.policy.nodeconfig import (
    DeviceConfig,
    NodeConfigError,
    PfConfig,
    parse_node_config,
)
from hostdev.testing.fakesysfs import FakeHost

A = PciAddress.parse


def test_full_document_parses() -> None:
    doc = load_yaml(
        """
apiVersion: hostdev.io/v1alpha1
kind: PassthroughNodeState
metadata: {name: node-1}
spec:
  pfs:
    - pciAddress: 0000:3b:00.0
      numVfs: 4
    - pfName: ens2f0
      numVfs: 0
      allowUnsafe: true
  devices:
    - pciAddress: 0000:17:00.0
      resourceName: example.com/a10
    - pciAddress: 0000:00:1f.6
      driver: e1000e
    - selector: {vendors: ["8086"], pfNames: ["ens1f0#0-3"]}
      resourceName: example.com/vf
      allowUnsafe: true
"""
    )
    cfg = parse_node_config(doc)
    assert cfg.pfs == (
        PfConfig(4, A("0000:3b:00.0")),
        PfConfig(0, None, "ens2f0", allow_unsafe=True),
    )
    assert cfg.devices == (
        DeviceConfig(A("0000:17:00.0"), "vfio-pci", "example.com/a10"),
        DeviceConfig(A("0000:00:1f.6"), "e1000e", None),
    )
    (rule,) = cfg.rules
    assert rule.allow_unsafe and rule.resource_name == "example.com/vf"
    assert parse_node_config(doc["spec"]) == cfg  # bare spec, same meaning
    assert parse_node_config(None) == parse_node_config({})


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "must be a mapping"),
        ({"kind": "Pod"}, "kind 'Pod': expected PassthroughNodeState"),
        ({"pfs": {}}, "pfs: must be a list"),
        ({"pfs": [{"pciAddress": "0000:3b:00.0"}]}, "pfs[0].numVfs: must be a non-negative"),
        ({"pfs": [{"pciAddress": "0000:3b:00.0", "numVfs": -1}]}, "non-negative integer"),
        ({"pfs": [{"pciAddress": "0000:3b:00.0", "numVfs": True}]}, "non-negative integer"),
        ({"pfs": [{"numVfs": 1}]}, "pfs[0]: give exactly one of pciAddress or pfName"),
        (
            {"pfs": [{"pciAddress": "3b:00.0", "numVfs": 1}]},
            "pfs[0].pciAddress: invalid PCI address '3b:00.0'",
        ),
        ({"pfs": [{"pciAddress": 60.0, "numVfs": 1}]}, "got 60.0 (quote it in YAML)"),
        (
            {"pfs": [{"pfName": "a", "numVfs": 1}, {"pfName": "a", "numVfs": 2}]},
            "pfs[1]: PF a is listed twice",
        ),
        ({"devices": [{"driver": "vfio-pci"}]}, "give exactly one of pciAddress or selector"),
        ({"devices": [{"pciAddress": "0000:01:00.0", "driver": "../x"}]}, "not a kernel driver"),
        (
            {"devices": [{"pciAddress": "0000:01:00.0", "resourceName": "nope"}]},
            "resourceName must look like vendor.example/name",
        ),
        ({"devices": [{"pciAddress": "0000:01:00.0", "allowUnsafe": "yes"}]}, "true or false"),
        (
            {"devices": [{"pciAddress": "0000:01:00.0", "force": True}]},
            "unknown field(s) ['force']",
        ),
        ({"devices": [{"selector": {}}]}, "empty selector matches nothing"),
        (
            {"devices": [{"selector": {"vendors": ["xyz"]}}]},
            "devices[0].selector: selector.vendors",
        ),
        ({"spec": {"gpus": []}}, "spec: unknown field(s) ['gpus']"),
        (
            {"devices": [{"pciAddress": "0000:01:00.0"}, {"pciAddress": "0000:01:00.0"}]},
            "devices[1]: device 0000:01:00.0 is listed twice",
        ),
        (
            {
                "devices": [
                    {"pciAddress": "0000:01:00.0", "resourceName": "example.com/vf.a"},
                    {"selector": {"vendors": ["8086"]}, "resourceName": "example.com/vf.a"},
                    {"pciAddress": "0000:02:00.0", "resourceName": "example.com/VF_a"},
                ]
            },
            "devices[2].resourceName: resource names example.com/vf.a and example.com/VF_a "
            "both become PCI_RESOURCE_EXAMPLE_COM_VF_A (MDEV_PCI_RESOURCE_EXAMPLE_COM_VF_A",
        ),
        (
            {
                "pfs": [{"pciAddress": "0000:3b:00.0", "numVfs": 4}],
                "devices": [{"pciAddress": "0000:3b:00.0"}],
            },
            "pfs[0] and devices[0] (0000:3b:00.0): contradiction: the PF is wanted on vfio-pci "
            "and with numVfs 4",
        ),
    ],
)
def test_bad_input_names_the_field(doc: Any, message: str) -> None:
    with pytest.raises(NodeConfigError) as e:
        parse_node_config(doc)
    assert message in str(e.value)


def test_yaml_keeps_unquoted_pci_addresses_as_strings() -> None:
    assert load_yaml("a: 0000:3b:00.0\nb: 4\nc: 0x10\nd: 1.5") == {
        "a": "0000:3b:00.0",
        "b": 4,
        "c": 16,
        "d": 1.5,
    }


# ---- the CLI on a fake tree (dry run: a fake tree has no kernel behind its files) -----------
def _tree(root: Path) -> FakeHost:
    h = FakeHost(root)
    h.add_device("0000:05:00.0", vendor="8086", device="10d3", class_code="020000", driver="e1000e")
    return h


def test_cli_dry_run_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h = _tree(tmp_path / "root")
    cfg = tmp_path / "node.yaml"
    cfg.write_text("devices:\n  - pciAddress: 0000:05:00.0\n")
    args = ["apply", "--config", str(cfg), "--host-root", str(h.root)]
    rc = main([*args, "--state-dir", str(tmp_path / "state"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "round 1: plan: 4 step(s), 0 refusal(s), 0 pending" in out
    assert "    4. 0000:05:00.0  drivers_probe -> expect vfio-pci  [bind to vfio-pci]" in out
    assert "hostdev apply: dry run: nothing changed (0 step(s) executed)" in out
    assert not (tmp_path / "state").exists()


def test_cli_refusal_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h = _tree(tmp_path / "root")
    cfg = tmp_path / "node.yaml"
    cfg.write_text("devices:\n  - pciAddress: 0000:99:00.0\n")
    rc = main(
        [
            "apply",
            "--config",
            str(cfg),
            "--host-root",
            str(h.root),
            "--state-dir",
            str(tmp_path / "s"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1
    assert "REFUSED 0000:99:00.0: refused to bind to vfio-pci: not present on this node" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("devices: [", "is not valid YAML"),
        ("devices:\n  - pciAddress: 3b:00.0\n", "devices[0].pciAddress: invalid PCI address"),
    ],
)
def test_cli_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    cfg = tmp_path / "node.yaml"
    if content is not None:
        cfg.write_text(content)
    rc = main(["apply", "--config", str(cfg), "--host-root", str(tmp_path), "--dry-run"])
    assert rc == 4
    assert message in capsys.readouterr().err


def test_cli_bad_host_root_and_state_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text("{}\n")
    rc = main(
        [
            "apply",
            "--config",
            str(cfg),
            "--host-root",
            str(tmp_path / "nope"),
            "--state-dir",
            str(tmp_path / "s"),
        ]
    )
    assert rc == 4 and "no PCI bus at" in capsys.readouterr().err
    (tmp_path / "s").mkdir(exist_ok=True)
    (tmp_path / "s/original-drivers.json").write_text("[]")
    rc = main(["apply", "--config", str(cfg), "--state-dir", str(tmp_path / "s")])
    assert rc == 4 and "left untouched" in capsys.readouterr().err


def test_a_pf_pinned_to_its_host_driver_with_vfs_is_fine() -> None:
    cfg = parse_node_config(
        {
            "pfs": [{"pciAddress": "0000:3b:00.0", "numVfs": 4}],
            "devices": [{"pciAddress": "0000:3b:00.0", "driver": "ice"}],
        }
    )
    assert cfg.pfs[0].num_vfs == 4 and cfg.devices[0].driver == "ice"


def test_cli_reads_the_device_plugins_allocations_from_the_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """hostdev apply on a node whose agent shares --state-dir: a VF the device plugin handed to
    a pod is not destroyed by a resize, whatever allowUnsafe says."""
    h = FakeHost(tmp_path / "root")
    pf = h.add_pf("0000:3b:00.0", vendor="8086", device="1592", vf_device="1889", numvfs=2)
    vf = h.vf_address(pf, 1)
    state = tmp_path / "state"
    unit = {"id": str(vf), "addresses": [str(vf)], "group": None, "numa": None, "pf": str(pf)}
    saved = persist.SavedResource(
        (advertised_from_json({**unit, "healthy": True, "reason": ""}),), frozenset({str(vf)})
    )
    state.mkdir()
    persist.save(str(state), persist.encode({"example.com/vf": saved}))
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"pfs:\n  - {{pciAddress: '{pf}', numVfs: 4, allowUnsafe: true}}\n")
    args = ["apply", "--config", str(cfg), "--host-root", str(h.root), "--state-dir", str(state)]
    assert main([*args, "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert f"VF {vf} is allocated to a pod through example.com/vf" in out
