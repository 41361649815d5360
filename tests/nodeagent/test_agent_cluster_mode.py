"""``hostdev-node --node-name`` as a process against the real kube-apiserver: the NodeState spec
becomes a served device-plugin resource and a Succeeded status; SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from hostdev.deviceplugin.nodestate.kube import GROUP, PLURAL, VERSION
from hostdev.policy.naming import socket_name
from hostdev.testing import scenarios
from tests.fixtures.kube import Cluster

pytestmark = pytest.mark.kube

GPU = "example.com/a10"


def start_agent(
    tmp_path: Path, plugin_dir: Path, name: str, kubeconfig: Path
) -> subprocess.Popen[str]:
    return subprocess.Popen(
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
            "--kubeconfig",
            str(kubeconfig),
            "--pod-resources-socket",
            str(tmp_path / "no-kubelet.sock"),
            # The DRA front end's kubelet and CDI directories, never the machine's own.
            f"--kubelet-registry-dir={plugin_dir}/reg",
            f"--kubelet-plugins-dir={plugin_dir}/plugins",
            f"--cdi-dir={tmp_path}/cdi",
        ],
        env={**os.environ, "NODE_NAME": name},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_agent(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out


def test_agent_process_in_cluster_mode(kube_apiserver: Cluster, tmp_path: Path) -> None:
    # Already on vfio-pci: the plan has no writes, so the real SysfsIO never touches the tree.
    scenarios.gpu_with_audio(tmp_path / "host")
    name = f"node-{uuid.uuid4().hex[:8]}"
    crd = k8s.CustomObjectsApi(kube_apiserver.admin)
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
    plugin_dir = Path(tempfile.mkdtemp(prefix="dp-", dir="/tmp"))  # short: unix socket paths
    proc = start_agent(tmp_path, plugin_dir, name, kube_apiserver.kubeconfig)
    try:
        deadline = time.monotonic() + 60
        status: dict[str, Any] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            obj: dict[str, Any] = crd.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)  # type: ignore[assignment]
            status = obj.get("status") or {}
            if status.get("syncStatus") == "Succeeded" and (plugin_dir / socket_name(GPU)).exists():
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"agent exited early:\n{proc.communicate()[0]}"
        assert status.get("syncStatus") == "Succeeded", status
        assert status["observedGeneration"] == 1
        gpu = next(d for d in status["devices"] if d["pciAddress"] == "0000:17:00.0")
        assert gpu["resourceName"] == GPU and gpu["health"] == "Healthy"
        # The device-plugin server for the resource is up (its socket is in the plugin dir).
        assert (plugin_dir / socket_name(GPU)).exists()
        # No kubelet here: allocations are unknown, so none are claimed.
        assert "allocations" not in status
        out = stop_agent(proc)
        assert proc.returncode == 0, out
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
        proc = start_agent(tmp_path, plugin_dir, name, down)
        deadline = time.monotonic() + 30
        while not (plugin_dir / socket_name(GPU)).exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "saved resource not served again"
            time.sleep(0.1)
        time.sleep(0.5)
        out = stop_agent(proc)
        assert proc.returncode == 0, out
        assert "serving the 1 saved resources until NodeState" in out
        assert "list/watch failed" in out  # it kept trying to reach the API server
    finally:
        stop_agent(proc)
        crd.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        shutil.rmtree(plugin_dir)
