"""Kubernetes label selectors (metav1.LabelSelector) over node labels. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_OPERATORS = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})


class LabelSelectorError(ValueError):
    """A label selector the API server would not have let through; says what to fix."""


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        # NotIn: as in apimachinery, a missing label satisfies NotIn.
        return self.key not in labels or labels[self.key] not in self.values


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """All requirements must hold. An empty selector matches every node (as in Kubernetes)."""

    requirements: tuple[Requirement, ...] = ()

    @staticmethod
    def from_dict(data: Mapping[str, Any] | None) -> LabelSelector:
        if not data:
            return LabelSelector()
        reqs: list[Requirement] = []
        match_labels = data.get("matchLabels") or {}
        if not isinstance(match_labels, Mapping):
            raise LabelSelectorError("nodeSelector.matchLabels must be a map of label -> value")
        for key, value in sorted(match_labels.items()):
            reqs.append(Requirement(str(key), "In", frozenset({str(value)})))
        for i, expr in enumerate(data.get("matchExpressions") or []):
            op = expr.get("operator")
            if op not in _OPERATORS:
                raise LabelSelectorError(
                    f"nodeSelector.matchExpressions[{i}].operator {op!r}: "
                    f"expected one of {sorted(_OPERATORS)}"
                )
            values = frozenset(str(v) for v in expr.get("values") or [])
            if op in {"In", "NotIn"} and not values:
                raise LabelSelectorError(
                    f"nodeSelector.matchExpressions[{i}]: {op} needs at least one value"
                )
            if op in {"Exists", "DoesNotExist"} and values:
                raise LabelSelectorError(
                    f"nodeSelector.matchExpressions[{i}]: {op} takes no values"
                )
            reqs.append(Requirement(str(expr.get("key", "")), op, values))
        return LabelSelector(tuple(reqs))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)
