"""The operator's credentials and kopf's session built from them: the token file re-read at
each login, the session's expiration from the token's own claims, the bounded pool."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from hostdev.kube.client import ConfigError, Credentials
from hostdev.operator import kube
from hostdev.operator.login import KOPF_CONNECTIONS, MIN_LIFETIME, session, token_expiry

NOW = datetime(2026, 12, 4, 2, 0, tzinfo=UTC)


def jwt(**claims: object) -> str:
    """An unsigned JWT with these claims (only the payload is read)."""

    def part(doc: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def ts(t: datetime) -> int:
    return int(t.timestamp())


def test_token_expiry_is_the_earliest_of_exp_and_warnafter() -> None:
    hour, year = NOW + timedelta(hours=1), NOW + timedelta(days=365)
    assert token_expiry(jwt(exp=ts(hour))) == hour
    # An extended token (valid a year) is due for its rotated successor after warnafter.
    assert token_expiry(jwt(exp=ts(year), **{"kubernetes.io": {"warnafter": ts(hour)}})) == hour
    assert token_expiry(jwt(sub="x")) is None
    assert token_expiry("static-token") is None
    assert token_expiry("a.!!!.c") is None
    assert token_expiry(jwt(exp="soon")) is None


async def test_each_login_reads_the_token_file_anew(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    first, second = jwt(exp=ts(NOW + timedelta(hours=1))), jwt(exp=ts(NOW + timedelta(hours=2)))
    token_file.write_text(first + "\n")
    creds = Credentials(
        server="http://127.0.0.1:1", token_file=str(token_file), headers=(("X-Test", "1"),)
    )
    s1 = session(creds, now=NOW)
    token_file.write_text(second)  # the kubelet rotated it
    s2 = session(creds, now=NOW)
    try:
        assert s1.aiohttp_session.headers["Authorization"] == f"Bearer {first}"
        assert s2.aiohttp_session.headers["Authorization"] == f"Bearer {second}"
        assert s1.aiohttp_session.headers["X-Test"] == "1"
        assert s1.expiration == NOW + timedelta(hours=1)
        assert s2.expiration == NOW + timedelta(hours=2)
        assert s1.server == "http://127.0.0.1:1"
        assert s1.aiohttp_session.connector is not None
        assert s1.aiohttp_session.connector.limit == KOPF_CONNECTIONS
    finally:
        await s1.aiohttp_session.close()
        await s2.aiohttp_session.close()


async def test_a_token_past_its_time_does_not_make_kopf_log_in_in_a_loop(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(jwt(exp=ts(NOW - timedelta(minutes=5))))
    s = session(Credentials(server="http://127.0.0.1:1", token_file=str(token_file)), now=NOW)
    await s.aiohttp_session.close()
    assert s.expiration == NOW + MIN_LIFETIME


async def test_a_static_token_never_expires_by_itself() -> None:
    s = session(Credentials(server="http://127.0.0.1:1", token="abc"), now=NOW)
    await s.aiohttp_session.close()
    assert s.expiration is None
    assert s.aiohttp_session.headers["Authorization"] == "Bearer abc"


def kubeconfig(path: Path, token: str) -> Path:
    doc = {
        "clusters": [{"name": "c", "cluster": {"server": "https://10.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture
def fresh_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kube.credentials.cache_clear()
    yield
    kube.credentials.cache_clear()


@pytest.mark.usefixtures("fresh_credentials")
def test_credentials_outside_a_pod_come_from_the_first_kubeconfig_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = kubeconfig(tmp_path / "a", "tok-a")
    kubeconfig(tmp_path / "b", "tok-b")
    monkeypatch.setenv("KUBECONFIG", f"{first}:{tmp_path / 'b'}")
    creds = kube.credentials()
    assert (creds.server, creds.token) == ("https://10.0.0.1:6443", "tok-a")
    assert kube.credentials() is creds  # one per process


@pytest.mark.usefixtures("fresh_credentials")
def test_no_credentials_at_all_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"not in a pod .* no kubeconfig at .*missing"):
        kube.credentials()
