"""`hostdev snapshot`: saved trees scan like their source; saved real hosts stay readable."""

import json
from pathlib import Path

import pytest

from hostdev.cli import main
from hostdev.host import Sysfs
from hostdev.testing import scenarios

DATA = Path(__file__).parent.parent / "data" / "snapshots"


def scan(root: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["scan", "--host-root", str(root), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", ["demo", "group-member-on-host-driver", "iommu-off"])
def test_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    scenarios.SCENARIOS[name](tmp_path / "src")
    assert main(["snapshot", str(tmp_path / "out"), "--host-root", str(tmp_path / "src")]) == 0
    assert "saved" in capsys.readouterr().out
    assert scan(tmp_path / "out", capsys) == scan(tmp_path / "src", capsys)
    assert Sysfs(str(tmp_path / "out")).discover() == Sysfs(str(tmp_path / "src")).discover()


def test_refuses_non_empty_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenarios.gpu_with_audio(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    assert main(["snapshot", str(tmp_path / "out"), "--host-root", str(tmp_path / "src")]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep").read_text() == "mine"


def test_saved_firecracker_host(capsys: pytest.CaptureFixture[str]) -> None:
    """Captured with `hostdev snapshot` on a Firecracker VM: virtio devices, no IOMMU."""
    rep = scan(DATA / "firecracker-no-iommu", capsys)
    assert rep["node"]["iommu"] is False and rep["ready"] is False
    assert {d["vendor"] for d in rep["devices"] if d["driver"]} == {"1af4"}
    assert all(d["assignable"] == "no" for d in rep["devices"])
    assert rep["warnings"] == []
