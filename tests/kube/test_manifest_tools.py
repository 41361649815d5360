"""The manifest-check tools for chart tests: kubeconform with offline schemas from the test API
server, helm, and server-side dry-run. Later chart tests build on these fixtures."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes.dynamic.exceptions import UnprocessibleEntityError

from tests.fixtures.kube import Cluster

pytestmark = pytest.mark.kube

DAEMONSET = """\
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  updateStrategy: {type: RollingUpdate, rollingUpdate: {maxUnavailable: 1}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers:
        - name: agent
          image: hostdev:dev
          resources: {limits: {cpu: 1, memory: 128Mi}}
"""

VM_BAD = """\
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {name: vm}
spec:
  template:
    spec:
      domain:
        devices:
          hostDevices: [{name: nic1, deviceName: 710}]
"""


def _kubeconform(binary: Path, location: str, manifest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), "-strict", "-summary", "-schema-location", location, str(manifest)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_kubeconform_offline_schemas(
    kubeconform_bin: Path, kubeconform_schema_location: str, tmp_path: Path
) -> None:
    good = tmp_path / "good.yaml"
    # Integers where OpenAPI v2 says string (IntOrString, Quantity) must pass.
    good.write_text(DAEMONSET, encoding="utf-8")
    result = _kubeconform(kubeconform_bin, kubeconform_schema_location, good)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid: 1, Invalid: 0, Errors: 0, Skipped: 0" in result.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(DAEMONSET.replace("image: hostdev:dev", "image: 7") + "---\n" + VM_BAD)
    result = _kubeconform(kubeconform_bin, kubeconform_schema_location, bad)
    assert result.returncode == 1
    assert "at '/spec/template/spec/containers/0/image': got number, want string" in result.stdout
    assert (
        "at '/spec/template/spec/domain/devices/hostDevices/0/deviceName': got number, want string"
    ) in result.stdout
    assert "Valid: 0, Invalid: 2, Errors: 0, Skipped: 0" in result.stdout


def test_helm_renders_a_chart(helm_bin: Path, tmp_path: Path) -> None:
    chart = tmp_path / "demo"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("image: hostdev:dev\n")
    (chart / "templates" / "ds.yaml").write_text(
        DAEMONSET.replace("hostdev:dev", "{{ .Values.image }}")
    )
    out = subprocess.run(
        [str(helm_bin), "template", "demo", str(chart), "--set", "image=hostdev:1.0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    [ds] = [d for d in yaml.safe_load_all(out) if d]
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == "hostdev:1.0"


def test_server_side_dry_run(kube_apiserver: Cluster, kube_namespace: str) -> None:
    [ds] = kube_apiserver.apply(DAEMONSET, kube_namespace, dry_run=True)
    assert ds["metadata"]["uid"]  # fully processed by the server ...
    apps = kube_apiserver.resource("apps/v1", "DaemonSet")
    assert apps.get(namespace=kube_namespace).items == []  # ... and not stored
    with pytest.raises(UnprocessibleEntityError):
        kube_apiserver.apply(
            DAEMONSET.replace("name: agent\n          image", "name: Agent_1\n          image"),
            kube_namespace,
            dry_run=True,
        )
