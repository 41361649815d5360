"""Converge a node to its desired state: discover -> gather facts -> plan -> execute, repeated
until nothing is left to do (a numVfs change needs a second round for the VFs it creates).

The one engine behind ``hostdev apply`` and the node agent's NodeState loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hostdev.deviceplugin.config.executor import ExecResult, Executor, KernelIO
from hostdev.deviceplugin.config.facts import AddressSource, gather_facts
from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.host.address import PciAddress
from hostdev.host.model import Inventory
from hostdev.host.sysfs import Sysfs
from hostdev.policy.nodeconfig import NodeConfig
from hostdev.policy.plan import Plan, Refusal, Step, plan

MAX_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class ApplyResult:
    plans: tuple[Plan, ...]
    executed: tuple[Step, ...]
    failure: ExecResult | None
    refusals: tuple[Refusal, ...]
    converged: bool
    dry_run: bool
    # The host as the last round read it, when that round changed nothing (the caller need
    # not read all of it again: a second discovery of a 4,096-VF node cost ~4 MiB and ~0.3 s)
    inventory: Inventory | None = None

    @property
    def exit_code(self) -> int:
        """0 converged (or a clean dry run), 1 refusals, 2 a step failed, 3 no progress."""
        if self.failure is not None:
            return 2
        if self.refusals:
            return 1
        return 0 if self.converged or self.dry_run else 3


def converge(
    sysfs: Sysfs,
    memory: DriverMemory,
    config: NodeConfig,
    *,
    io: KernelIO | None = None,
    dry_run: bool = False,
    echo: Callable[[str], None] | None = None,
    on_step: Callable[[int, Step], None] | None = None,
    settle: float | None = None,
    addresses: AddressSource | None = None,
    allocated: Callable[[], Mapping[PciAddress, str]] | None = None,
) -> ApplyResult:
    """``allocated``: devices handed to pods and to whom (the agent: its device plugins';
    ``hostdev apply``: their saved lists); ``addresses``: the host's interface addresses
    (default: netlink)."""
    say = echo or (lambda _line: None)
    allocations = allocated or dict
    kwargs = {} if settle is None else {"settle": settle}
    executor = Executor(sysfs, memory, io, on_step=on_step, echo=say, **kwargs)
    if memory.interrupted_step is not None:
        say(
            "note: a previous run stopped during step "
            f"{memory.interrupted_step}; planning again from the kernel's current state"
        )
    plans: list[Plan] = []
    executed: list[Step] = []
    for rnd in range(1, MAX_ROUNDS + 1):
        inv = sysfs.discover()
        facts = gather_facts(sysfs, inv, addresses=addresses, allocated=allocations())
        p = plan(config, inv, facts, memory.originals, memory.autoprobe, managed=memory.numvfs)
        plans.append(p)
        say(f"round {rnd}: " + p.render())
        if dry_run or not p.steps:
            return ApplyResult(
                tuple(plans), tuple(executed), None, p.refusals, p.converged, dry_run, inv
            )
        res = executor.run(p.steps)
        executed += res.done
        if not res.ok:
            say(f"stopped: {res.error}")
            say("device state now:")
            for line in res.aftermath:
                say(f"  {line}")
            return ApplyResult(tuple(plans), tuple(executed), res, p.refusals, False, dry_run)
    say(f"not converged after {MAX_ROUNDS} rounds (is something else changing these devices?)")
    return ApplyResult(tuple(plans), tuple(executed), None, plans[-1].refusals, False, dry_run)
