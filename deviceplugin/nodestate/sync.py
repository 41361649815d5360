"""One sync: a ``PassthroughNodeState`` object -> the configuration engine -> an outcome.

The engine is the one ``hostdev apply`` runs (:func:`hostdev.deviceplugin.config.apply.converge`);
this module only turns the object into a :class:`NodeConfig`, the engine's result into a
:class:`SyncOutcome`, and works out which devices the device plugins should serve.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hostdev.deviceplugin.config.apply import MAX_ROUNDS, ApplyResult, converge
from hostdev.deviceplugin.config.executor import KernelIO
from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.deviceplugin.persist import saved_allocations
from hostdev.host.address import PciAddress
from hostdev.host.model import Inventory
from hostdev.host.sysfs import Sysfs
from hostdev.policy.mdev import MdevSpec
from hostdev.policy.nodeconfig import NodeConfigError, parse_node_config
from hostdev.policy.nodestatus import (
    FAILED,
    SUCCEEDED,
    SyncOutcome,
    refused_devices,
    served_resources,
)

log = logging.getLogger(__name__)

MAX_ERROR = 4000  # characters of lastError; the rest is summarised


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class SyncResult:
    outcome: SyncOutcome
    inventory: Inventory  # after the sync
    # resource -> devices the plugins should serve; None: keep serving what they serve now
    serve: Mapping[str, tuple[PciAddress, ...]] | None
    dra: frozenset[str] = frozenset()  # resources of ``serve`` allocated through DRA
    mdevs: tuple[tuple[str, MdevSpec], ...] = ()  # mediated-device resources (spec.mdevs)


def generation_of(obj: Mapping[str, Any]) -> int | None:
    g = (obj.get("metadata") or {}).get("generation")
    return g if isinstance(g, int) and not isinstance(g, bool) else None


def _clip(text: str) -> str:
    if len(text) <= MAX_ERROR:
        return text
    return text[: MAX_ERROR - 40].rstrip() + f" ... ({len(text) - MAX_ERROR + 40} more chars)"


def _error(result: ApplyResult) -> str:
    if result.failure is not None:
        after = "; ".join(result.failure.aftermath)
        return f"{result.failure.error}" + (f" (device state now: {after})" if after else "")
    if result.refusals:
        return "; ".join(r.describe() for r in result.refusals)
    if not result.converged:
        return (
            f"did not converge after {MAX_ROUNDS} rounds: something else is changing these devices"
        )
    return ""


class Syncer:
    def __init__(
        self,
        sysfs: Sysfs,
        memory: DriverMemory,
        *,
        io: KernelIO | None = None,
        settle: float | None = None,
        now: Callable[[], str] = utc_now,
        allocated: Callable[[], Mapping[PciAddress, str]] | None = None,
    ) -> None:
        self.sysfs = sysfs
        self.memory = memory
        self.io = io
        self.settle = settle
        self.now = now
        # who holds which device (default: the device plugins' saved lists in the state dir)
        self.allocated = allocated or (lambda: saved_allocations(memory.state_dir))

    def discover(self) -> Inventory:
        return self.sysfs.discover()

    def sync(self, obj: Mapping[str, Any]) -> SyncResult:
        name = (obj.get("metadata") or {}).get("name", "?")
        generation = generation_of(obj)
        try:
            config = parse_node_config(obj.get("spec") or {})
        except NodeConfigError as e:
            # Nothing is applied and the plugins keep serving what they serve.
            log.error("NodeState %s generation %s: bad spec: %s", name, generation, e)
            return SyncResult(
                SyncOutcome(FAILED, generation, f"spec: {e}", finished_at=self.now()),
                self.discover(),
                None,
            )
        try:
            result = converge(
                self.sysfs,
                self.memory,
                config,
                io=self.io,
                settle=self.settle,
                echo=lambda line: log.info("NodeState %s: %s", name, line),
                allocated=self.allocated,
            )
        except OSError as e:
            # The host root or the state directory failed us (not a device step).
            msg = f"cannot apply the spec: {e}"
            log.error("NodeState %s generation %s: %s", name, generation, msg)
            return SyncResult(
                SyncOutcome(FAILED, generation, msg, finished_at=self.now()),
                self.discover(),
                None,
            )
        inventory = result.inventory if result.inventory is not None else self.discover()
        last = result.plans[-1] if result.plans else None
        wanted = dict(last.resources) if last is not None else {}
        refused = refused_devices(result.refusals, inventory)
        # Serve what is present and was not refused; health tells the kubelet the rest.
        serve = {a: r for a, r in wanted.items() if a in inventory.devices and a not in refused}
        error = _clip(_error(result))
        state = FAILED if error else SUCCEEDED
        log.log(
            logging.ERROR if error else logging.INFO,
            "NodeState %s generation %s: %s after %d step(s)%s",
            name,
            generation,
            state,
            len(result.executed),
            f": {error}" if error else "",
        )
        return SyncResult(
            SyncOutcome(
                state,
                generation,
                error,
                resources=serve,
                refusals=result.refusals,
                finished_at=self.now(),
            ),
            inventory,
            served_resources(serve),
            config.dra_resources(),
            config.mdevs,
        )
