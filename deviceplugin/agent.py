"""``hostdev-node``: the node agent.

Start-up order matters: what the kubelet sees first decides whether running VMs' pods are
re-admitted after a restart and how soon a new node offers its devices.

1. File mode (``--config``): the saved lists are served and registered at once, the host is
   scanned and the lists corrected.
2. Cluster mode (``--node-name``): the saved lists at once; this node's PassthroughNodeState is
   read (one GET while the host is scanned) and what the host already has of its spec is
   served; nothing on the host changes before the spec is read (:mod:`.nodestate.first`).

Only then, once the kubelet holds the lists, come the slower parts: the event sources
(inotify, uevents), the NodeState loop (the configuration engine, status reports), the DRA
front end, PodResources, metrics. Their modules are imported at that point (in a worker thread:
the kubelet may already call Allocate), not at start, and the cyclic garbage collector is off
until then (start-up allocates without making garbage cycles; on this kind of machine the
collector's passes over the freshly imported modules took ~50 ms of every start). The
dataclasses on the way take their generated methods compiled from the image
(:mod:`.startcache`). SIGHUP re-reads ``--config``; SIGTERM/SIGINT stop the servers and save
the lists.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse
    import logging

    from hostdev.policy.nodestatus import PodDevices

EXIT_SETUP = 2
# How long the slower start-up work waits for the kubelet to hold the first lists.
FIRST_SERVE_WAIT = 5.0
SWITCH_INTERVAL = 0.0005  # seconds (see main)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from hostdev.deviceplugin import flags

    return flags.parse_args(
        None if argv is None else list(argv), description=__doc__.splitlines()[0]
    )


async def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from hostdev.deviceplugin import flags
    from hostdev.deviceplugin.manager import PluginManager
    from hostdev.deviceplugin.metrics import Metrics
    from hostdev.deviceplugin.resources import ConfigError, ResourceConfig, load_resources_file
    from hostdev.host.sysfs import Sysfs

    log = logging.getLogger("hostdev.node")
    resources: tuple[ResourceConfig, ...] = ()
    if args.config:
        try:
            resources = load_resources_file(args.config)
        except ConfigError as e:
            log.error("%s", e)
            return EXIT_SETUP
    cluster = flags.cluster_mode(args)
    setup = None
    if cluster:
        from hostdev.deviceplugin.nodestate.first import ClusterSetupError, cluster_setup

        try:
            setup = cluster_setup(args)
        except ClusterSetupError as e:
            log.error("%s", e)
            return EXIT_SETUP
    manager = PluginManager(
        Sysfs(args.host_root),
        args.plugin_dir,
        args.state_dir,
        Metrics(),
        resync_interval=args.resync_seconds,
        uevents=not args.no_uevents,
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
    http: asyncio.Server | None = None
    await manager.start(watch=False)
    try:
        if setup is not None:
            from hostdev.deviceplugin.nodestate.first import first_serve

            first = await first_serve(manager, setup.api, setup.node)
        else:
            await manager.apply(resources)  # saved lists first, then the scan corrects them
            log.info(
                "serving %d resources (%s); scanning %s",
                len(resources),
                ", ".join(r.resource_name for r in resources) or "none",
                args.host_root,
            )
            manager.request_full_rescan()
        # The kubelet is being served: the rest of the start-up may take its time.
        if not await manager.wait_served(FIRST_SERVE_WAIT):
            log.info("the kubelet does not hold every list yet; going on with the start-up")
        if not gc.isenabled():
            gc.freeze()  # what start-up made lives on: later collections need not walk it
            gc.enable()
        _uninstall_start_cache(log)
        # The slower modules are imported in a worker thread: the kubelet may already be
        # calling Allocate, and importing the NodeState loop, the configuration engine and
        # the DRA front end on the event loop held every call for 0.1-0.3 s.
        await _import_off_loop(
            "hostdev.deviceplugin.events",
            # The NodeState loop reports status.mdev (manager.mdev loads the mdev code).
            *(
                ("hostdev.deviceplugin.nodestate.runner", "hostdev.deviceplugin.mdev")
                if setup is not None
                else ()
            ),
        )
        manager.start_watching()
        manager.in_use_source = _in_use_source(getattr(args, "pod_resources_socket", None))
        if args.metrics_port:
            from hostdev.deviceplugin.metrics import serve_http

            http = await serve_http(
                manager.metrics, args.metrics_port, manager.health, args.metrics_addr
            )
        if setup is not None:
            from hostdev.deviceplugin.nodestate.runner import run_cluster

            return await run_cluster(
                args, manager, stop, api=setup.api, memory=setup.memory, first=first
            )
        await stop.wait()
    finally:
        await manager.close()
        if http is not None:
            http.close()
        if setup is not None:
            setup.api.close()
    return 0


def _uninstall_start_cache(log: logging.Logger) -> None:
    from hostdev.deviceplugin import startcache

    counts = startcache.uninstall()
    if counts is None:
        log.debug("start-up cache: none at %s", startcache.cache_file())
    else:
        log.debug("start-up cache: %d generated methods found, %d compiled", *counts)


async def _import_off_loop(*modules: str) -> None:
    import asyncio
    import importlib

    for name in modules:
        await asyncio.to_thread(importlib.import_module, name)


def _in_use_source(socket_path: str | None) -> Callable[[], Iterable[PodDevices]] | None:
    """The kubelet's PodResources List, when its socket is there: devices of ended pods may
    then leave the list once they vanish (without it, once allocated means kept forever)."""
    import logging
    import os

    log = logging.getLogger("hostdev.node")
    if not socket_path or not os.path.exists(socket_path):
        log.info("no PodResources socket at %s: allocated devices are never forgotten", socket_path)
        return None
    from hostdev.deviceplugin.podresources import PodResourcesClient

    return PodResourcesClient(socket_path).list


def main(argv: Sequence[str] | None = None) -> None:
    gc.disable()  # until the kubelet holds the first lists (see the module doc)
    from hostdev.deviceplugin import startcache

    startcache.install()  # dataclass methods compiled at install time, if the image has them
    # The event loop (Allocate, ListAndWatch) shares the interpreter with the NodeState loop's
    # and the rescans' threads: each of its syscalls (an Allocate re-reads the unit's group)
    # gives up the GIL and may wait the switch interval to get it back; 5 ms by default, which
    # made the tail of Allocate round trips during a sync.
    sys.setswitchinterval(SWITCH_INTERVAL)
    import asyncio
    import logging

    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
