"""Persistent memory of the drivers hostdev took devices away from (and of the PFs whose
``sriov_drivers_autoprobe`` it turned off), plus a one-step journal.

One small JSON file in the state directory (``/var/lib/hostdev`` on a node), rewritten
atomically (write to a temp file, fsync, rename, fsync the directory) on every change, so an
agent killed at any instant leaves either the old or the new file, never a torn one. The
original driver is recorded *before* the first write to a device, so a restore after any crash
or restart knows where the device came from.

The step journal lives in a file of its own and is replaced atomically but not fsynced: it only
tells the next run what was interrupted (planning always starts from the kernel's state), it
must survive a killed agent (the page cache does) but not a power loss (a reboot resets the
devices anyway), and an fsync per step would dominate a large bind (two per step).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from typing import Any

from hostdev.deviceplugin.atomicfile import atomic_write
from hostdev.host.address import PciAddress, PciAddressError

FILENAME = "original-drivers.json"
JOURNAL = "in-progress.json"
VERSION = 1


class StateFileError(RuntimeError):
    """The state file exists but cannot be used; it is left untouched."""


class DriverMemory:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, FILENAME)
        self.journal_path = os.path.join(state_dir, JOURNAL)
        self._originals: dict[PciAddress, str | None] = {}
        self._autoprobe: dict[PciAddress, bool] = {}
        self._in_progress: dict[str, Any] | None = None
        self._load()

    @property
    def originals(self) -> Mapping[PciAddress, str | None]:
        return dict(self._originals)

    @property
    def autoprobe(self) -> Mapping[PciAddress, bool]:
        """PF -> its ``sriov_drivers_autoprobe`` before hostdev turned it off."""
        return dict(self._autoprobe)

    @property
    def interrupted_step(self) -> dict[str, Any] | None:
        """The step a previous run was executing when it stopped (None: it finished cleanly)."""
        return self._in_progress

    def _load(self) -> None:
        self._in_progress = self._load_journal()
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise StateFileError(
                f"state file {self.path} is unreadable ({e}); it records the original drivers "
                "of devices hostdev moved: fix it or move it away (restores then forget them)"
            ) from e
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise StateFileError(
                f"state file {self.path}: expected {{'version': {VERSION}, ...}}, "
                "left untouched; fix it or move it away"
            )
        for addr, drv in self._entries(data, "devices", "originalDriver"):
            self._originals[addr] = drv if isinstance(drv, str) and drv else None
        # "pfs" is absent in files written before autoprobe values were remembered
        for addr, flag in self._entries(data, "pfs", "sriovDriversAutoprobe"):
            if isinstance(flag, bool):
                self._autoprobe[addr] = flag

    def _entries(self, data: dict[str, Any], key: str, field: str) -> list[tuple[PciAddress, Any]]:
        """(address, entry[field]) of the mapping ``data[key]`` (address -> {field: value})."""
        entries = data.get(key)
        if entries is None:
            return []
        if not isinstance(entries, dict):
            raise StateFileError(f"state file {self.path}: {key!r} must be a mapping")
        out = []
        for name, entry in entries.items():
            try:
                addr = PciAddress.parse(name)
            except PciAddressError as e:
                raise StateFileError(f"state file {self.path}: {e}") from e
            out.append((addr, entry.get(field) if isinstance(entry, dict) else None))
        return out

    def _load_journal(self) -> dict[str, Any] | None:
        try:
            with open(self.journal_path, encoding="utf-8") as f:
                step = json.load(f)
        except (OSError, ValueError):
            return None  # no journal (or a torn one after a power loss): nothing to report
        return step if isinstance(step, dict) else None

    def _save(self) -> None:
        body = {
            "version": VERSION,
            "devices": {str(a): {"originalDriver": d} for a, d in sorted(self._originals.items())},
            "pfs": {
                str(a): {"sriovDriversAutoprobe": v} for a, v in sorted(self._autoprobe.items())
            },
        }
        self._replace(self.path, body, durable=True)

    def _replace(self, path: str, body: object, *, durable: bool) -> None:
        text = json.dumps(body, indent=1, sort_keys=True) + "\n"
        atomic_write(path, text.encode("utf-8"), durable=durable)

    def remember(self, addr: PciAddress, driver: str | None) -> None:
        if addr in self._originals:
            return  # the first original wins: it is where the device came from
        self._originals[addr] = driver
        self._save()

    def forget(self, addr: PciAddress) -> None:
        if addr in self._originals:
            del self._originals[addr]
            self._save()

    def remember_autoprobe(self, pf: PciAddress, value: bool) -> None:
        if pf not in self._autoprobe:  # the first value wins, as for drivers
            self._autoprobe[pf] = value
            self._save()

    def forget_autoprobe(self, pf: PciAddress) -> None:
        if pf in self._autoprobe:
            del self._autoprobe[pf]
            self._save()

    def begin(self, step: Mapping[str, Any]) -> None:
        self._in_progress = dict(step)
        self._replace(self.journal_path, self._in_progress, durable=False)

    def done(self) -> None:
        if self._in_progress is not None:
            self._in_progress = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.journal_path)
