"""kopf's API session, built from the operator's own credentials (:func:`..kube.credentials`).

The same server, CA, client certificate and bearer token as the operator's own calls and the
Lease, with a bounded connection pool: kopf's own session opens as many connections as there
are concurrent calls (a 1,000-request burst held ~110, each with a 128 KiB TLS read buffer
plus OpenSSL's).

Token rotation: a bound service-account token in a file is replaced by the kubelet well before
it expires. kopf reads the file once per login, so the session is given an expiration: the
token's own (its ``exp`` claim, or the earlier ``kubernetes.io.warnafter`` of a token the API
server extends), after which kopf logs in again and so reads the file anew. A 401 makes kopf
log in again too.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime, timedelta

import aiohttp

from hostdev.kube.client import Credentials, read_token, ssl_context
from hostdev.operator.kopf_plain import kopf

# At most this many connections, the watch streams (one per watched resource, ~10) included;
# the rest wait for a free one.
KOPF_CONNECTIONS = 32
# Never sooner than this after a login, so a token that is already past its time (a kubelet
# late to rotate it) cannot make kopf log in again in a loop.
MIN_LIFETIME = timedelta(seconds=60)


def token_expiry(token: str) -> datetime | None:
    """When a JWT bearer token stops being good to use (None: not a JWT, or no expiry). Read
    without verifying it: the API server does that; this only decides when to re-read."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        return None
    if not isinstance(claims, dict):
        return None
    k8s = claims.get("kubernetes.io")
    times = [claims.get("exp"), k8s.get("warnafter") if isinstance(k8s, dict) else None]
    valid = [t for t in times if isinstance(t, int | float) and not isinstance(t, bool)]
    return datetime.fromtimestamp(min(valid), UTC) if valid else None


def session(creds: Credentials, now: datetime | None = None) -> kopf.AiohttpSession:
    """A login's session (call it from kopf's login handler: aiohttp wants the running loop).
    OSError if the token file cannot be read."""
    headers = dict(creds.headers)
    token = read_token(creds)
    expiration = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
        expiry = token_expiry(token)
        if expiry is not None:
            expiration = max(expiry, (now or datetime.now(UTC)) + MIN_LIFETIME)
    secure = creds.server.startswith("https://")
    connector = aiohttp.TCPConnector(
        limit=KOPF_CONNECTIONS, ssl=ssl_context(creds) if secure else False
    )
    return kopf.AiohttpSession(
        server=creds.server,
        expiration=expiration,
        aiohttp_session=aiohttp.ClientSession(connector=connector, headers=headers),
    )
