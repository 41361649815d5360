"""The last advertised device lists, saved under the state dir (``--state-dir``).

After a node-agent restart (or reboot), the kubelet re-admits running pods as soon as it sees
their resources; if the plugin is not back yet, pods fail with UnexpectedAdmissionError
(kubernetes/kubernetes#125579). Loading this file lets every server advertise its last list
within milliseconds of start, before the (slower) host scan corrects it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hostdev.deviceplugin.atomicfile import atomic_write
from hostdev.deviceplugin.units import Advertised, advertised_from_json, advertised_to_json
from hostdev.host.address import PciAddress

log = logging.getLogger(__name__)

FILE_NAME = "deviceplugin-state.json"
# The mdev instances this agent made (hostdev.deviceplugin.mdev.MdevOwner); named here so the
# start path can tell whether there are any without loading the mdev code.
MDEV_OWNED_FILE = "mdev-owned.json"
FORMAT = 1


@dataclass(frozen=True, slots=True)
class SavedResource:
    devices: tuple[Advertised, ...] = ()
    allocated: frozenset[str] = field(default_factory=frozenset)


def state_path(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def mdev_owned_path(state_dir: str) -> str:
    return os.path.join(state_dir, MDEV_OWNED_FILE)


def encode(resources: Mapping[str, SavedResource], cache: EncodeCache | None = None) -> bytes:
    """The state file's bytes. ``cache``: the encodings of the devices of the previous call,
    reused for the devices that are the same objects (a save after an Allocate re-encodes
    one device, not 4,096)."""
    fresh: dict[int, tuple[Advertised, bytes]] = {}
    old = cache.devices if cache is not None else {}
    parts = []
    for name, r in sorted(resources.items()):
        devices = []
        for adv in r.devices:
            hit = old.get(id(adv))
            if hit is None or hit[0] is not adv:
                hit = (adv, _dumps(advertised_to_json(adv)))
            fresh[id(adv)] = hit
            devices.append(hit[1])
        parts.append(
            b'%s:{"devices":[%s],"allocated":%s}'
            % (_dumps(name), b",".join(devices), _dumps(sorted(r.allocated)))
        )
    if cache is not None:
        cache.devices = fresh
    return b'{"format":%d,"resources":{%s}}' % (FORMAT, b",".join(parts))


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class EncodeCache:
    """What :func:`encode` keeps between calls: id(device) -> (device, its JSON)."""

    __slots__ = ("devices",)

    def __init__(self) -> None:
        self.devices: dict[int, tuple[Advertised, bytes]] = {}


def save(state_dir: str, payload: bytes) -> None:
    """Atomic replace: a crash mid-write leaves the previous file intact."""
    atomic_write(state_path(state_dir), payload)


def load(state_dir: str) -> dict[str, SavedResource]:
    """Whatever is usable in the saved file; a missing or damaged file yields {} (logged)."""
    path = state_path(state_dir)
    try:
        with open(path, "rb") as f:
            doc: Any = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); starting without the saved device lists", path, e)
        return {}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        log.warning("%s: unknown format; starting without the saved device lists", path)
        return {}
    out: dict[str, SavedResource] = {}
    for name, entry in (doc.get("resources") or {}).items():
        devices = []
        for raw in (entry or {}).get("devices") or []:
            try:
                devices.append(advertised_from_json(raw))
            except (KeyError, TypeError, ValueError) as e:
                log.warning("%s: %s: dropping a saved device: %s", path, name, e)
        allocated = frozenset(str(x) for x in (entry or {}).get("allocated") or [])
        out[str(name)] = SavedResource(tuple(devices), allocated)
    return out


def allocated_devices(resources: Mapping[str, SavedResource]) -> dict[PciAddress, str]:
    """Every function of an allocated unit -> who holds it, for the configuration guards."""
    out: dict[PciAddress, str] = {}
    for name, r in sorted(resources.items()):
        for adv in r.devices:
            if adv.unit.id in r.allocated:
                for a in adv.unit.addresses:
                    out.setdefault(a, f"a pod through {name} (allocated by the device plugin)")
    return out


def saved_allocations(state_dir: str) -> dict[PciAddress, str]:
    """:func:`allocated_devices` of the lists the device plugin saved last (``hostdev apply``
    on a node whose agent shares ``--state-dir``)."""
    return allocated_devices(load(state_dir))
