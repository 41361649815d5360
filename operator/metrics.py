"""Prometheus metrics of the operator (served by prometheus-client on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

RECONCILES = Counter(
    "hostdev_operator_reconciles_total",
    "Reconciliations by kind and result.",
    ["kind", "result"],
)
API_WRITES = Counter(
    "hostdev_operator_api_writes_total",
    "Writes this operator's own code sent to the API server (kopf's own bookkeeping aside).",
    ["resource", "verb"],
)
API_CONFLICTS = Counter(
    "hostdev_operator_api_conflicts_total",
    "Optimistic-lock conflicts (HTTP 409) that were retried.",
    ["resource"],
)
NODESTATE_RENDERS = Counter(
    "hostdev_operator_nodestate_renders_total",
    "NodeState specs rendered (a cluster pass renders only nodes whose inputs changed).",
)
NODESTATES = Gauge("hostdev_operator_nodestates", "PassthroughNodeStates the operator manages.")
POLICY_CONFLICTS = Gauge(
    "hostdev_operator_policy_conflicts", "Devices or PFs lost to a policy with precedence."
)
REQUEST_PHASES = Counter(
    "hostdev_operator_request_transitions_total",
    "PassthroughRequest phase transitions.",
    ["phase"],
)
