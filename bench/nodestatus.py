"""NodeState status: render time, change-check time, body size and the size of one status write
against fake hosts of growing size (every VF served as a resource). Prints figures only, with
the load average beside them.

.venv/bin/python bench/nodestatus.py [--repeat N]

The body size matters: etcd refuses objects above 1.5 MiB (--max-request-bytes), and the
whole status of a node is one object. Runs of alike VFs are one entry (hostdev.policy.runs).
Columns: the idle body; with every VF held by VMs of 32 VFs each (128 VMs, about a node's pod
limit) and by one VM each (4,096 VMs: no node runs that many pods; the worst case); the merge
patch the agent sends when one VF turns unhealthy (only the keys that changed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from timing import SIZES, timed

from hostdev.host import Sysfs
from hostdev.policy.nodestatus import (
    SUCCEEDED,
    AllocationRow,
    SyncOutcome,
    render_status,
    status_changed,
    status_patch,
)
from hostdev.policy.runs import expand
from hostdev.testing.scenarios import sriov_scale

NOW = "2026-01-01T00:00:00Z"


def kib(obj: Any) -> float:
    return len(json.dumps(obj, separators=(",", ":"))) / 1024


def held(served: dict[Any, str], per_vm: int) -> tuple[AllocationRow, ...]:
    return tuple(
        AllocationRow(
            a, r, "vms", f"virt-launcher-vm{i // per_vm}-abcde", "compute", f"vm{i // per_vm}"
        )
        for i, (a, r) in enumerate(sorted(served.items()))
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    print(
        f"{'devices':>8} {'VFs':>6} {'render p50':>11} {'changed? p50':>13} {'idle KiB':>9} "
        f"{'B/device':>9} {'128 VMs KiB':>12} {'4096 VMs KiB':>13} {'listed':>12} "
        f"{'1-VF write B':>13} {'load':>5}"
    )
    for pfs, vfs in SIZES:
        with tempfile.TemporaryDirectory() as d:
            sriov_scale(Path(d), pfs=pfs, vfs=vfs)
            inv = Sysfs(d).discover()
            served = {a: "example.com/vf" for a, dev in inv.devices.items() if dev.is_vf}
            outcome = SyncOutcome(SUCCEEDED, 1, resources=served, finished_at=NOW)
            status = render_status(inv, outcome, (), now=NOW)
            render = timed(lambda i=inv, o=outcome: render_status(i, o, (), now=NOW), args.repeat)
            again = render_status(inv, outcome, (), previous=status, now=NOW)
            check = timed(lambda s=status, a=again: status_changed(s, a), args.repeat)
            n = status["deviceCount"]
            body = kib({"status": status})
            some = render_status(inv, outcome, held(served, 32), now=NOW)
            every = render_status(inv, outcome, held(served, 1), now=NOW)
            listed = len(expand(every["devices"]))
            # One VF leaves vfio-pci: the status write is a merge patch of the changed keys.
            vf = next(a for a in sorted(served))
            dev = inv.devices[vf]
            flipped = type(inv)(
                node=inv.node,
                devices={**inv.devices, vf: type(dev)(**{**_fields(dev), "driver": "iavf"})},
                groups=inv.groups,
                warnings=inv.warnings,
            )
            after = render_status(flipped, outcome, (), previous=status, now=NOW)
            write = len(json.dumps({"status": status_patch(status, after)}, separators=(",", ":")))
            print(
                f"{n:>8} {len(served):>6} {statistics.median(render) * 1e3:>9.1f}ms "
                f"{statistics.median(check) * 1e3:>11.1f}ms {body:>9.1f} {body * 1024 / n:>9.0f} "
                f"{kib({'status': some}):>12.0f} {kib({'status': every}):>13.0f} "
                f"{listed:>5} of {n:<4} {write:>13} {os.getloadavg()[0]:>5.2f}",
                flush=True,
            )


def _fields(dev: Any) -> dict[str, Any]:
    return {f: getattr(dev, f) for f in dev.__slots__}


if __name__ == "__main__":
    main()
