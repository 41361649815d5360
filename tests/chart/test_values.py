"""values.yaml <-> values.schema.json stay in sync, every value is documented, `helm lint
--strict` passes, and impossible value combinations fail the render with a clear message."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import yaml

from tests.chart.helmtool import CHART, HelmError, helm, render

VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"
# Helm passes "global" down from parent charts; the schema accepts it, values.yaml has none.
SCHEMA_ONLY = {"global"}


def value_keys(
    values: Mapping[str, Any], schema: Mapping[str, Any], prefix: str = ""
) -> Iterator[str]:
    """Dotted keys of values.yaml, descending only where the schema declares properties (maps
    such as nodeSelector or resources are free-form: their keys are data, not chart values)."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        yield path
        sub = schema.get("properties", {}).get(key, {})
        if isinstance(value, dict) and "properties" in sub:
            yield from value_keys(value, sub, path + ".")


def schema_keys(schema: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        yield path
        yield from schema_keys(sub, path + ".")


def test_every_value_is_in_the_schema_and_back() -> None:
    values = yaml.safe_load(VALUES.read_text(encoding="utf-8"))
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    in_values = set(value_keys(values, schema))
    in_schema = set(schema_keys(schema)) - SCHEMA_ONLY
    assert in_values - in_schema == set(), "values.yaml keys missing from values.schema.json"
    assert in_schema - in_values == set(), "values.schema.json keys missing from values.yaml"


def test_every_schema_object_rejects_unknown_keys() -> None:
    """A typo in a value name (agent.nodeSelecter) must be an error, not silently ignored."""

    def objects(s: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
        if "properties" in s:
            yield path or "<root>", s
            for k, sub in s["properties"].items():
                yield from objects(sub, f"{path}.{k}" if path else k)

    loose = [
        p
        for p, s in objects(json.loads(SCHEMA.read_text()))
        if s.get("additionalProperties") is not False
    ]
    assert loose == []


def test_every_value_has_a_comment() -> None:
    """Every chart value (not the data inside free-form defaults) has a comment line directly
    above it."""
    lines = VALUES.read_text(encoding="utf-8").splitlines()
    keys = set(value_keys(yaml.safe_load(VALUES.read_text()), json.loads(SCHEMA.read_text())))
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    checked, undocumented = 0, []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [m.group(2)])
        stack.append((indent, m.group(2)))
        if path in keys:
            checked += 1
            if not lines[i - 1].lstrip().startswith("#"):
                undocumented.append(f"line {i + 1}: {path}")
    assert checked == len(keys), "the line scanner missed keys; fix the test"
    assert undocumented == []


def test_helm_lint_strict() -> None:
    out = helm("lint", "--strict", CHART)
    assert "0 chart(s) failed" in out


def test_schema_rejects_a_misspelt_value() -> None:
    with pytest.raises(HelmError) as e:
        render({"agent.nodeSelecter": {"a": "b"}})
    assert "nodeSelecter" in e.value.stderr


def test_schema_rejects_a_wrong_type() -> None:
    with pytest.raises(HelmError) as e:
        render({"operator.replicas": "two"})
    assert "replicas" in e.value.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"operator.replicas": 2, "operator.leaderElection.enabled": False},
            "operator.replicas=2 needs operator.leaderElection.enabled=true",
        ),
        (
            {"operator.leaderElection.renewDeadline": 20},
            "operator.leaderElection needs retryPeriod (2) < renewDeadline (20) < leaseDuration",
        ),
        (
            {"agent.enabled": False},
            "agent.ownNodeStateGuard.enabled=true needs agent.enabled=true",
        ),
        ({"rbac.create": False}, "agent.ownNodeStateGuard.enabled=true needs rbac.create=true"),
        (
            {"metrics.serviceMonitor.enabled": True, "metrics.service.enabled": False},
            "metrics.serviceMonitor.enabled=true needs metrics.service.enabled=true",
        ),
        ({"operator.healthPort": 9090}, "operator.metricsPort and operator.healthPort must differ"),
        (
            {
                "operator.enabled": False,
                "agent.enabled": False,
                "agent.ownNodeStateGuard.enabled": False,
            },
            "would install nothing but CRDs",
        ),
    ],
)
def test_impossible_combinations_fail_with_a_clear_message(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(HelmError) as e:
        render(values)
    assert message in e.value.stderr


def test_two_replicas_with_leader_election_render() -> None:
    docs = render({"operator.replicas": 2})
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 2
    assert any(d["kind"] == "Role" and d["metadata"]["name"].endswith("-lease") for d in docs)
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert not any(d["kind"] == "PodDisruptionBudget" for d in render())


def test_kubernetes_older_than_1_30_is_refused() -> None:
    """The own-node guard needs ValidatingAdmissionPolicy v1 and node names in tokens (1.30)."""
    with pytest.raises(HelmError) as e:
        helm("template", "hd", CHART, "--kube-version", "1.29.0")
    assert "kubeVersion" in e.value.stderr or ">=1.30.0-0" in e.value.stderr
    assert "ValidatingAdmissionPolicy" in helm("template", "hd", CHART, "--kube-version", "1.30.0")
