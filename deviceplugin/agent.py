"""``hostdev-node``: the node agent's device-plugin side.

Start-up order matters for restarts: saved device lists are served and registered first (a
few milliseconds), then the host is scanned and the lists corrected. SIGHUP re-reads
``--config``; SIGTERM/SIGINT stop the servers and save the lists.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable, Sequence

from hostdev.deviceplugin.manager import DEFAULT_PLUGIN_DIR, DEFAULT_STATE_DIR, PluginManager
from hostdev.deviceplugin.metrics import Metrics, serve_http
from hostdev.deviceplugin.nodestate.runner import add_cluster_args, cluster_mode, run_cluster
from hostdev.deviceplugin.podresources import PodResourcesClient
from hostdev.deviceplugin.resources import ConfigError, ResourceConfig, load_resources_file
from hostdev.host.sysfs import Sysfs
from hostdev.policy.nodestatus import PodDevices

log = logging.getLogger("hostdev.node")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hostdev-node", description=__doc__.splitlines()[0])
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


async def run(args: argparse.Namespace) -> int:
    resources: tuple[ResourceConfig, ...] = ()
    if args.config:
        try:
            resources = load_resources_file(args.config)
        except ConfigError as e:
            log.error("%s", e)
            return 2
    metrics = Metrics()
    manager = PluginManager(
        Sysfs(args.host_root),
        args.plugin_dir,
        args.state_dir,
        metrics,
        resync_interval=args.resync_seconds,
        uevents=not args.no_uevents,
        in_use_source=_in_use_source(getattr(args, "pod_resources_socket", None)),
    )
    http = (
        serve_http(metrics, args.metrics_port, manager.health, args.metrics_addr)
        if (args.metrics_port)
        else None
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def reload() -> None:
        try:
            new = load_resources_file(args.config)
        except ConfigError as e:
            log.error("SIGHUP: keeping the current resources: %s", e)
            return
        log.info("SIGHUP: applying %d resources from %s", len(new), args.config)
        pending.add(task := loop.create_task(manager.apply(new)))
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if args.config:
        loop.add_signal_handler(signal.SIGHUP, reload)
    await manager.start()
    try:
        await manager.apply(resources)  # saved lists first, then the scan corrects them
        log.info(
            "serving %d resources (%s); scanning %s",
            len(resources),
            ", ".join(r.resource_name for r in resources) or "none",
            args.host_root,
        )
        manager.request_full_rescan()
        if cluster_mode(args):
            return await run_cluster(args, manager, stop)
        await stop.wait()
    finally:
        await manager.close()
        if http is not None:
            http.shutdown()
    return 0


def _in_use_source(socket_path: str | None) -> Callable[[], Iterable[PodDevices]] | None:
    """The kubelet's PodResources List, when its socket is there: devices of ended pods may
    then leave the list once they vanish (without it, once allocated means kept forever)."""
    if not socket_path or not os.path.exists(socket_path):
        log.info("no PodResources socket at %s: allocated devices are never forgotten", socket_path)
        return None
    return PodResourcesClient(socket_path).list


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
