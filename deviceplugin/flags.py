"""The node agent's command line. Apart from the modules the flags configure: parsing the
command line must not import them (the cluster mode and the DRA front end load only after the
first registration with the kubelet)."""

from __future__ import annotations

import argparse
import os

from hostdev.kube import DEFAULT_SERVICE_ACCOUNT_DIR

DEFAULT_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_STATE_DIR = "/var/lib/hostdev"
DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
DEFAULT_REGISTRY_DIR = "/var/lib/kubelet/plugins_registry"
DEFAULT_PLUGINS_DIR = "/var/lib/kubelet/plugins"
DEFAULT_CDI_DIR = "/var/run/cdi"
NODESTATE_RESYNC = 300.0  # seconds between re-applies of an unchanged NodeState spec


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter without ``shutil``: argparse makes one per add_argument, and its
    terminal-width lookup imports shutil, which imports zlib, bz2 and lzma (~2 ms of every
    start of the agent). Same width rule as ``shutil.get_terminal_size``."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns() - 2)


def _columns() -> int:
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(1).columns or 80
    except OSError:
        return 80


def parse_args(argv: list[str] | None = None, description: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="hostdev-node", description=description, formatter_class=_Formatter
    )
    p.add_argument("--host-root", default="/", help="where the host's /sys and /dev are")
    p.add_argument("--plugin-dir", default=DEFAULT_PLUGIN_DIR, help="kubelet device-plugin dir")
    p.add_argument(
        "--state-dir", default=DEFAULT_STATE_DIR, help="where the last device lists are saved"
    )
    p.add_argument("--config", help="YAML list of {resourceName, selector, strategy?}")
    p.add_argument(
        "--metrics-port", type=int, default=9101, help="/metrics and /healthz port (0: off)"
    )
    p.add_argument("--metrics-addr", default="", help="address for the metrics port")
    p.add_argument("--resync-seconds", type=float, default=60.0, help="full rescan period")
    p.add_argument("--no-uevents", action="store_true", help="do not open the kernel uevent socket")
    p.add_argument("--log-level", default="INFO")
    add_cluster_args(p)  # --node-name / NODE_NAME: resources come from the node's NodeState
    return p.parse_args(argv)


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME") or None,
        help="this node's name (default: env NODE_NAME, from the downward API): apply "
        "PassthroughNodeState <node-name> and report its status (cluster mode)",
    )
    p.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG") or None,
        help="kubeconfig file (default: env KUBECONFIG, else the in-cluster service account)",
    )
    p.add_argument(
        "--service-account-dir",
        default=DEFAULT_SERVICE_ACCOUNT_DIR,
        help="without --kubeconfig: where the pod's service-account token and ca.crt are "
        f"mounted ({DEFAULT_SERVICE_ACCOUNT_DIR})",
    )
    p.add_argument(
        "--pod-resources-socket",
        default=DEFAULT_POD_RESOURCES_SOCKET,
        help="kubelet PodResources socket, for the allocation report "
        f"(default {DEFAULT_POD_RESOURCES_SOCKET})",
    )
    p.add_argument(
        "--nodestate-resync-seconds",
        type=float,
        default=NODESTATE_RESYNC,
        help="re-apply the NodeState spec this often even without a change",
    )
    add_dra_args(p)


def add_dra_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dra",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="in cluster mode, also be the DRA driver pci.hostdev.io for resources whose "
        "NodeState entries say allocation: DRA (default on)",
    )
    p.add_argument(
        "--kubelet-registry-dir",
        default=DEFAULT_REGISTRY_DIR,
        help=f"where the kubelet looks for plugin registration sockets ({DEFAULT_REGISTRY_DIR})",
    )
    p.add_argument(
        "--kubelet-plugins-dir",
        default=DEFAULT_PLUGINS_DIR,
        help=f"kubelet plugins dir: the DRA socket and metadata go to <it>/pci.hostdev.io "
        f"({DEFAULT_PLUGINS_DIR}); must be the same path on the host",
    )
    p.add_argument(
        "--cdi-dir",
        default=DEFAULT_CDI_DIR,
        help=f"where the container runtime reads CDI specs ({DEFAULT_CDI_DIR})",
    )


def cluster_mode(args: argparse.Namespace) -> bool:
    """NodeState mode: a node name and no --config (a resource file means file mode)."""
    return bool(getattr(args, "node_name", None)) and not getattr(args, "config", None)
