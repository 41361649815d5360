"""``hostdev apply``: converge this host to a node.yaml (clusterless), printing the plan.

The same engine the node agent runs for its PassthroughNodeState
(:func:`hostdev.deviceplugin.config.apply.converge`).
"""

from __future__ import annotations

import argparse
import re
import sys

import yaml

from hostdev.deviceplugin.config.apply import converge
from hostdev.deviceplugin.config.memory import DriverMemory, StateFileError
from hostdev.deviceplugin.persist import saved_allocations
from hostdev.host.sysfs import HostRootError, Sysfs
from hostdev.policy.nodeconfig import NodeConfigError, parse_node_config

EXIT_BAD_INPUT = 4


class _Loader(yaml.SafeLoader):
    """YAML without YAML 1.1's base-60 numbers: an unquoted ``0000:3b:00.0`` stays a string
    (SafeLoader would read it as the float 60.0)."""


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, rx)
        for tag, rx in resolvers
        if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^[-+]?(0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0o?[0-7_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?([0-9][0-9_]*)?\.[0-9_]*([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> object:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


DEFAULT_STATE_DIR = "/var/lib/hostdev"


def add_apply_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "apply",
        help="bind devices / create VFs as a node.yaml says (prints the plan)",
        description="Converge this host to the desired state in --config (the spec of a "
        "PassthroughNodeState: pfs[].numVfs, devices[].driver/resourceName): plan, print, "
        "apply with a read-back check after every write, restore devices hostdev moved "
        "that are no longer wanted. Exit codes: 0 converged (or a dry run without "
        "refusals), 1 some change refused by a safety guard (reasons printed; the refused "
        "devices, and everything that only served their change, left as they were), 2 a kernel "
        "write failed (the plan stopped; device state printed), 3 not converging, "
        "4 bad input (config, state file, host root).",
    )
    p.add_argument("--config", required=True, help="node.yaml (a PassthroughNodeState or its spec)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--host-root", default="/", help="host root to read and write (default /)")
    p.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        help=f"where original drivers are remembered (default {DEFAULT_STATE_DIR})",
    )
    p.set_defaults(func=run_apply)


def run_apply(args: argparse.Namespace) -> int:
    def fail(msg: str) -> int:
        print(f"hostdev apply: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT

    try:
        with open(args.config, encoding="utf-8") as f:
            data = load_yaml(f.read())
    except OSError as e:
        return fail(f"cannot read {args.config}: {e.strerror}")
    except yaml.YAMLError as e:
        return fail(f"{args.config} is not valid YAML: {e}")
    try:
        config = parse_node_config(data)
    except NodeConfigError as e:
        return fail(f"{args.config}: {e}")
    try:
        memory = DriverMemory(args.state_dir)
    except StateFileError as e:
        return fail(str(e))
    sysfs = Sysfs(args.host_root)
    try:
        result = converge(
            sysfs,
            memory,
            config,
            dry_run=args.dry_run,
            echo=print,
            # the device plugin's saved lists (the agent's --state-dir): VFs handed to pods
            allocated=lambda: saved_allocations(args.state_dir),
        )
    except HostRootError as e:
        return fail(e.strerror or str(e))
    rc = result.exit_code
    verdict = {
        0: "dry run: nothing changed" if args.dry_run else "converged",
        1: f"{len(result.refusals)} change(s) refused (see REFUSED above)",
        2: "a step failed; the plan stopped (see above)",
        3: "did not converge",
    }[rc]
    print(f"hostdev apply: {verdict} ({len(result.executed)} step(s) executed)")
    return rc
