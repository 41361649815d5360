"""docs/guide.md stays honest: every shell block says which test runs it (and that test exists)
or why nothing does; the quick start is at most five commands; the README links the guide; and
the guide's own helm install / upgrade lines run, verbatim, against the real test API server."""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client as k8s

from hostdev import cli, cli_apply
from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.testing.fakekernel import FakeKernel
from tests.chart.helmtool import REPO_ROOT, helm
from tests.config.test_executor import AUDIO, GPU, NIC, SPEC, build, drivers
from tests.config.test_executor import run as converge_for_test
from tests.fixtures.kube import Cluster

GUIDE = REPO_ROOT / "docs" / "guide.md"
MARK = re.compile(r"<!--\s*((?:un)?tested:.*?)-->", re.S)
REF = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?")


@dataclass(frozen=True)
class Block:
    line: int
    mark: str | None
    commands: list[str]


def shell_blocks() -> list[Block]:
    lines = GUIDE.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```sh":
            start = i
            body = []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i].strip())
                i += 1
            # the mark is the nearest non-empty line above the fence (an HTML comment)
            above = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            m = MARK.search(above)
            cmds = [c for c in body if c and not c.startswith("#")]
            blocks.append(Block(start + 1, m.group(1) if m else None, cmds))
        i += 1
    return blocks


def block_with(command_start: str) -> Block:
    (b,) = [b for b in shell_blocks() if any(c.startswith(command_start) for c in b.commands)][:1]
    return b


def test_every_shell_block_is_marked_and_its_tests_exist() -> None:
    blocks = shell_blocks()
    assert len(blocks) >= 8
    unmarked = [b.line for b in blocks if b.mark is None]
    assert unmarked == [], "shell blocks without <!-- tested: ... --> or <!-- untested: ... -->"
    for b in blocks:
        assert b.mark is not None
        for path, func in REF.findall(b.mark.split("untested:")[0]):
            file = REPO_ROOT / path
            assert file.is_file(), f"line {b.line}: {path} does not exist"
            if func:
                assert f"def {func}(" in file.read_text(encoding="utf-8"), (
                    f"line {b.line}: {path}::{func}"
                )


def test_quick_start_is_five_commands_or_fewer() -> None:
    quick = block_with("docker build")
    assert len(quick.commands) <= 5
    assert any(c.startswith("helm install ") for c in quick.commands)


def test_readme_links_the_guide() -> None:
    assert "](docs/guide.md)" in (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def guide_command(start: str) -> list[str]:
    (cmd,) = [c for b in shell_blocks() for c in b.commands if c.startswith(start)]
    return shlex.split(cmd.replace("REGISTRY", "registry.example"))


@pytest.fixture(scope="module")
def guide_release(kube_apiserver: Cluster) -> Iterator[tuple[str, str]]:
    argv = guide_command("helm install ")
    name, namespace = argv[2], argv[argv.index("--namespace") + 1]
    out = helm(*argv[1:], kubeconfig=kube_apiserver.kubeconfig)
    # NOTES.txt: what to do next, with this release's real names
    assert "kubectl label node <node> hostdev.io/enabled=true" in out
    assert f"kubectl -n {namespace} exec ds/{name}-agent -- hostdev scan --host-root /host" in out
    try:
        yield name, namespace
    finally:
        helm(
            "uninstall",
            name,
            "--namespace",
            namespace,
            kubeconfig=kube_apiserver.kubeconfig,
            check=False,
        )


@pytest.mark.kube
def test_quick_start_helm_install_runs(
    kube_apiserver: Cluster, guide_release: tuple[str, str]
) -> None:
    name, namespace = guide_release
    apps = k8s.AppsV1Api(kube_apiserver.admin)
    dep = apps.read_namespaced_deployment(f"{name}-operator", namespace)
    assert dep.spec.template.spec.containers[0].image == "registry.example/hostdev:0.1.0"
    ds = apps.read_namespaced_daemon_set(f"{name}-agent", namespace)
    assert ds.spec.template.spec.service_account_name == f"{name}-agent"
    # the names the guide uses later (ds/hostdev-agent, release hostdev) are the real ones
    assert name == "hostdev" and "ds/hostdev-agent" in GUIDE.read_text(encoding="utf-8")


@pytest.mark.kube
def test_upgrade_keeps_the_release(kube_apiserver: Cluster, guide_release: tuple[str, str]) -> None:
    name, namespace = guide_release
    argv = guide_command("helm upgrade ")
    assert argv[2] == name
    helm(*argv[1:], kubeconfig=kube_apiserver.kubeconfig)
    status = helm("status", name, "--namespace", namespace, kubeconfig=kube_apiserver.kubeconfig)
    assert re.search(r"REVISION: 2\b", status)
    dep = k8s.AppsV1Api(kube_apiserver.admin).read_namespaced_deployment(
        f"{name}-operator", namespace
    )
    # --reuse-values kept the install's repository; the tag is the upgrade's
    assert dep.spec.template.spec.containers[0].image == "registry.example/hostdev:0.1.1"


def test_guide_mentions_only_existing_example_files() -> None:
    for ref in set(re.findall(r"examples/[\w.-]+\.yaml", GUIDE.read_text(encoding="utf-8"))):
        assert Path(REPO_ROOT / ref).is_file(), ref


def test_empty_spec_releases_every_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The uninstall section's `hostdev apply` line, through the real CLI, on a fake host whose
    sysfs writes a simulated kernel turns into driver changes (as on a node: the agent bound the
    devices before, remembering their original drivers)."""
    host = build(tmp_path / "host")
    state = tmp_path / "state"
    kernel = FakeKernel(host)
    assert converge_for_test(host, state, SPEC, kernel).exit_code == 0
    assert drivers(host)[GPU] == "vfio-pci"

    (loop,) = [c for b in shell_blocks() for c in b.commands if "hostdev apply" in c]
    script = shlex.split(loop.split(" -- ", 1)[1].removesuffix("; done"))[-1]
    script = (
        script.replace("/tmp/none.yaml", str(tmp_path / "none.yaml"))
        .replace("--host-root /host", f"--host-root {host.root}")
        .replace("/var/lib/hostdev", str(state))
    )
    write_config, apply_cmd = (part.strip() for part in script.split("&&"))
    subprocess.run(["sh", "-c", write_config], check=True)
    argv = shlex.split(apply_cmd)
    assert argv[0] == "hostdev"

    real_converge = cli_apply.converge
    monkeypatch.setattr(
        cli_apply, "converge", lambda *a, **kw: real_converge(*a, io=kernel, settle=0.05, **kw)
    )
    assert cli.main(argv[1:]) == 0
    d = drivers(host)
    assert (d[GPU], d[AUDIO], d[NIC]) == ("nvidia", "snd_hda_intel", "e1000e")
    assert DriverMemory(str(state)).originals == {}
