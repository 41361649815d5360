"""The Lease elector against an in-memory Lease API with optimistic concurrency and a fake
clock: expiry counted from observation, races lost to 409, release, losing the lease."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
from kubernetes import client as k8s

from hostdev.operator.leader import Elector, LeaseSettings


class FakeLeases:
    """One namespace's Leases: resourceVersion checked on replace, like the API server."""

    def __init__(self) -> None:
        self.items: dict[str, k8s.V1Lease] = {}
        self.rv = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise k8s.ApiException(status=503, reason="unavailable")

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> k8s.V1Lease:
        self._check()
        if name not in self.items:
            raise k8s.ApiException(status=404, reason="NotFound")
        return copy.deepcopy(self.items[name])

    def create_namespaced_lease(self, namespace: str, body: k8s.V1Lease, **_: Any) -> k8s.V1Lease:
        self._check()
        name = body.metadata.name
        if name in self.items:
            raise k8s.ApiException(status=409, reason="AlreadyExists")
        self.rv += 1
        body.metadata.resource_version = str(self.rv)
        self.items[name] = copy.deepcopy(body)
        return body

    def replace_namespaced_lease(
        self, name: str, namespace: str, body: k8s.V1Lease, **_: Any
    ) -> Any:
        self._check()
        if self.items[name].metadata.resource_version != body.metadata.resource_version:
            raise k8s.ApiException(status=409, reason="Conflict")
        self.rv += 1
        body.metadata.resource_version = str(self.rv)
        self.items[name] = copy.deepcopy(body)
        return body

    def holder(self, name: str = "l") -> str | None:
        return self.items[name].spec.holder_identity


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def elector(api: FakeLeases, who: str, clock: Clock) -> Elector:
    s = LeaseSettings("l", "ns", who, duration=15, renew_deadline=10, retry=2)
    return Elector(api, s, clock=clock)  # type: ignore[arg-type]


def test_first_creates_second_waits_for_expiry_from_its_own_observation() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_take() and api.holder() == "a"
    assert not b.try_take() and b.holder == "a"
    clock.t += 14
    assert not b.try_take()  # a's record unchanged for 14 s: not expired yet
    clock.t += 2
    assert b.try_take() and api.holder() == "b"
    assert api.items["l"].spec.lease_transitions == 1
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
    api.items["l"].spec.holder_identity = None
    stale = api.read_namespaced_lease("l", "ns")
    assert b.try_take()
    with pytest.raises(k8s.ApiException) as e:
        api.replace_namespaced_lease("l", "ns", stale)
    assert e.value.status == 409


def test_release_lets_a_standby_in_at_once() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    a.try_take()
    assert not b.try_take()
    assert a.release_now() and api.holder() is None
    assert api.items["l"].spec.lease_duration_seconds == 1
    assert b.try_take()  # no waiting for the old lease
    assert not a.release_now()  # not ours any more: left alone
    assert api.holder() == "b"


def test_hold_returns_when_renewals_fail_past_the_deadline() -> None:
    api = FakeLeases()
    s = LeaseSettings("l", "ns", "a", duration=0.6, renew_deadline=0.3, retry=0.05)
    a = Elector(api, s)  # type: ignore[arg-type]
    assert a.try_take()
    api.down = True
    assert a.hold(threading.Event()) == "Lease not renewed for 0.3s"
    api.down = False
    # Someone else took it: hold() says so at the next renewal.
    api.items["l"].spec.holder_identity = "z"
    api.rv += 1
    api.items["l"].metadata.resource_version = str(api.rv)
    lost: list[str] = []
    thread, _ = a.keep(lost.append)
    thread.join(5)
    assert lost == ["Lease taken by z"]
    # Stopped while holding: no verdict.
    assert a.try_take() is False  # z's lease is fresh
    api.items["l"].spec.holder_identity = "a"
    stop = threading.Event()
    stop.set()
    assert a.hold(stop) is None


def test_settings_must_let_the_leader_give_up_first() -> None:
    with pytest.raises(ValueError, match=r"retry period .* < renew deadline .* < lease duration"):
        LeaseSettings("l", "ns", "a", duration=10, renew_deadline=10, retry=2).check()
