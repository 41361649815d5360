"""The Lease elector against an in-memory Lease API with optimistic concurrency and a fake
clock: expiry counted from observation, races lost to 409, release, losing the lease."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest

from hostdev.kube.client import ApiError
from hostdev.operator.leader import Elector, LeaseSettings

PREFIX = "/apis/coordination.k8s.io/v1/namespaces/ns/leases"


class FakeLeases:
    """One namespace's Leases as the shared client sees them (plain dicts): resourceVersion
    checked on replace, like the API server."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.rv = 0
        self.down = False

    def request(self, method: str, path: str, *, body: Any = None, **_: Any) -> Any:
        if self.down:
            raise ApiError(503, "Service Unavailable")
        assert path.startswith(PREFIX), path
        name = path[len(PREFIX) + 1 :]
        if method == "GET":
            return self.read(name)
        if method == "POST":
            return self.create(body)
        assert method == "PUT", method
        return self.replace(name, body)

    def read(self, name: str) -> dict[str, Any]:
        if name not in self.items:
            raise ApiError(404, "Not Found")
        return copy.deepcopy(self.items[name])

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        if name in self.items:
            raise ApiError(409, "Conflict")  # AlreadyExists
        self.rv += 1
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = str(self.rv)
        self.items[name] = body
        return copy.deepcopy(body)

    def replace(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        current = self.items[name]["metadata"]["resourceVersion"]
        if current != body["metadata"].get("resourceVersion"):
            raise ApiError(409, "Conflict")
        self.rv += 1
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = str(self.rv)
        self.items[name] = body
        return copy.deepcopy(body)

    def watch(self, *_: Any, **__: Any) -> Any:
        raise AssertionError("the unit tests look, never watch")

    def spec(self, name: str = "l") -> dict[str, Any]:
        return dict(self.items[name]["spec"])

    def holder(self, name: str = "l") -> str | None:
        return self.spec(name).get("holderIdentity")

    def set_holder(self, holder: str | None, name: str = "l") -> None:
        """Someone else writes the holder (a new resourceVersion)."""
        self.rv += 1
        self.items[name]["spec"]["holderIdentity"] = holder
        self.items[name]["metadata"]["resourceVersion"] = str(self.rv)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def elector(api: FakeLeases, who: str, clock: Clock) -> Elector:
    s = LeaseSettings("l", "ns", who, duration=15, renew_deadline=10, retry=2)
    return Elector(api, s, clock=clock, watch=False)


def test_first_creates_second_waits_for_expiry_from_its_own_observation() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_take() and api.holder() == "a"
    assert not b.try_take() and b.holder == "a"
    clock.t += 14
    assert not b.try_take()  # a's record unchanged for 14 s: not expired yet
    clock.t += 2
    assert b.try_take() and api.holder() == "b"
    assert api.spec()["leaseTransitions"] == 1
    # a comes back: it must now wait for b's lease
    assert not a.try_take() and a.holder == "b"


def test_renewals_keep_a_standby_out_and_a_stale_record_counts_from_first_sight() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    a.try_take()
    for _ in range(20):  # 40 s of renewals every 2 s: b never takes over
        clock.t += 2
        assert a.try_take() and not b.try_take()
    # A foreign holder's renewTime long ago does not matter: b saw it change just now.
    clock.t += 1000
    c = elector(api, "c", clock)
    assert not c.try_take()
    clock.t += 15
    assert c.try_take()


def test_a_race_has_exactly_one_winner() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    # Both read "no lease"; both create: the second create is a 409.
    assert a.try_take() and not b.try_take()
    # Both read a released lease at the same resourceVersion; both replace: one 409.
    api.set_holder(None)
    stale = api.read("l")
    assert b.try_take()
    with pytest.raises(ApiError) as e:
        api.replace("l", stale)
    assert e.value.status == 409


def test_release_lets_a_standby_in_at_once() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    a.try_take()
    assert not b.try_take()
    assert a.release_now() and api.holder() is None
    assert api.spec()["leaseDurationSeconds"] == 1
    assert b.try_take()  # no waiting for the old lease
    assert not a.release_now()  # not ours any more: left alone
    assert api.holder() == "b"


def test_hold_returns_when_renewals_fail_past_the_deadline() -> None:
    api = FakeLeases()
    s = LeaseSettings("l", "ns", "a", duration=0.6, renew_deadline=0.3, retry=0.05)
    a = Elector(api, s)
    assert a.try_take()
    api.down = True
    assert a.hold(threading.Event()) == "Lease not renewed for 0.3s"
    api.down = False
    # Someone else took it: hold() says so at the next renewal.
    api.set_holder("z")
    lost: list[str] = []
    thread, _ = a.keep(lost.append)
    thread.join(5)
    assert lost == ["Lease taken by z"]
    # Stopped while holding: no verdict.
    assert a.try_take() is False  # z's lease is fresh
    api.set_holder("a")
    stop = threading.Event()
    stop.set()
    assert a.hold(stop) is None


def test_settings_must_let_the_leader_give_up_first() -> None:
    with pytest.raises(ValueError, match=r"retry period .* < renew deadline .* < lease duration"):
        LeaseSettings("l", "ns", "a", duration=10, renew_deadline=10, retry=2).check()


def test_a_standby_looks_again_exactly_when_the_lease_it_saw_expires() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert b.next_look() == 2  # nothing seen yet: the retry period
    a.try_take()
    assert not b.try_take() and b.next_look() == 2
    clock.t += 13  # a is gone (kill -9): no more renewals
    assert not b.try_take()
    assert b.next_look() == pytest.approx(2.0)  # expires in 2 s
    clock.t += 1.5
    assert not b.try_take()
    assert b.next_look() == pytest.approx(0.5)  # not the next retry tick, 1.5 s late
    clock.t += b.next_look()
    assert b.try_take() and api.holder() == "b"
    assert b.next_look() == 2  # its own lease: renewals every retry period
    assert not a.try_take() and a.next_look() == 2  # b's fresh lease: 15 s off, look in 2
