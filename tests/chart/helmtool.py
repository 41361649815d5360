"""Running helm on the chart and reading what it renders (shared by the chart tests)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.fixtures.tiers import helm_path

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "hostdev"


def helm(*args: str | Path, kubeconfig: Path | None = None, check: bool = True) -> str:
    """Run helm; a failure raises with helm's own message (it says which value is wrong)."""
    cmd = [str(helm_path()), *map(str, args)]
    if kubeconfig is not None:
        cmd += ["--kubeconfig", str(kubeconfig)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise HelmError(cmd, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


class HelmError(RuntimeError):
    def __init__(self, cmd: Sequence[str], rc: int, stdout: str, stderr: str) -> None:
        super().__init__(f"{' '.join(cmd)} exited {rc}:\n{stderr}{stdout[-2000:]}")
        self.stderr = stderr


def set_args(values: Mapping[str, Any]) -> list[str]:
    """--set-json for each dotted key (JSON keeps types: true, 2, "x", lists)."""
    out: list[str] = []
    for key, value in values.items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


def template(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = "hd",
    namespace: str = "hostdev-system",
    include_crds: bool = False,
) -> str:
    args: list[str | Path] = ["template", release, CHART, "--namespace", namespace]
    if include_crds:
        args.append("--include-crds")
    return helm(*args, *set_args(values or {}))


def render(values: Mapping[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """The rendered objects (templates only unless include_crds=True)."""
    return [d for d in yaml.safe_load_all(template(values, **kwargs)) if d]


def find(docs: Iterable[Mapping[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(hits) == 1, (
        f"expected one {kind} *{name_suffix}, got {[h['metadata']['name'] for h in hits]}"
    )
    return dict(hits[0])
