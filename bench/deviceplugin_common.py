"""Shared bits of the device-plugin benchmarks: cached fake nodes, the agent's interpreter,
the kubelet harness, stats, memory and the load average.

Building a 16x256 fake node with :mod:`hostdev.testing.fakesysfs` takes minutes (the builder
re-syncs every /dev/vfio node on each bind), so built trees are cached under
``~/.cache/hostdev/bench-trees`` and copied per run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

# The repository root holds tests/ (kubelet simulator); append, never prepend: the top-level
# operator/ folder would shadow the standard library's operator module.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from hostdev.testing.scenarios import sriov_scale  # noqa: E402

HOSTDEV_CACHE = Path(os.environ.get("HOSTDEV_CACHE", Path.home() / ".cache" / "hostdev"))
CACHE = HOSTDEV_CACHE / "bench-trees"
SCALES = ((8, 128), (16, 256))


def node_tree(pfs: int, vfs: int) -> Path:
    """A fresh copy of the cached ``pfs`` x ``vfs`` SR-IOV node (built on first use)."""
    src = CACHE / f"sriov-{pfs}x{vfs}"
    if not (src / ".complete").exists():
        shutil.rmtree(src, ignore_errors=True)
        t = time.perf_counter()
        print(f"building the {pfs}x{vfs} fake node (cached afterwards)...", flush=True)
        sriov_scale(src, pfs=pfs, vfs=vfs)
        (src / ".complete").write_text("")
        print(f"  built in {time.perf_counter() - t:.0f}s", flush=True)
    dst = Path(tempfile.mkdtemp(prefix="hb-", dir="/tmp"))
    shutil.copytree(src, dst / "host", symlinks=True)
    return dst


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def fmt_ms(values: list[float]) -> str:
    return (
        f"p50 {pct(values, 50) * 1e3:.3f} ms  p99 {pct(values, 99) * 1e3:.3f} ms  "
        f"max {max(values) * 1e3:.3f} ms  (n={len(values)}, mean "
        f"{statistics.fmean(values) * 1e3:.3f} ms)"
    )


def _status_mib(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib(pid: int) -> float:
    return _status_mib(pid, "VmRSS")


def peak_rss_mib(pid: int) -> float:
    """The process's high-water mark of resident memory (VmHWM) so far."""
    return _status_mib(pid, "VmHWM")


def load() -> float:
    """The 1-minute load average (printed beside every figure: the machine is shared)."""
    return os.getloadavg()[0]


def harness_binary() -> Path:
    """tests/tools/kubelet-harness as built by scripts/setup.d/20-go-tools.sh."""
    path = Path(os.environ.get("HOSTDEV_TOOLS_BIN", HOSTDEV_CACHE / "bin")) / "kubelet-harness"
    if not path.is_file():
        raise SystemExit(f"{path} missing: run scripts/setup.d/20-go-tools.sh")
    return path


# Parts of the stdlib the agent never imports (compiling them would only cost time).
_NOT_IMPORTED = r"/(test|tests|idlelib|tkinter|turtledemo|lib2to3|ensurepip|pydoc_data)/"


def agent_python(kind: str) -> tuple[str, dict[str, str]]:
    """The interpreter the agent runs under, and its environment. ``dev``: this venv as it is
    (the editable install's import hook costs every start ~20 ms; with
    PYTHONDONTWRITEBYTECODE set, as in this workplace, every module is compiled at every
    start). ``installed``: what the image runs: a throw-away venv whose path entries are this
    checkout and this venv's site-packages, laid out as a regular install, with compiled
    bytecode (under the cache, PYTHONPYCACHEPREFIX; compiled once here, as pip does when it
    installs) and the agent's start-up cache (hostdev.deviceplugin.startcache, as the image's
    builder writes it). Built once per checkout."""
    env = dict(os.environ)
    if kind == "dev":
        return sys.executable, env
    key = hashlib.sha256(f"{REPO}:{sys.prefix}".encode()).hexdigest()[:12]
    venv = HOSTDEV_CACHE / "bench-python" / key
    python = venv / "bin" / "python"
    if not python.exists():
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-I", "-m", "venv", "--without-pip", str(venv)], check=True)
        src = venv / "src"
        src.mkdir()
        (src / "hostdev").symlink_to(REPO / "hostdev")
        site = Path(
            subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
        (site / "hostdev-bench.pth").write_text(
            f"{venv / 'src'}\n{sysconfig.get_paths()['purelib']}\n", encoding="utf-8"
        )
    _console_script(python)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(venv / "pycache")
    marker = venv / "pycache" / ".libraries-compiled"
    if not marker.exists():
        # The prefix hides the stdlib's own __pycache__: without this, the first start on a
        # fresh machine compiles every stdlib and site-packages module it imports (seen: 1.24 s
        # and 38.9 MiB instead of 0.14-0.20 s and 25 MiB), which an installed image never does.
        paths = sysconfig.get_paths()
        libs = [paths["stdlib"], paths["purelib"]]
        subprocess.run(
            [str(python), "-m", "compileall", "-q", "-j0", "-x", _NOT_IMPORTED, *libs],
            check=False,  # a module that does not compile (a Python 2 leftover) is never imported
            env=env,
            stdout=subprocess.DEVNULL,
            cwd="/",
        )
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    subprocess.run(
        [str(python), "-m", "compileall", "-q", str(venv / "src" / "hostdev")],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        cwd="/",  # -m puts the working directory first: the checkout's operator/ would shadow
    )
    # As the image's builder does after pip's install: the start path's dataclass methods.
    subprocess.run(
        [str(python), "-m", "hostdev.deviceplugin.startcache"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        cwd="/",
    )
    return str(python), env


def _console_script(python: Path) -> None:
    """``hostdev-node`` beside ``python``, as pip writes the console script the image runs
    (pyproject's ``[project.scripts]``): it imports the agent's ``main`` directly, without
    ``python -m``'s runpy (a few ms of every start)."""
    script = python.parent / "hostdev-node"
    text = (
        f"#!{python}\nimport sys\nfrom hostdev.deviceplugin.agent import main\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n"
    )
    if not script.exists() or script.read_text(encoding="utf-8") != text:
        script.write_text(text, encoding="utf-8")
        script.chmod(0o755)


def agent_command(python: str) -> list[str]:
    """How the agent is started under ``python`` (an agent_python interpreter): its
    ``hostdev-node`` console script, as in the image."""
    return [str(Path(python).parent / "hostdev-node")]


RESOURCE = "example.com/e810_vf"


def write_config(workdir: Path) -> Path:
    cfg = workdir / "resources.yaml"
    cfg.write_text(f"- resourceName: {RESOURCE}\n  selector: {{devices: ['1889']}}\n")
    return cfg


def agent_argv(workdir: Path, *extra: str) -> list[str]:
    """``hostdev-node`` (this venv's console script) on the fake node, talking to the
    simulator in ``workdir/dp``."""
    return [
        *agent_command(sys.executable),
        f"--host-root={workdir / 'host'}",
        f"--plugin-dir={workdir / 'dp'}",
        f"--state-dir={workdir / 'state'}",
        f"--config={write_config(workdir)}",
        "--metrics-port=0",
        "--log-level=WARNING",
        *extra,
    ]
