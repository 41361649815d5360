"""The dra-harness Go tests (tests/tools/dra-harness/*_test.go, compiled by
scripts/setup.d/20-go-tools.sh into dra-harness.test), run here so `make test` counts them:
the upstream Go metadata writer still writes tests/data/dra/ byte for byte and upstream
devicemetadata, KubeVirt v1.9.0's reader and the CDI library read it (TestReference); the
kubelet subcommand's code against the upstream Go DRA driver helper (TestKubelet...)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.fixtures.tiers import require_go_tool

PACKAGE_DIR = Path(__file__).parent.parent / "tools" / "dra-harness"  # tests use ../../data

pytestmark = pytest.mark.dra


@pytest.mark.parametrize("test", ["TestReference", "TestKubeletWithUpstreamDriverHelper"])
def test_go(test: str) -> None:
    binary = require_go_tool("dra-harness.test")
    proc = subprocess.run(
        [str(binary), f"-test.run=^{test}$", "-test.count=1", "-test.v"],
        cwd=PACKAGE_DIR,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    assert f"--- PASS: {test} " in proc.stdout  # it ran, and was not skipped
