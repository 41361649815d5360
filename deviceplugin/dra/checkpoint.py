"""Prepared claims, one small JSON file each under ``<state dir>/dra/claims/<uid>.json``.

Written before anything else of a prepare (state ``Preparing``, with every file it will write)
and again when done (``Prepared``, with the answer given to the kubelet), removed last by an
unprepare. So an agent killed at any moment restarts knowing every file it may have left, a
repeated prepare answers exactly as the first did, and units held by claims stay held.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hostdev.deviceplugin.atomicfile import atomic_write

log = logging.getLogger(__name__)

FORMAT = 1
PREPARING = "Preparing"
PREPARED = "Prepared"
_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


class CheckpointError(OSError):
    """A claim's checkpoint cannot be written; the message names the file."""


@dataclass(frozen=True, slots=True)
class PreparedDevice:
    """One device of a prepared claim, as answered to the kubelet."""

    requests: tuple[str, ...]  # base request names
    device: str
    resource: str
    addresses: tuple[str, ...]
    cdi_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": list(self.requests),
            "device": self.device,
            "resource": self.resource,
            "addresses": list(self.addresses),
            "cdiDeviceIds": list(self.cdi_ids),
        }

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> PreparedDevice:
        return PreparedDevice(
            tuple(str(r) for r in d["requests"]),
            str(d["device"]),
            str(d["resource"]),
            tuple(str(a) for a in d["addresses"]),
            tuple(str(c) for c in d["cdiDeviceIds"]),
        )


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    uid: str
    namespace: str
    name: str
    state: str
    pool: str
    devices: tuple[PreparedDevice, ...] = ()
    files: tuple[str, ...] = ()  # every file (and metadata dir) this claim wrote or may have
    dirs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "uid": self.uid,
            "namespace": self.namespace,
            "name": self.name,
            "state": self.state,
            "pool": self.pool,
            "devices": [d.to_json() for d in self.devices],
            "files": list(self.files),
            "dirs": list(self.dirs),
        }

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> ClaimRecord:
        if d.get("format") != FORMAT:
            raise ValueError(f"unknown format {d.get('format')!r}")
        return ClaimRecord(
            uid=str(d["uid"]),
            namespace=str(d["namespace"]),
            name=str(d["name"]),
            state=str(d["state"]),
            pool=str(d["pool"]),
            devices=tuple(PreparedDevice.from_json(x) for x in d.get("devices") or ()),
            files=tuple(str(f) for f in d.get("files") or ()),
            dirs=tuple(str(f) for f in d.get("dirs") or ()),
        )


@dataclass
class Checkpoints:
    """The prepared claims of this node, mirrored in memory."""

    directory: str
    records: dict[str, ClaimRecord] = field(default_factory=dict)

    @staticmethod
    def open(state_dir: str) -> Checkpoints:
        cp = Checkpoints(os.path.join(state_dir, "dra", "claims"))
        cp.load()
        return cp

    def _path(self, uid: str) -> str:
        if not _UID.match(uid):
            raise CheckpointError(f"claim UID {uid!r} is not a UID")
        return os.path.join(self.directory, f"{uid}.json")

    def load(self) -> None:
        self.records = {}
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in sorted(names):
            if not name.endswith(".json") or name.startswith("."):
                continue
            path = os.path.join(self.directory, name)
            try:
                with open(path, "rb") as f:
                    rec = ClaimRecord.from_json(json.load(f))
            except (OSError, ValueError, KeyError, TypeError) as e:
                # Kept on disk for a look; its claim gets prepared (or unprepared) again.
                log.warning("DRA checkpoint %s is unreadable (%s); ignoring it", path, e)
                continue
            self.records[rec.uid] = rec

    def put(self, rec: ClaimRecord, *, durable: bool = True) -> None:
        path = self._path(rec.uid)
        try:
            atomic_write(path, json.dumps(rec.to_json(), indent=1).encode(), durable=durable)
        except OSError as e:
            raise CheckpointError(e.errno, f"cannot write DRA checkpoint {path}: {e}") from e
        self.records[rec.uid] = rec

    def remove(self, uid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(uid))
        self.records.pop(uid, None)

    def holders(self) -> dict[str, str]:
        """device name -> ``ns/name`` of the claim holding it."""
        return {
            d.device: f"{r.namespace}/{r.name}" for r in self.records.values() for d in r.devices
        }

    def by_device(self) -> dict[str, ClaimRecord]:
        return {d.device: r for r in self.records.values() for d in r.devices}
