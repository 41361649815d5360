"""``hostdev``: the command line (no cluster needed)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hostdev import __version__
from hostdev.cli_apply import add_apply_parser
from hostdev.cli_detach import run_detached
from hostdev.host.pciids import PciIds
from hostdev.host.snapshot import snapshot
from hostdev.host.sysfs import HostRootError, Sysfs
from hostdev.scan import render_text, report


def _scan(args: argparse.Namespace) -> int:
    sysfs = Sysfs(args.host_root)
    try:
        inv = sysfs.discover()
    except HostRootError as e:
        print(f"hostdev scan: {e.strerror}", file=sys.stderr)
        return 1
    rep = report(inv, PciIds.find(args.host_root, args.pci_ids))
    if args.json:
        json.dump(rep, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render_text(rep))
    return 0


def _snapshot(args: argparse.Namespace) -> int:
    try:
        n = snapshot(args.host_root, args.dir)
    except HostRootError as e:
        print(f"hostdev snapshot: {e.strerror}", file=sys.stderr)
        return 1
    print(
        f"saved {n} PCI devices to {args.dir} (scan it with: hostdev scan --host-root {args.dir})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hostdev", description="PCI passthrough for KubeVirt")
    p.add_argument("--version", action="version", version=f"hostdev {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    scan = sub.add_parser(
        "scan",
        help="print this host's passthrough readiness and PCI devices",
        description="Report IOMMU/VFIO readiness and every PCI function with its IOMMU group, "
        "driver, NUMA node, SR-IOV capacity and whether it can be assigned (and why not). "
        "Exit code 0 even when nothing is assignable; 1 when the host root cannot be read.",
    )
    scan.add_argument("--host-root", default="/", help="scan a saved or fake host tree (default /)")
    scan.add_argument("--json", action="store_true", help="machine-readable output")
    scan.add_argument("--pci-ids", help="pci.ids file to name devices (default: hwdata/pciutils)")
    scan.set_defaults(func=_scan)
    snap = sub.add_parser(
        "snapshot",
        help="save this host's PCI/IOMMU/VFIO view into a directory (for bug reports and tests)",
        description="Copy exactly what discovery reads (PCI attributes, driver/group/SR-IOV "
        "links, IOMMU groups, /dev/vfio names, /proc/cmdline and /proc/interrupts) into DIR, "
        "so that `hostdev scan --host-root DIR` reproduces this host's report elsewhere.",
    )
    snap.add_argument("dir", help="new or empty output directory")
    snap.add_argument("--host-root", default="/", help="host root to copy (default /)")
    snap.set_defaults(func=_snapshot)
    add_apply_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


def run() -> None:
    """Console-script entry point: the work runs detached, so that a kernel read stuck on a
    device lock cannot keep the command from returning (see :mod:`hostdev.cli_detach`)."""
    sys.exit(run_detached(main))


if __name__ == "__main__":
    run()
