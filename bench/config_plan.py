"""Configuration engine cost on fake hosts of growing size. Prints figures only.

- plan: the pure planner for a node whose every VF is wanted on vfio-pci (already converged:
  the steady-state cost the agent pays on every NodeState event), and for the same node with
  every VF still on its host driver (a full bind plan);
- facts: gather_facts (routes, mounts, /sys/dev links, every /proc/*/fd, driver_override of
  every function) on the fake tree plus on this machine's real /proc;
- converge: a full bind of N VFs through the simulated kernel, per step (fsynced state file
  writes included: that is what a step costs apart from the kernel's own work).

.venv/bin/python bench/config_plan.py [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from timing import SIZES, timed

from hostdev.deviceplugin.config.apply import converge
from hostdev.deviceplugin.config.facts import gather_facts
from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.host import Sysfs
from hostdev.policy.guards import GuardFacts
from hostdev.policy.nodeconfig import parse_node_config
from hostdev.policy.plan import plan
from hostdev.testing.fakekernel import FakeKernel
from hostdev.testing.scenarios import sriov_scale

SPEC = {"devices": [{"selector": {"vendors": ["8086"], "devices": ["1889"]}}]}


def med(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    return statistics.median(timed(fn, repeat))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    cfg = parse_node_config(SPEC)
    print(
        f"{'VFs':>6} {'plan converged':>15} {'plan full bind':>15} {'steps':>6} "
        f"{'facts (tree)':>13} {'facts (this host /)':>20}"
    )
    host = Sysfs("/")
    for pfs, vfs in SIZES:
        with tempfile.TemporaryDirectory() as d:
            sriov_scale(Path(d), pfs=pfs, vfs=vfs)  # VFs on vfio-pci
            sysfs = Sysfs(d)
            inv = sysfs.discover()
            done = med(lambda i=inv: plan(cfg, i, GuardFacts(), {}), args.repeat)
            h = sriov_scale(Path(d) / "host", pfs=pfs, vfs=vfs)
            for a, dev in Sysfs(str(h.root)).discover().devices.items():
                if dev.is_vf:
                    h.bind(a, "iavf")
            inv2 = Sysfs(str(h.root)).discover()
            full_plan = plan(cfg, inv2, GuardFacts(), {})
            full = med(lambda i=inv2: plan(cfg, i, GuardFacts(), {}), args.repeat)
            facts = med(lambda s=sysfs, i=inv: gather_facts(s, i), args.repeat)
            real = med(lambda s=host, i=inv: gather_facts(s, i), args.repeat)
            print(
                f"{pfs * vfs:>6} {done * 1e3:>13.1f}ms {full * 1e3:>13.1f}ms "
                f"{len(full_plan.steps):>6} {facts * 1e3:>11.1f}ms {real * 1e3:>18.1f}ms"
            )
    print()
    print(f"{'VFs':>6} {'converge (fake kernel)':>23} {'steps':>6} {'per step':>9}")
    for n in (16, 64):
        with tempfile.TemporaryDirectory() as d:
            h = sriov_scale(Path(d) / "root", pfs=1, vfs=n)
            for a, dev in Sysfs(str(h.root)).discover().devices.items():
                if dev.is_vf:
                    h.bind(a, "iavf")
            k = FakeKernel(h)
            t = time.perf_counter()
            res = converge(Sysfs(str(h.root)), DriverMemory(f"{d}/state"), cfg, io=k)
            dt = time.perf_counter() - t
            assert res.converged, res
            steps = len(res.executed)
            print(f"{n:>6} {dt * 1e3:>21.0f}ms {steps:>6} {dt / steps * 1e3:>7.2f}ms")


if __name__ == "__main__":
    main()
