"""Discovery / `hostdev scan` time against fake hosts of growing size. Prints figures only.

.venv/bin/python bench/scan.py [--repeat N]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

from timing import SIZES, timed

from hostdev.cli import main as cli
from hostdev.host import Sysfs
from hostdev.testing.scenarios import sriov_scale


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    print(
        f"{'devices':>8} {'VFs':>6} {'discover p50':>13} {'min':>8} {'per dev':>9} "
        f"{'scan --json p50':>16}"
    )
    for pfs, vfs in SIZES:
        with tempfile.TemporaryDirectory() as d:
            sriov_scale(Path(d), pfs=pfs, vfs=vfs)
            sysfs = Sysfs(d)
            n = len(sysfs.discover().devices)  # also warms the page cache, as on a running node
            disc = timed(sysfs.discover, args.repeat)

            def scan(root: str = d) -> None:
                with redirect_stdout(io.StringIO()) as buf:
                    cli(["scan", "--host-root", root, "--json"])
                json.loads(buf.getvalue())

            full = timed(scan, max(3, args.repeat // 2))
            med = statistics.median(disc)
            print(
                f"{n:>8} {pfs * vfs:>6} {med * 1e3:>11.1f}ms {min(disc) * 1e3:>6.1f}ms "
                f"{med / n * 1e6:>7.1f}us {statistics.median(full) * 1e3:>14.1f}ms"
            )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"max RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
