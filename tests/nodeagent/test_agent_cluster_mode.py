"""``hostdev-node --node-name`` as a process against the real kube-apiserver: the NodeState spec
becomes a served device-plugin resource and a Succeeded status; SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from hostdev.deviceplugin.nodestate.kube import GROUP, PLURAL, VERSION
from hostdev.policy.naming import socket_name
from hostdev.policy.runs import expand
from hostdev.testing import scenarios
from tests.fixtures.kube import Cluster

pytestmark = pytest.mark.kube

GPU = "example.com/a10"


class AgentProcess:
    """``hostdev-node`` as a process; its output is read as it comes (a reader thread), so a
    test can wait for a log line instead of sleeping and hoping it was printed."""

    def __init__(
        self,
        tmp_path: Path,
        plugin_dir: Path,
        name: str,
        kubeconfig: Path | None,
        env: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        credentials = ["--kubeconfig", str(kubeconfig)] if kubeconfig is not None else []
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "hostdev-node"),
                "--host-root",
                str(tmp_path / "host"),
                "--plugin-dir",
                str(plugin_dir),
                "--state-dir",
                str(tmp_path / "state"),
                "--metrics-port",
                "0",
                "--no-uevents",
                *credentials,
                "--pod-resources-socket",
                str(tmp_path / "no-kubelet.sock"),
                # The DRA front end's kubelet and CDI directories, never the machine's own.
                f"--kubelet-registry-dir={plugin_dir}/reg",
                f"--kubelet-plugins-dir={plugin_dir}/plugins",
                f"--cdi-dir={tmp_path}/cdi",
                *extra,
            ],
            env={**{k: v for k, v in os.environ.items() if k != "KUBECONFIG"}, "NODE_NAME": name}
            | (env or {}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._lines: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self._lines.append(line)
                self._cv.notify_all()

    @property
    def output(self) -> str:
        with self._cv:
            return "".join(self._lines)

    def wait_for_line(self, text: str, timeout: float = 60.0) -> None:
        """Until a line containing ``text`` was printed (fails if the agent exits first)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not any(text in line for line in self._lines):
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    pytest.fail(f"the agent did not log {text!r}; its output:\n{self.output}")
                self._cv.wait(min(left, 0.5))

    def stop(self) -> str:
        """SIGTERM, wait for the exit; returns everything it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
        return self.output


def create_gpu_node_state(crd: k8s.CustomObjectsApi, name: str) -> None:
    """NodeState ``name`` asking for the GPU of scenarios.gpu_with_audio as resource GPU."""
    crd.create_cluster_custom_object(
        GROUP,
        VERSION,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "PassthroughNodeState",
            "metadata": {"name": name},
            "spec": {"devices": [{"pciAddress": "0000:17:00.0", "resourceName": GPU}]},
        },
    )


def synced_status(
    crd: k8s.CustomObjectsApi, name: str, agent: AgentProcess, served: Path | None = None
) -> dict[str, Any]:
    """NodeState ``name``'s status once it says Succeeded (and the plugin socket ``served``
    exists, if given), or the last one seen when the agent exits or 60 s pass."""
    deadline = time.monotonic() + 60
    status: dict[str, Any] = {}
    while time.monotonic() < deadline and agent.proc.poll() is None:
        obj: dict[str, Any] = crd.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)  # type: ignore[assignment]
        status = obj.get("status") or {}
        if status.get("syncStatus") == "Succeeded" and (served is None or served.exists()):
            break
        time.sleep(0.2)
    return status


def test_agent_process_in_cluster_mode(kube_apiserver: Cluster, tmp_path: Path) -> None:
    # Already on vfio-pci: the plan has no writes, so the real SysfsIO never touches the tree.
    scenarios.gpu_with_audio(tmp_path / "host")
    name = f"node-{uuid.uuid4().hex[:8]}"
    crd = k8s.CustomObjectsApi(kube_apiserver.admin)
    create_gpu_node_state(crd, name)
    plugin_dir = Path(tempfile.mkdtemp(prefix="dp-", dir="/tmp"))  # short: unix socket paths
    agent = AgentProcess(tmp_path, plugin_dir, name, kube_apiserver.kubeconfig)
    try:
        status = synced_status(crd, name, agent, plugin_dir / socket_name(GPU))
        assert agent.proc.poll() is None, f"agent exited early:\n{agent.stop()}"
        assert status.get("syncStatus") == "Succeeded", status
        assert status["observedGeneration"] == 1
        gpu = next(d for d in expand(status["devices"]) if d["pciAddress"] == "0000:17:00.0")
        assert gpu["resourceName"] == GPU and gpu["health"] == "Healthy"
        # The device-plugin server for the resource is up (its socket is in the plugin dir).
        assert (plugin_dir / socket_name(GPU)).exists()
        # No kubelet here: allocations are unknown, so none are claimed.
        assert "allocations" not in status
        out = agent.stop()
        assert agent.proc.returncode == 0, out
        assert f"cluster mode: applying PassthroughNodeState {name}" in out

        # Restart while the API server cannot be reached: the resources served before the
        # restart are served again at once (running VMs' pods stay admitted).
        (plugin_dir / socket_name(GPU)).unlink(missing_ok=True)
        down = tmp_path / "unreachable.kubeconfig"
        down.write_text(
            kube_apiserver.kubeconfig.read_text().replace(
                kube_apiserver.server, "https://127.0.0.1:9"
            )
        )
        agent = AgentProcess(tmp_path, plugin_dir, name, down)
        deadline = time.monotonic() + 30
        while not (plugin_dir / socket_name(GPU)).exists() and agent.proc.poll() is None:
            assert time.monotonic() < deadline, "saved resource not served again"
            time.sleep(0.1)
        agent.wait_for_line("serving the 1 saved resources until NodeState")
        agent.wait_for_line("list/watch failed")  # it keeps trying to reach the API server
        out = agent.stop()
        assert agent.proc.returncode == 0, out
    finally:
        agent.stop()
        crd.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        shutil.rmtree(plugin_dir)


def test_agent_process_with_in_cluster_credentials(kube_apiserver: Cluster, tmp_path: Path) -> None:
    """The DaemonSet's way in: no kubeconfig, the pod's service-account token and CA (a
    directory like /var/run/secrets/kubernetes.io/serviceaccount) and
    KUBERNETES_SERVICE_HOST/PORT."""
    scenarios.gpu_with_audio(tmp_path / "host")
    name = f"node-{uuid.uuid4().hex[:8]}"
    crd = k8s.CustomObjectsApi(kube_apiserver.admin)
    create_gpu_node_state(crd, name)
    sa = tmp_path / "serviceaccount"
    pod_env = kube_apiserver.pod_credentials(sa)
    # The start-up cache as the image has it (here under a bytecode prefix of its own): every
    # dataclass on the way to the first serve must find its generated methods there.
    pod_env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")
    subprocess.run(
        [sys.executable, "-m", "hostdev.deviceplugin.startcache"],
        cwd="/",  # the checkout's operator/ would shadow the standard library's module
        env=os.environ | pod_env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    plugin_dir = Path(tempfile.mkdtemp(prefix="dp-", dir="/tmp"))
    agent = AgentProcess(
        tmp_path,
        plugin_dir,
        name,
        None,
        env=pod_env,
        extra=(f"--service-account-dir={sa}", "--log-level=DEBUG"),
    )
    try:
        status = synced_status(crd, name, agent)
        assert agent.proc.poll() is None, f"agent exited early:\n{agent.stop()}"
        assert status.get("syncStatus") == "Succeeded", status
        out = agent.stop()
        assert agent.proc.returncode == 0, out
        assert f"cluster mode: applying PassthroughNodeState {name}" in out
        cache = re.search(r"start-up cache: (\d+) generated methods found, (\d+) compiled", out)
        assert cache is not None, out
        assert int(cache[1]) >= 6 * 20 and cache[2] == "0", cache[0]
    finally:
        agent.stop()
        crd.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        shutil.rmtree(plugin_dir)


def test_agent_without_credentials_says_what_is_missing(tmp_path: Path) -> None:
    """Cluster mode with neither a kubeconfig nor a usable service account: exit 2, and the
    message says what is missing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "KUBECONFIG"))}

    def run(extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(Path(sys.executable).parent / "hostdev-node"),
                f"--host-root={tmp_path}",
                f"--state-dir={tmp_path / 'state'}",
                f"--plugin-dir={tmp_path / 'dp'}",
                "--node-name=n1",
                f"--service-account-dir={tmp_path / 'no-sa'}",
            ],
            env=env | extra_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    proc = run({})
    assert proc.returncode == 2, proc.stderr
    assert "KUBERNETES_SERVICE_HOST/PORT unset" in proc.stderr, proc.stderr
    proc = run({"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"})
    assert proc.returncode == 2, proc.stderr
    assert f"no service account token at {tmp_path / 'no-sa' / 'token'}" in proc.stderr
