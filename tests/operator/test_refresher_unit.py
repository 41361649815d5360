"""The one request refresher: when it looks at which request (hostdev.operator.refresher.due),
what of a request it keeps (handlers.requests.refresh_view), and what wakes its task."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from hostdev.operator.handlers.requests import _look, refresh_view
from hostdev.operator.refresher import Item, Refresher, Schedule, due, item_of
from hostdev.policy.request import Request

A = Item(("ns", "a"), ("ns", "vm1"), "1")
B = Item(("ns", "b"), ("ns", "vm2"), "1")


def test_first_look_once_settled_then_every_interval() -> None:
    s = Schedule()
    kw: dict[str, Any] = {"vms": set(), "everything": False, "settle": 5.0, "interval": 15.0}
    assert due([A], s, now=100.0, **kw) == ([], 105.0)  # just seen: wait until settled
    assert due([A], s, now=104.9, **kw) == ([], 105.0)
    assert due([A], s, now=105.0, **kw) == ([A.key], 120.0)
    s.looked[A.key] = 105.0
    assert due([A], s, now=110.0, **kw) == ([], 120.0)  # nothing changed
    assert due([A], s, now=120.0, **kw) == ([A.key], 135.0)  # periodic


def test_a_change_of_the_request_waits_for_it_to_settle_again() -> None:
    s = Schedule(seen={A.key: ("1", 0.0)}, looked={A.key: 10.0})
    kw: dict[str, Any] = {"vms": set(), "everything": False, "settle": 5.0, "interval": 15.0}
    changed = Item(A.key, A.vm, "2")
    assert due([changed], s, now=12.0, **kw) == ([], 17.0)
    assert due([changed], s, now=17.0, **kw) == ([A.key], 32.0)


def test_vm_and_cluster_changes_look_at_once_at_settled_requests_only() -> None:
    s = Schedule(seen={A.key: ("1", 0.0), B.key: ("1", 0.0)}, looked={A.key: 10.0, B.key: 10.0})
    kw: dict[str, Any] = {"settle": 5.0, "interval": 15.0}
    assert due([A, B], s, vms={("ns", "vm2")}, everything=False, now=11.0, **kw)[0] == [B.key]
    assert due([A, B], s, vms=set(), everything=True, now=11.0, **kw)[0] == [A.key, B.key]
    fresh = Item(("ns", "c"), ("ns", "vm2"), "1")  # just changed: its own settle comes first
    got = due([A, B, fresh], s, vms={("ns", "vm2")}, everything=True, now=11.0, **kw)
    assert got == ([A.key, B.key], 16.0)


def test_a_request_waiting_for_capacity_does_not_wait_to_settle() -> None:
    """Looked at when it starts waiting (capacity may have come while it was refused) and at
    each cluster change (which may be that capacity); other requests still settle first."""
    waiting = Item(("ns", "w"), ("ns", "vm3"), "1", waiting=True)
    s = Schedule()
    kw: dict[str, Any] = {"vms": set(), "settle": 5.0, "interval": 15.0}
    assert due([A, waiting], s, everything=False, now=100.0, **kw) == ([waiting.key], 105.0)
    s.looked[waiting.key] = 100.0
    assert due([A, waiting], s, everything=False, now=101.0, **kw) == ([], 105.0)
    assert due([A, waiting], s, everything=True, now=101.0, **kw) == ([waiting.key], 105.0)
    s.looked[waiting.key] = 101.0
    again = Item(waiting.key, waiting.vm, "2", waiting=True)  # its status was written again
    assert due([A, again], s, everything=False, now=102.0, **kw) == ([again.key], 105.0)


def test_gone_requests_are_forgotten() -> None:
    s = Schedule(seen={A.key: ("1", 0.0), B.key: ("1", 0.0)}, looked={A.key: 1.0, B.key: 1.0})
    assert due([A], s, vms=set(), everything=False, now=6.0) == ([], 16.0)
    assert set(s.seen) == set(s.looked) == {A.key}
    assert due([], s, vms=set(), everything=False, now=3.0) == ([], None)


def body(phase: str | None, **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "hostdev.io/v1alpha1",
        "kind": "PassthroughRequest",
        "metadata": {
            "name": "r",
            "namespace": "ns",
            "uid": "u",
            "generation": 2,
            "resourceVersion": "7",
            "managedFields": [{"manager": "kubectl"}],
            **extra,
        },
        "spec": {"vmName": "vm1", "devices": [{"name": "nic", "resourceName": "x/y"}]},
        "status": {
            "phase": phase,
            "vmEntries": ["r-nic-0"],
            "conditions": [{"type": "Applied", "status": "True", "reason": "VmSpecUpdated"}],
            "lastHandledConfiguration": '{"spec": "large"}',
        },
    }


def test_view_keeps_only_what_a_look_needs() -> None:
    view = refresh_view(body("Applied"))
    assert view is not None
    assert view["metadata"] == {
        "name": "r", "namespace": "ns", "uid": "u", "generation": 2, "resourceVersion": "7",
    }  # fmt: skip
    assert "lastHandledConfiguration" not in view["status"]
    assert view["status"]["vmEntries"] == ["r-nic-0"]
    assert view["apiVersion"] == "hostdev.io/v1alpha1" and view["kind"] == "PassthroughRequest"


def test_view_only_for_requests_there_is_something_to_refresh() -> None:
    assert refresh_view(body("Running")) is not None
    assert refresh_view(body("Allocated")) is not None
    for phase in (None, "Pending", "Refused", "Failed"):
        assert refresh_view(body(phase)) is None, phase
    assert refresh_view(body("Applied", deletionTimestamp="2026-12-03T00:00:00Z")) is None
    # Accepted, but its VM was missing when applied: looked at again once the VM is there.
    waiting = body("Pending")
    waiting["status"]["conditions"] = [{"type": "Applied", "status": "False",
                                        "reason": "VmNotFound"}]  # fmt: skip
    assert refresh_view(waiting) is not None
    assert not item_of(refresh_view(waiting) or {}).waiting


def capacity_waiter(phase: str) -> dict[str, Any]:
    b = body(phase)
    b["status"]["conditions"] = [{"type": "Accepted", "status": "False",
                                  "reason": "NoCapacity"}]  # fmt: skip
    return b


def test_requests_waiting_for_capacity_are_kept_and_applied_again() -> None:
    for phase in ("Pending", "Refused"):
        view = refresh_view(capacity_waiter(phase))
        assert view is not None and item_of(view).waiting, phase
        # A look applies it again (the capacity check; the VM only if it now fits).
        assert _look(view, Request.from_object(view), {}, {}, []) == (None, None)  # type: ignore[arg-type]
    refused_by_vm = capacity_waiter("Refused")
    refused_by_vm["status"]["conditions"][0]["status"] = "True"  # accepted; the VM refused it
    assert refresh_view(refused_by_vm) is None  # kopf's retries own that one


def view_of(name: str, vm: str, rv: str = "1") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv},
            "spec": {"vmName": vm}}  # fmt: skip


class Looks:
    """A Refresher's ``look`` that records the names looked at; ``next()`` waits for a look."""

    def __init__(self) -> None:
        self.looked: list[list[str]] = []
        self.woke = asyncio.Event()

    async def __call__(self, views: Sequence[Mapping[str, Any]]) -> None:
        self.looked.append(sorted(v["metadata"]["name"] for v in views))
        self.woke.set()

    async def next(self) -> list[str]:
        await asyncio.wait_for(self.woke.wait(), 5)
        self.woke.clear()
        return self.looked[-1]


