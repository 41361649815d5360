"""Instructions the node agent's start path costs, counted by valgrind (callgrind's Ir).

Wall-clock start figures on a shared 2-core machine move by 20-40 ms from one batch of runs to
the next (the same tree: 1 x 8 cluster-cold medians 0.115-0.161 s within an hour), which is
more than most start-up changes save. Instruction counts do not move with the machine's load:
the same interpreter, files and inputs give the same count (string hashing is fixed here,
PYTHONHASHSEED=0, so dict layouts repeat too). Counted in the agent's "installed" interpreter
layout (deviceplugin_common.agent_python: compiled bytecode, the start-up cache written as the
image's builder writes it):

- the bare interpreter (``python -c pass``);
- the imports of the agent's start path (``startcache.START_PATH``, what the agent imports
  before its first ListAndWatch answer) with the start-up cache, as the agent starts;
- the same without the cache.

It counts imports only, not the agent's first GET, scan and serve (those wait on the API
server and the kubelet, which valgrind would slow 50-fold); on the 1 x 8 start the imports are
~80 % of the time from spawn. Needs valgrind (Debian package ``valgrind``).

Usage: .venv/bin/python bench/start_instructions.py [--repeat N]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess

from deviceplugin_common import agent_python, load

IMPORTS = (
    "import sys, importlib\n"
    "from hostdev.deviceplugin import startcache\n"
    "if sys.argv[1] == 'cache' and not startcache.install():\n"
    "    raise SystemExit('no start-up cache at ' + startcache.cache_file())\n"
    "for m in startcache.START_PATH: importlib.import_module(m)\n"
)


def instructions(python: str, env: dict[str, str], *argv: str) -> int:
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", python, *argv],
        env=env,
        cwd="/",  # the checkout's operator/ would shadow the standard library's module
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"valgrind {' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return int(found[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2, help="counts per case (they agree)")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind missing: apt-get install valgrind")
    python, env = agent_python("installed")
    env = {**env, "PYTHONHASHSEED": "0"}
    cases = {
        "bare interpreter (python -c pass)": ("-c", "pass"),
        "start path imports, with the start-up cache": ("-c", IMPORTS, "cache"),
        "start path imports, without it": ("-c", IMPORTS, "plain"),
    }
    counts = {}
    for label, argv in cases.items():
        runs = [instructions(python, env, *argv) for _ in range(args.repeat)]
        counts[label] = statistics.median(runs)
        spread = max(runs) - min(runs)
        print(
            f"{label:46s} {counts[label] / 1e6:8.1f} M instructions "
            f"(spread {spread / 1e3:.0f} k over {len(runs)}; load {load():.2f})",
            flush=True,
        )
    bare, cached, plain = counts.values()
    print(
        f"the cache saves {(plain - cached) / 1e6:.1f} M instructions, "
        f"{(plain - cached) / (plain - bare) * 100:.1f} % of the imports beyond the bare "
        "interpreter",
        flush=True,
    )


if __name__ == "__main__":
    main()
