"""The dra-harness Go tests (tests/tools/dra-harness/*_test.go), run from pytest so `make test`
counts them: the upstream Go metadata writer's output still equals tests/data/dra/ byte for
byte, and upstream devicemetadata, KubeVirt v1.9.0's reader and the CDI library read it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.tiers import SETUP_COMMAND, tier_unavailable

TOOLS = Path(__file__).parent.parent / "tools"

pytestmark = pytest.mark.dra


def test_upstream_metadata_writer_reference() -> None:
    go = shutil.which("go") or shutil.which("/usr/local/go/bin/go")
    if go is None:
        tier_unavailable(
            f"'go' not found (needed for the dra-harness Go tests; see {SETUP_COMMAND})"
        )
    cache = Path(os.environ.get("HOSTDEV_CACHE", Path.home() / ".cache" / "hostdev"))
    env = {
        **os.environ,
        # The same module cache as scripts/setup.d/20-go-tools.sh; -trimpath as there, so the
        # packages compiled for dra-harness are reused and only the test binary is linked.
        "GOMODCACHE": str(cache / "gomod"),
        "GOFLAGS": "-modcacherw -buildvcs=false -trimpath",
        "GOTOOLCHAIN": os.environ.get("GOTOOLCHAIN", "auto"),
    }
    proc = subprocess.run(
        [go, "test", "-count=1", "-vet=off", "./dra-harness/"],
        cwd=TOOLS,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