async def test_task_looks_when_woken_by_a_vm_or_the_cluster_view() -> None:
    look = Looks()
    index = {("ns", "a"): [view_of("a", "vm1")], ("ns", "b"): [view_of("b", "vm2")]}
    changes = [asyncio.Event()]  # as Cluster.next_change: a new event after each change
    r = Refresher(look=look, requests=index, changes=lambda: changes[-1],
                  settle=0.0, interval=3600.0)  # fmt: skip

    try:
        r.request_changed()  # starts the task: both new, settled at once
        assert await look.next() == ["a", "b"]
        r.vm_changed("ns", "vm2")
        assert await look.next() == ["b"]
        changes.append(asyncio.Event())
        changes[-2].set()  # e.g. an agent's report: everything may have changed
        assert await look.next() == ["a", "b"]
    finally:
        r.stop()


async def test_a_vm_asks_for_a_look_only_when_its_owners_change() -> None:
    look = Looks()
    index = {("ns", "a"): [view_of("a", "vm1")], ("ns", "b"): [view_of("b", "vm1")],
             ("ns", "c"): [view_of("c", "vm2")]}  # fmt: skip
    r = Refresher(look=look, requests=index, settle=0.0, interval=3600.0)

    try:
        r.request_changed()
        assert await look.next() == ["a", "b", "c"]
        assert r.vm_owners("ns", "vm1", ("a",))  # first seen: its requests are looked at
        assert await look.next() == ["a", "b"]
        # Its status or spec edited, or patched for another request: no look.
        assert not r.vm_owners("ns", "vm1", ("a",))
        assert not r.vm_owners("ns", "vm1", ("a", "b", "x"))
        # A request with nothing to refresh (here: x, e.g. being deleted) released: no look.
        assert not r.vm_owners("ns", "vm1", ("a", "b"))
        # Someone took a live request's entries (and its name) off the VM: look.
        assert r.vm_owners("ns", "vm1", ("b",))
        assert await look.next() == ["a", "b"]
        assert r.vm_owners("ns", "vm1", None)  # deleted
        assert await look.next() == ["a", "b"]
        assert not r.vm_owners("ns", "vm1", None)
        assert not r.vm_owners("ns", "vm3", None)  # never seen
        assert r.vm_owners("ns", "vm1", ())  # made again, nobody's entries yet
        assert await look.next() == ["a", "b"]
    finally:
        r.stop()


async def test_a_cluster_change_during_the_debounce_is_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Woken by a VM change, the task waits a moment before its pass; a change of the cluster
    view in that moment (an agent's report: capacity a waiting request needs) still makes the
    pass look at everything, not only at that VM's requests."""
    debouncing, release, hold = asyncio.Event(), asyncio.Event(), [False]
    real_sleep = asyncio.sleep

    async def sleep(delay: float, result: Any = None) -> Any:
        if hold[0]:
            hold[0] = False
            debouncing.set()
            await release.wait()
            return result
        return await real_sleep(delay, result)

    look = Looks()
    index = {("ns", "a"): [view_of("a", "vm1")], ("ns", "b"): [view_of("b", "vm2")]}
    changes = [asyncio.Event()]
    r = Refresher(look=look, requests=index, changes=lambda: changes[-1],
                  settle=0.0, interval=3600.0)  # fmt: skip
    monkeypatch.setattr(asyncio, "sleep", sleep)
    try:
        r.request_changed()
        assert await look.next() == ["a", "b"]
        hold[0] = True
        r.vm_changed("ns", "vm2")
        await asyncio.wait_for(debouncing.wait(), 5)
        changes.append(asyncio.Event())
        changes[-2].set()  # the cluster view changes while the task waits to make its pass
        release.set()
        assert await look.next() == ["a", "b"]
    finally:
        r.stop()
