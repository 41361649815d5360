"""The agent's start-up cache of generated dataclass methods (hostdev.deviceplugin.startcache):
a class made with it is the class made without it, and a file it cannot trust changes nothing.
Each case runs in a fresh interpreter: the cache is only ever written and used there."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from hostdev.deviceplugin import startcache

# Every kind of field the agent's classes use: defaults, factories, keyword-only, ClassVar,
# InitVar, string annotations (this module's own __future__ import), slots, frozen, ordering.
SAMPLE = """
from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class Address:
    domain: int
    bus: int
    slot: int = 0
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, order=True)
class Unit:
    name: str
    members: frozenset[int] = field(default_factory=frozenset)
    limit: ClassVar[int] = 3
    scale: InitVar[int] = 1
    weight: int = field(default=0, compare=False)

    def __post_init__(self, scale: int) -> None:
        object.__setattr__(self, "weight", self.weight * scale)


@dataclass(kw_only=True)
class Options:
    verbose: bool = False
    names: list[str] = field(default_factory=list)
"""

PROBE = """
import dataclasses, importlib, json, sys
from hostdev.deviceplugin import startcache
installed = startcache.install(sys.argv[1]) if sys.argv[1] else False
m = importlib.import_module("sample")
counts = startcache.uninstall()
a = m.Address(1, 2, tags=("x",))
u = m.Unit("u", frozenset({1}), scale=2, weight=3)
out = {
    "installed": installed,
    "counts": counts,
    "exec_restored": "exec" not in vars(dataclasses),
    "repr": [repr(a), repr(u), repr(m.Options(verbose=True))],
    "eq": [a == m.Address(1, 2, 0, ("x",)), a == m.Address(1, 3), u < m.Unit("v")],
    "hash": hash(a) == hash(m.Address(1, 2, tags=("x",))),
    "weight": u.weight,
    "frozen": None,
    "annotations": {
        c.__name__: {k: str(v) for k, v in c.__init__.__annotations__.items()}
        for c in (m.Address, m.Unit, m.Options)
    },
    "code": {
        f"{c.__name__}.{f}": getattr(c, f).__code__.co_code.hex()
        for c in (m.Address, m.Unit, m.Options)
        for f in ("__init__", "__repr__", "__eq__")
    },
}
try:
    a.bus = 5
except dataclasses.FrozenInstanceError as e:
    out["frozen"] = type(e).__name__
print(json.dumps(out))
"""


def _run(code: str, *args: str, path: Path, env: dict[str, str] | None = None) -> str:
    # From /: the checkout's top-level operator/ would shadow the standard library's module.
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd="/",
        env={"PYTHONPATH": str(path), **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _sample(tmp_path: Path) -> Path:
    (tmp_path / "sample.py").write_text(textwrap.dedent(SAMPLE), encoding="utf-8")
    return tmp_path


def _build(tmp_path: Path, target: Path) -> int:
    code = (
        "import sys\nfrom hostdev.deviceplugin import startcache\n"
        "print(startcache.build(['sample'], sys.argv[1])[1])\n"
    )
    return int(_run(code, str(target), path=_sample(tmp_path)))


def _probe(tmp_path: Path, cache: Path | None) -> dict[str, object]:
    out: dict[str, object] = json.loads(
        _run(PROBE, str(cache) if cache else "", path=_sample(tmp_path))
    )
    return out


def test_classes_from_the_cache_are_the_classes_without_it(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "dataclasses.bin"
    written = _build(tmp_path, cache)
    assert written >= 9  # at least __init__, __repr__ and __eq__ of each of the three
    with_cache, without = _probe(tmp_path, cache), _probe(tmp_path, None)
    assert with_cache["installed"] is True and without["installed"] is False
    assert with_cache["counts"] == [written, 0]  # every generated method came from the file
    assert without["counts"] is None
    for key in ("repr", "eq", "hash", "weight", "frozen", "annotations", "code"):
        assert with_cache[key] == without[key], key
    assert with_cache["frozen"] == "FrozenInstanceError"
    assert with_cache["eq"] == [True, False, True]
    assert with_cache["weight"] == 6
    # The generated __init__'s annotations are evaluated as dataclasses' own exec does: this
    # module's `from __future__ import annotations` must not reach them.
    assert with_cache["annotations"]["Address"]["domain"] == "int"  # type: ignore[index]
    assert with_cache["exec_restored"] is True


def test_a_changed_class_is_compiled_as_usual(tmp_path: Path) -> None:
    cache = tmp_path / "dataclasses.bin"
    written = _build(tmp_path, cache)
    src = (tmp_path / "sample.py").read_text(encoding="utf-8")
    # Another field: its __init__, __repr__ and __eq__ texts are new, the other classes' not.
    tags = "    tags: tuple[str, ...] = ()"
    (tmp_path / "sample.py").write_text(src.replace(tags, f"{tags}\n    n: int = 1"), "utf-8")
    out: dict[str, object] = json.loads(_run(PROBE, str(cache), path=tmp_path))
    hits, misses = out["counts"]  # type: ignore[misc]
    assert misses >= 3 and hits + misses >= written
    assert out["repr"][0] == "Address(domain=1, bus=2, slot=0, tags=('x',), n=1)"  # type: ignore[index]


def test_a_file_it_cannot_trust_changes_nothing(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    _build(tmp_path, good)
    data = good.read_bytes()
    bad = {
        "missing": None,
        "truncated": data[: len(data) // 2],
        "garbage": b"\x00not marshal",
        "another interpreter": None,
    }
    other = (
        "import marshal, sys\nfrom hostdev.deviceplugin import startcache\n"
        "h, t = marshal.loads(open(sys.argv[1], 'rb').read())\n"
        "open(sys.argv[2], 'wb').write(marshal.dumps(((h[0], h[1] + 1, h[2]), t)))\n"
    )
    _run(other, str(good), str(tmp_path / "another interpreter"), path=tmp_path)
    for name, content in bad.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        out = _probe(tmp_path, path)
        assert out["installed"] is False and out["counts"] is None, name
        assert out["exec_restored"] is True, name


def test_install_is_undone_and_build_needs_a_fresh_interpreter(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    _build(tmp_path, good)
    code = (
        "import sys, dataclasses, sample\nfrom hostdev.deviceplugin import startcache\n"
        "first, second = startcache.install(sys.argv[1]), startcache.install(sys.argv[1])\n"
        "print(first, second, startcache.uninstall(), startcache.uninstall(),"
        " 'exec' in vars(dataclasses))\n"
        "try:\n    startcache.build(['sample'], sys.argv[1] + '.new')\n"
        "except RuntimeError as e:\n    print(e)\n"
    )
    out = _run(code, str(good), path=_sample(tmp_path)).splitlines()
    assert out[0] == "True False (0, 0) None False"
    assert out[1] == "already imported, their classes would be missed: ['sample']"


def test_the_file_sits_with_the_package_bytecode(tmp_path: Path) -> None:
    code = "from hostdev.deviceplugin import startcache\nprint(startcache.cache_file())\n"
    package = Path(startcache.__file__).parent.parent
    tag = sys.implementation.cache_tag
    assert _run(code, path=tmp_path).strip() == str(
        package / "__pycache__" / f"dataclasses.{tag}.bin"
    )
    prefixed = _run(code, path=tmp_path, env={"PYTHONPYCACHEPREFIX": str(tmp_path / "pyc")})
    assert prefixed.strip() == str(
        tmp_path / "pyc" / str(package).lstrip("/") / f"dataclasses.{tag}.bin"
    )
