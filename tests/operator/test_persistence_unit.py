"""kopf's bookkeeping on PassthroughRequests: diff base in status, no marker annotation."""

from __future__ import annotations

import json
from typing import Any

import kopf

from hostdev.operator.persistence import DiffBase, Progress


def body(annotations: dict[str, str], status: dict[str, Any] | None = None) -> kopf.Body:
    return kopf.Body({
        "apiVersion": "hostdev.io/v1alpha1", "kind": "PassthroughRequest",
        "metadata": {"name": "r", "namespace": "ns", "annotations": annotations},
        "spec": {"vmName": "vm"},
        "status": status or {},
    })  # fmt: skip


def test_diff_base_goes_to_status_and_leaves_own_annotations_out() -> None:
    store = DiffBase()
    b = body({"hostdev.io/apply_request": "{}", "team": "a"})
    essence = store.build(body=b)
    assert essence == {"spec": {"vmName": "vm"}, "metadata": {"annotations": {"team": "a"}}}
    patch = kopf.Patch()
    store.store(body=b, patch=patch, essence=essence)
    assert set(patch) == {"status"}
    assert json.loads(patch["status"]["lastHandledConfiguration"]) == essence


def test_diff_base_read_from_status_else_the_legacy_annotation() -> None:
    store = DiffBase()
    old = {"spec": {"vmName": "old"}}
    new = {"spec": {"vmName": "new"}}
    legacy = {"hostdev.io/last-handled-configuration": json.dumps(old)}
    assert store.fetch(body=body(legacy)) == old
    status = {"lastHandledConfiguration": json.dumps(new)}
    assert store.fetch(body=body(legacy, status)) == new
    assert store.fetch(body=body({})) is None
    assert store.fetch(body=body({}, {"lastHandledConfiguration": "{not json"})) is None


def test_progress_writes_no_marker_annotation() -> None:
    b = body({})
    patch = kopf.Patch()
    Progress().store(key=kopf.HandlerId("apply_request"), record={"retries": 1}, body=b,
                     patch=patch)  # fmt: skip
    assert set(patch["metadata"]["annotations"]) == {"hostdev.io/apply_request"}
