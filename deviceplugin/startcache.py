"""The agent's start-up: the methods ``dataclasses`` generates, compiled once at install time.

Python 3.11's ``dataclasses`` writes the source text of each generated method (a frozen class
has six: ``__init__``, ``__repr__``, ``__eq__``, ``__hash__``, ``__setattr__``,
``__delattr__``) and compiles it with ``exec``, at every start. For the 26 classes on the way to
the first ListAndWatch answer that was ~16-26 ms of a ~0.13 s start on a 2-core machine (issue
15). The image compiles them once, as pip compiles the modules' bytecode: ``python -m
hostdev.deviceplugin.startcache`` (the Dockerfile's builder runs it) imports :data:`START_PATH`
and writes every generated method's code object, keyed by its whole source text, into a file
beside hostdev's bytecode. At start the agent hands ``dataclasses`` a lookup in place of
``exec`` (:func:`install`): a text found in the file runs the code compiled from exactly that
text; any other (a class not in the file) is compiled as ``dataclasses`` would. Once the
kubelet holds the first lists the lookup is removed again (:func:`uninstall`).

The file names the interpreter it was written by (``sys.hexversion`` and its bytecode tag); a
file of another interpreter, or one that cannot be read, is ignored: the start is then as
without it.
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib
import marshal
import os
import sys
from collections.abc import Iterable
from types import CodeType
from typing import Any

# The modules the agent imports before its first ListAndWatch answer, in either mode
# (tests/deviceplugin/test_start_imports.py keeps heavy ones out; the cluster-mode agent test in
# tests/nodeagent/test_agent_cluster_mode.py checks that every dataclass made on the way to its
# first serve finds its methods in the file).
START_PATH = (
    "hostdev.deviceplugin.agent",
    "hostdev.deviceplugin.flags",
    "hostdev.deviceplugin.manager",
    "hostdev.deviceplugin.metrics",
    "hostdev.deviceplugin.resources",
    "hostdev.host.sysfs",
    "hostdev.deviceplugin.nodestate.first",
)
_FORMAT = 1


def cache_file() -> str:
    """Where the file lives: in hostdev's ``__pycache__``, or under ``sys.pycache_prefix`` when
    that is set, where importlib puts the package's bytecode then."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    name = f"dataclasses.{sys.implementation.cache_tag}.bin"
    if sys.pycache_prefix:
        return os.path.join(sys.pycache_prefix, package.lstrip(os.sep), name)
    return os.path.join(package, "__pycache__", name)


def _header() -> tuple[int, int, str | None]:
    return (_FORMAT, sys.hexversion, sys.implementation.cache_tag)


def _compile(source: str) -> CodeType:
    # dont_inherit: the flags dataclasses' own exec compiles with (that module has no
    # __future__ imports; this one has, and they must not reach the generated methods).
    return compile(source, "<string>", "exec", dont_inherit=True)


class _Lookup:
    """Stands in for ``exec`` in the ``dataclasses`` module; ``learn``: a text compiled is added
    to the table (how :func:`build` fills it)."""

    def __init__(self, table: dict[str, object], *, learn: bool = False) -> None:
        self.table = table
        self.learn = learn
        self.hits = 0
        self.misses = 0

    def __call__(
        self, source: Any, globals: dict[str, Any] | None = None, locals: Any = None
    ) -> None:
        code = self.table.get(source) if isinstance(source, str) else None
        if isinstance(code, CodeType):
            self.hits += 1
        else:
            self.misses += 1
            code = source
            if isinstance(source, str):
                code = _compile(source)
                if self.learn:
                    self.table[source] = code
        builtins.exec(code, globals, locals)  # noqa: S102  (what dataclasses itself does)


def _load(path: str) -> dict[str, object] | None:
    try:
        with open(path, "rb") as f:
            # The image's own file, written at build time beside the bytecode (which is
            # marshal data too) and no more writable than the package.
            header, table = marshal.load(f)  # noqa: S302
    except (OSError, EOFError, ValueError, TypeError):
        return None
    if header != _header() or not isinstance(table, dict):
        return None
    return table


def install(path: str | None = None) -> bool:
    """Let ``dataclasses`` take its methods from the file (False: none usable, nothing done)."""
    if "exec" in vars(dataclasses):
        return False  # installed already (or someone else's replacement: leave it)
    table = _load(path or cache_file())
    if table is None:
        return False
    vars(dataclasses)["exec"] = _Lookup(table)
    return True


def uninstall() -> tuple[int, int] | None:
    """Give ``dataclasses`` its ``exec`` back; (methods found in the file, methods compiled),
    or None when :func:`install` had not put the lookup there."""
    lookup = vars(dataclasses).get("exec")
    if not isinstance(lookup, _Lookup):
        return None
    del vars(dataclasses)["exec"]
    return lookup.hits, lookup.misses


def build(modules: Iterable[str] = START_PATH, path: str | None = None) -> tuple[str, int]:
    """Import ``modules`` and write the code of every method ``dataclasses`` generates on the
    way; returns (the file, how many). Classes made before this call are not seen: run it in a
    fresh interpreter (``python -m hostdev.deviceplugin.startcache``)."""
    modules = tuple(modules)
    already = sorted(m for m in modules if m in sys.modules)
    if already:
        raise RuntimeError(f"already imported, their classes would be missed: {already}")
    if "exec" in vars(dataclasses):
        raise RuntimeError("dataclasses.exec is already replaced")
    learner = _Lookup({}, learn=True)
    vars(dataclasses)["exec"] = learner
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        uninstall()
    target = path or cache_file()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        marshal.dump((_header(), learner.table), f)
    os.replace(tmp, target)
    return target, len(learner.table)


def main() -> None:
    target, n = build()
    print(f"{n} generated dataclass methods of the agent's start path -> {target}")


if __name__ == "__main__":
    main()
