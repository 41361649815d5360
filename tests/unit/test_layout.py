"""The design's top-level `operator/` folder next to the stdlib `operator` module: how the
project's own bootstrap commands stay safe from the shadowing."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def venv(tmp: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    # -S: no site, so `operator` is not imported at start-up (as with Debian's python3).
    return subprocess.run(
        [sys.executable, "-S", *flags, "-m", "venv", "--without-pip", str(tmp)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_plain_dash_m_from_the_repo_root_is_shadowed(tmp_path: Path) -> None:
    bad = venv(tmp_path / "a")
    assert bad.returncode != 0 and "from 'operator'" in bad.stderr


def test_isolated_dash_m_is_not_and_the_bootstrap_uses_it(tmp_path: Path) -> None:
    assert venv(tmp_path / "b", "-I").returncode == 0
    assert "$(PY) -I -m venv" in (ROOT / "Makefile").read_text()
    assert "python -I -m venv" in (ROOT / "Dockerfile").read_text()
