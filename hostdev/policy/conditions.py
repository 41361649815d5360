"""Kubernetes-style status conditions, merged so that unchanged ones keep their timestamps."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: Status
    reason: str
    message: str


def merge_conditions(
    existing: Iterable[Mapping[str, Any]] | None,
    wanted: Iterable[Condition],
    *,
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """The new condition list: ``wanted`` replaces conditions of the same type (keeping
    lastTransitionTime when the status did not change); other existing types are kept."""
    old = {c.get("type"): c for c in existing or () if isinstance(c, Mapping)}
    out: dict[str, dict[str, Any]] = {str(t): dict(c) for t, c in old.items() if isinstance(t, str)}
    for cond in wanted:
        prev = old.get(cond.type)
        since = (
            prev.get("lastTransitionTime") if prev and prev.get("status") == cond.status else None
        )
        entry: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": since or now,
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        out[cond.type] = entry
    return [out[t] for t in sorted(out)]


def same_conditions(a: Iterable[Mapping[str, Any]] | None, b: Iterable[Mapping[str, Any]]) -> bool:
    """Equal apart from timestamps (so a recomputation alone never causes a write)."""

    def strip(cs: Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
        return sorted(
            ({k: v for k, v in c.items() if k != "lastTransitionTime"} for c in cs or ()),
            key=lambda c: str(c.get("type")),
        )

    return strip(a) == strip(b)
