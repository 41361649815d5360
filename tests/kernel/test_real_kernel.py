"""Real-kernel tier: one host-side test per guest test in tests/kernel/guest.

The guest boots once per session (fixture ``guest_run`` in tests/fixtures/kernel.py); the list
of tests is read from the guest modules with ``ast`` at collection, so a guest test that never
ran (crash, timeout, collection error) fails here by name instead of vanishing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.fixtures.kernel import GUEST_TIMEOUT, GuestRun

GUEST_DIR = Path(__file__).parent / "guest"


def _guest_test_names() -> list[str]:
    names = []
    for path in sorted(GUEST_DIR.glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        names += [
            n.name
            for n in tree.body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")
        ]
    return names


@pytest.mark.kernel
@pytest.mark.timeout(GUEST_TIMEOUT + 180)
@pytest.mark.parametrize("name", _guest_test_names())
def test_in_real_kernel(name: str, guest_run: GuestRun) -> None:
    cases = guest_run.cases_for(name)
    if not cases:
        pytest.fail(
            f"guest test {name} did not run in the guest (rc {guest_run.rc}); "
            f"guest output tail:\n{guest_run.output[-3000:]}"
        )
    bad = [c for c in cases if c.outcome != "passed"]
    assert not bad, "\n\n".join(f"{c.name}: {c.outcome}\n{c.text}" for c in bad) + (
        f"\n(guest run dir: {guest_run.run_dir})"
    )
