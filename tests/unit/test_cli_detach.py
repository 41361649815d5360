"""The console command runs its work in a child that reports its exit status as soon as it is
done (hostdev.cli_detach); the kernel-side reason for it is shown in the QEMU tier
(tests/kernel/guest/test_guest_nic.py: scan while a PF's unbind waits for a VF's user)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hostdev.testing.fakesysfs import FakeHost


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-m", "hostdev.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_exit_status_and_output_come_back_from_the_child(tmp_path: Path) -> None:
    h = FakeHost(tmp_path / "root")
    h.add_device("0000:05:00.0", vendor="8086", device="10d3", class_code="020000")
    ok = run_cli("scan", "--host-root", str(h.root))
    assert ok.returncode == 0 and "0000:05:00.0" in ok.stdout
    bad = run_cli("scan", "--host-root", str(tmp_path / "nothing"))
    assert bad.returncode == 1 and "no PCI bus at" in bad.stderr
    usage = run_cli("scan", "--no-such-flag")
    assert usage.returncode == 2 and "unrecognized arguments" in usage.stderr


def test_a_crash_in_the_child_is_reported_as_the_interpreter_would(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from hostdev.cli_detach import run_detached\n"
        "def boom() -> int:\n"
        "    raise RuntimeError('kaputt')\n"
        "sys.exit(run_detached(boom))\n"
    )
    p = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert p.returncode == 1 and "RuntimeError: kaputt" in p.stderr
