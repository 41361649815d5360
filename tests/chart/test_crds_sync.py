"""The chart's CRDs are generated from the top-level crds/ (one source of truth)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.chart.helmtool import CHART, REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "sync-chart-crds.sh"


def run_sync(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(root / "scripts" / "sync-chart-crds.sh"), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_chart_crds_equal_the_source_of_truth() -> None:
    source = {p.name: p.read_bytes() for p in (REPO_ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert source, "no CRDs in crds/"
    assert set(chart) == set(source)
    stale = [name for name in source if chart[name] != source[name]]
    assert stale == [], "run scripts/sync-chart-crds.sh"
    check = run_sync(REPO_ROOT, "--check")
    assert check.returncode == 0, check.stderr


def test_check_names_a_stale_copy_and_sync_fixes_it(tmp_path: Path) -> None:
    for part in ("crds", "charts/hostdev/crds", "scripts"):
        shutil.copytree(REPO_ROOT / part, tmp_path / part)
    policy = tmp_path / "crds" / "hostdev.io_passthroughpolicies.yaml"
    policy.write_text(policy.read_text() + "# changed\n")
    (tmp_path / "charts/hostdev/crds/hostdev.io_gone.yaml").write_text("{}\n")

    check = run_sync(tmp_path, "--check")
    assert check.returncode == 1
    assert "out of date: charts/hostdev/crds/hostdev.io_passthroughpolicies.yaml" in check.stderr
    assert "stale: charts/hostdev/crds/hostdev.io_gone.yaml" in check.stderr

    assert run_sync(tmp_path).returncode == 0
    assert run_sync(tmp_path, "--check").returncode == 0
    copied = tmp_path / "charts/hostdev/crds/hostdev.io_passthroughpolicies.yaml"
    assert copied.read_text().endswith("# changed\n")
    assert not (tmp_path / "charts/hostdev/crds/hostdev.io_gone.yaml").exists()
