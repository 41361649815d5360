"""Just enough of the Dockerfile and .dockerignore formats to replay the image's Python layer
outside Docker (no engine runs here): the builder stage's COPY and RUN instructions."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    stage: str  # the stage's "AS" name, or its index as text
    op: str
    args: str


def instructions(dockerfile: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    stage, index, buf = "", -1, ""
    for raw in dockerfile.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        text, buf = buf + line, ""
        op, _, args = text.partition(" ")
        op = op.upper()
        if op == "FROM":
            index += 1
            m = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            stage = m.group(1) if m else str(index)
        out.append(Instruction(stage, op, args.strip()))
    return out


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus **) as a regex over relative paths."""
    rx, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            rx += ".*"
            i += 2
            if i < len(pattern) and pattern[i] == "/":
                i += 1
                rx = rx[:-2] + "(?:.*/)?"
            continue
        rx += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(rx + r"\Z")


def ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for negated, rx in rules:
        if any(rx.match(c) for c in candidates):
            verdict = not negated
    return verdict


def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _pattern_regex(line.lstrip("!").strip("/"))))
    return rules


def build_context(repo: Path, dest: Path) -> list[str]:
    """Copy what `docker build` would send (symlinks kept as links); returns the files sent.
    An ignored directory is not entered when no "!" rule names anything inside it."""
    rules = dockerignore_rules(repo / ".dockerignore")
    negations = [rx.pattern for neg, rx in rules if neg]
    sent = []
    for root, dirs, files in os.walk(repo):
        rel_root = Path(root).relative_to(repo).as_posix()
        rel_root = "" if rel_root == "." else rel_root + "/"
        keep = []
        for d in dirs:
            rel = rel_root + d
            if (repo / rel).is_symlink():
                files.append(d)  # sent as a link, not followed
            elif not ignored(rel, rules) or any(
                n.startswith(re.escape(rel + "/")[:-1]) for n in negations
            ):
                keep.append(d)
        dirs[:] = keep
        for f in files:
            rel = rel_root + f
            if ignored(rel, rules):
                continue
            src, target = repo / rel, dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                target.symlink_to(src.readlink())
            else:
                shutil.copy2(src, target)
            sent.append(rel)
    return sent
