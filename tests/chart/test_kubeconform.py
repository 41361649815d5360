"""`helm template | kubeconform -strict` for the default and the fullest value sets, against
schemas made from the real test API server's OpenAPI document and the chart's own CRDs."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.helmtool import CHART, template
from tests.chart.jsonschemas import LOCATION, write_builtin_schemas, write_crd_schemas
from tests.fixtures.kube import Cluster
from tests.fixtures.tiers import kubeconform_path

pytestmark = pytest.mark.kube

# ServiceMonitor: prometheus-operator's CRD is not part of this project (nor vendored), so
# there is no schema to check it against offline; its shape is asserted in test_render.py.
SKIP_KINDS = "ServiceMonitor"

FULL_VALUES: dict[str, Any] = {
    "operator.replicas": 2,
    "metrics.serviceMonitor.enabled": True,
    "operator.extraEnv": [{"name": "X", "value": "1"}],
    "operator.priorityClassName": "system-cluster-critical",
    "imagePullSecrets": [{"name": "regcred"}],
    "agent.logLevel": "debug",
    "agent.hostNetwork": True,
}


@pytest.fixture(scope="module")
def schema_dir(kube_apiserver: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("schemas")
    req = urllib.request.Request(
        f"{kube_apiserver.server}/openapi/v2",
        headers={"Authorization": f"Bearer {kube_apiserver.admin_token}"},
    )
    ctx = ssl.create_default_context(cafile=str(kube_apiserver.ca_cert))
    with urllib.request.urlopen(req, context=ctx, timeout=60) as resp:
        builtin = write_builtin_schemas(json.load(resp), out)
    crds = [yaml.safe_load(p.read_text()) for p in sorted((CHART / "crds").glob("*.yaml"))]
    custom = write_crd_schemas(crds, out)
    assert (
        "deployment_apps_v1.json" in builtin
        and "validatingadmissionpolicy_admissionregistration.k8s.io_v1.json" in builtin
    )
    assert "passthroughpolicy_hostdev.io_v1alpha1.json" in custom
    return out


def kubeconform(manifests: str, schemas: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(kubeconform_path()),
            "-strict",
            "-summary",
            "-output",
            "text",
            "-schema-location",
            str(schemas / LOCATION),
            "-skip",
            SKIP_KINDS,
        ],
        input=manifests,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("values", [{}, FULL_VALUES], ids=["defaults", "full"])
def test_rendered_chart_is_valid(values: dict[str, Any], schema_dir: Path) -> None:
    manifests = template(values, include_crds=True)
    result = kubeconform(manifests, schema_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Invalid: 0, Errors: 0" in result.stdout
    kinds = {d["kind"] for d in yaml.safe_load_all(manifests) if d} - {SKIP_KINDS}
    # every kind was validated (none silently missing a schema)
    assert (
        f"Valid: {len([d for d in yaml.safe_load_all(manifests) if d and d['kind'] in kinds])}"
        in result.stdout
    )


def test_kubeconform_catches_a_misspelt_field(schema_dir: Path) -> None:
    """The schemas are strict: the check would catch a typo in a template."""
    manifests = template().replace(
        "priorityClassName: system-node-critical", "priorityClass: system-node-critical"
    )
    result = kubeconform(manifests, schema_dir)
    assert result.returncode == 1
    assert "priorityClass" in result.stdout
