"""``hostdev-node --node-name`` as a process against the real kube-apiserver: the NodeState spec
becomes a served device-plugin resource and a Succeeded status; SIGTERM stops it cleanly."""

from __future__ import annotations

import os
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
    agent = Path(sys.executable).parent / "hostdev-node"
    proc = subprocess.Popen(
        [
            str(agent),
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
            str(kube_apiserver.kubeconfig),
            "--pod-resources-socket",
            str(tmp_path / "no-kubelet.sock"),
        ],
        env={**os.environ, "NODE_NAME": name},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        crd.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        for p in plugin_dir.iterdir():
            p.unlink()
        plugin_dir.rmdir()
    assert proc.returncode == 0, out
    assert f"cluster mode: applying PassthroughNodeState {name}" in out
