"""hostdev-node's cluster-mode switches and start-up errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from hostdev.deviceplugin.agent import EXIT_SETUP, parse_args, run
from hostdev.deviceplugin.flags import cluster_mode


@pytest.mark.parametrize(
    ("argv", "env", "cluster"),
    [
        ([], {}, False),
        (["--node-name", "n1"], {}, True),
        ([], {"NODE_NAME": "n1"}, True),
        # A resource file means file mode, even on a node that sets NODE_NAME.
        (["--config", "r.yaml"], {"NODE_NAME": "n1"}, False),
        (["--node-name", ""], {"NODE_NAME": "n1"}, False),
    ],
    ids=["nothing", "flag", "downward-api-env", "config-wins", "explicitly-empty"],
)
def test_cluster_mode_switch(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str], cluster: bool
) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cluster_mode(parse_args(argv)) is cluster


def test_unreadable_driver_memory_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "original-drivers.json").write_text("{not json")
    args = parse_args(["--node-name", "n1", "--state-dir", str(tmp_path)])
    rc = asyncio.run(run(args))
    assert rc == EXIT_SETUP
    assert (tmp_path / "original-drivers.json").read_text() == "{not json"  # left untouched


def test_bad_kubeconfig_stops_start_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text(json.dumps({"apiVersion": "v1", "kind": "Config", "clusters": []}))
    args = parse_args(
        ["--node-name", "n1", "--state-dir", str(tmp_path / "s"), "--kubeconfig", str(bad)]
    )
    rc = asyncio.run(run(args))
    assert rc == EXIT_SETUP
    assert "cannot reach the API server for NodeState n1" in caplog.text
