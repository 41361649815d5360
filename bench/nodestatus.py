"""NodeState status: render time, change-check time and body size against fake hosts of growing
size (every VF served as a resource). Prints figures only.

.venv/bin/python bench/nodestatus.py [--repeat N]

The body size matters: etcd refuses objects above 1.5 MiB (--max-request-bytes), and the
whole status of a node is one object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from timing import SIZES, timed

from hostdev.host import Sysfs
from hostdev.policy.nodestatus import (
    SUCCEEDED,
    AllocationRow,
    SyncOutcome,
    render_status,
    status_changed,
)
from hostdev.testing.scenarios import sriov_scale

NOW = "2026-01-01T00:00:00Z"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    print(
        f"{'devices':>8} {'VFs':>6} {'render p50':>11} {'changed? p50':>13} "
        f"{'body KiB':>9} {'per device B':>13} {'all allocated: listed':>22} {'KiB':>5}"
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
            body = len(json.dumps({"status": status}, separators=(",", ":")))
            n = status["deviceCount"]
            # Every VF held by a VM: allocations take room, the device list may be cut.
            rows = tuple(
                AllocationRow(a, r, "vms", f"virt-launcher-vm{i}-abcde", "compute", f"vm{i}")
                for i, (a, r) in enumerate(sorted(served.items()))
            )
            busy = render_status(inv, outcome, rows, now=NOW)
            busy_kib = len(json.dumps({"status": busy}, separators=(",", ":"))) / 1024
            print(
                f"{n:>8} {len(served):>6} {statistics.median(render) * 1e3:>9.1f}ms "
                f"{statistics.median(check) * 1e3:>11.1f}ms {body / 1024:>9.0f} {body / n:>13.0f}"
                f" {len(busy['devices']):>16} of {n:<4} {busy_kib:>5.0f}"
            )


if __name__ == "__main__":
    main()
