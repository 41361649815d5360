"""Real-kernel tier: one host-side test per guest test in tests/kernel/guest, per guest boot.

The guests boot once per session each (fixture ``guest_boots`` in tests/fixtures/kernel.py);
the list of tests is read from the guest modules with ``ast`` at collection, so a guest test
that never ran (crash, timeout, collection error) fails here by name instead of vanishing. A
test marked ``@pytest.mark.igb`` belongs to the boots that have the igb NIC only; every other
test belongs to every boot.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.fixtures.kernel import BOOTS, GUEST_TIMEOUT, Boots

GUEST_DIR = Path(__file__).parent / "guest"


def _marked_igb(node: ast.FunctionDef) -> bool:
    return any(ast.unparse(d).replace(" ", "") == "pytest.mark.igb" for d in node.decorator_list)


def _guest_tests() -> list[tuple[str, str]]:
    """(boot, test function) pairs, in file order, boot by boot."""
    funcs: list[tuple[str, bool]] = []
    for path in sorted(GUEST_DIR.glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        module_igb = any(
            isinstance(n, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)
            and "igb" in ast.unparse(n.value)
            for n in tree.body
        )
        funcs += [
            (n.name, module_igb or _marked_igb(n))
            for n in tree.body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")
        ]
    return [(b.name, f) for b in BOOTS for f, igb in funcs if b.igb or not igb]


@pytest.mark.kernel
@pytest.mark.timeout(2 * GUEST_TIMEOUT + 300)
@pytest.mark.parametrize(("boot", "name"), _guest_tests(), ids=str)
def test_in_real_kernel(boot: str, name: str, guest_boots: Boots) -> None:
    run = guest_boots.get(boot)
    cases = run.cases_for(name)
    if not cases:
        pytest.fail(
            f"guest test {name} did not run in the {boot} guest (rc {run.rc}); "
            f"guest output tail:\n{run.output[-3000:]}"
        )
    bad = [c for c in cases if c.outcome != "passed"]
    assert not bad, "\n\n".join(f"{c.name}: {c.outcome}\n{c.text}" for c in bad) + (
        f"\n({boot} guest run dir: {run.run_dir})"
    )
