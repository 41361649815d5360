"""requirements/constraints.txt pins what CI tested: every package ``make venv`` installs (the
closure of ``hostdev[dev]``) at the version installed here, within pyproject's ranges, plus
the pip, setuptools and wheel that build hostdev; the Makefile installs from it and a changed
file re-installs."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
FIX = "run `make venv` (the venv differs from the lock) or `make lock` (the lock lacks it)"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(path: Path = CONSTRAINTS) -> dict[str, str]:
    """Canonical name -> exact version; fails on anything that is not a plain ``name==version``."""
    out: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[A-Za-z0-9_.+!-]+", version), f"not an exact pin: {raw!r}"
        assert canonical(name) not in out, f"pinned twice: {name}"
        out[canonical(name)] = version
    return out


def _wanted(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))


def closure() -> dict[str, set[str]]:
    """Every distribution ``pip install -e '.[dev]'`` pulls in (canonical name -> extras)."""
    project = PYPROJECT["project"]
    roots = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    todo = [Requirement(r) for r in roots]
    seen: dict[str, set[str]] = {}
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        extras = set(req.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen.setdefault(name, set()).update(extras)
        for text in metadata.requires(req.name) or ():
            sub = Requirement(text)
            if _wanted(sub, seen[name]):
                todo.append(sub)
    return seen


def test_every_installed_dependency_is_pinned_at_its_installed_version() -> None:
    pins = pinned()
    wrong = {}
    for name in sorted(closure()):
        have = metadata.version(name)
        if pins.get(name) != have:
            wrong[name] = f"installed {have}, pinned {pins.get(name, 'nothing')}"
    assert not wrong, f"{wrong}: {FIX}"


def test_pins_are_within_pyprojects_ranges_and_cover_the_build() -> None:
    pins = pinned()
    project = PYPROJECT["project"]
    ranges = [
        *project["dependencies"],
        *project["optional-dependencies"]["dev"],
        *PYPROJECT["build-system"]["requires"],
    ]
    for text in ranges:
        req = Requirement(text)
        version = pins.get(canonical(req.name))
        assert version is not None, f"{req.name} is not pinned: run `make lock`"
        assert req.specifier.contains(version, prereleases=True), (
            f"{req.name}=={version} is outside pyproject's range {req.specifier}"
        )
    for tool in ("pip", "setuptools", "wheel"):
        assert tool in pins, f"{tool} (used to build the venv) is not pinned"


def test_the_venv_step_installs_from_the_constraints_and_reinstalls_when_they_change() -> None:
    # -n: print, run nothing; -W: as if the constraints had just been edited.
    proc = subprocess.run(
        ["make", "-n", "-W", "requirements/constraints.txt", ".venv/.installed"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    installs = [line for line in proc.stdout.splitlines() if "pip install" in line]
    assert len(installs) == 2, proc.stdout
    assert all("-c requirements/constraints.txt" in line for line in installs)
    assert "--build-constraint requirements/constraints.txt -e '.[dev]'" in installs[1]
    assert installs[0].endswith(" pip")  # the pinned pip first: it knows --build-constraint
