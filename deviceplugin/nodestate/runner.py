"""``hostdev-node --node-name``: the cluster mode of the node agent.

The NodeState loop (threads, blocking Kubernetes client) runs beside the asyncio device-plugin
manager; resources reach the manager through :class:`ManagerSink`, which runs
``PluginManager.apply`` on the manager's event loop and waits for it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Mapping

from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.deviceplugin.dra.setup import start_dra
from hostdev.deviceplugin.manager import PluginManager
from hostdev.deviceplugin.nodestate.allocations import KubeletAllocations
from hostdev.deviceplugin.nodestate.first import FirstServe, to_resource_configs
from hostdev.deviceplugin.nodestate.kube import LauncherPods, LauncherPodWatch, NodeStateClient
from hostdev.deviceplugin.nodestate.loop import LoopSettings, NodeStateLoop
from hostdev.deviceplugin.nodestate.sync import Syncer
from hostdev.deviceplugin.persist import saved_allocations
from hostdev.deviceplugin.podresources import PodResourcesClient
from hostdev.deviceplugin.resources import ResourceConfig
from hostdev.host.address import PciAddress
from hostdev.host.model import Inventory
from hostdev.host.sysfs import Sysfs
from hostdev.kube.client import ApiClient
from hostdev.policy.mdev import MdevSpec

log = logging.getLogger(__name__)


class ManagerSink:
    """``ResourceSink`` for the loop thread: applies on the manager's asyncio loop."""

    def __init__(
        self, manager: PluginManager, loop: asyncio.AbstractEventLoop, timeout: float = 120.0
    ) -> None:
        self.manager = manager
        self.loop = loop
        self.timeout = timeout

    async def _apply(self, resources: tuple[ResourceConfig, ...]) -> None:
        await self.manager.apply(resources)
        # Drivers just changed under the plugins: re-read the host now, not at the next event.
        self.manager.request_full_rescan()

    async def _inventory(self) -> Inventory | None:
        return self.manager.view.inventory if self.manager.scanned else None

    async def _allocated(self) -> dict[PciAddress, str]:
        return self.manager.allocated()

    def allocated(self) -> dict[PciAddress, str] | None:
        """What the device plugins handed to pods, live (None when the loop does not answer)."""
        try:
            return asyncio.run_coroutine_threadsafe(self._allocated(), self.loop).result(10.0)
        except (TimeoutError, RuntimeError, concurrent.futures.CancelledError):
            return None

    def inventory(self) -> Inventory | None:
        """The manager's live host view (read on its loop), None before its first scan or when
        the loop does not answer in time (the caller then discovers itself)."""
        try:
            return asyncio.run_coroutine_threadsafe(self._inventory(), self.loop).result(10.0)
        except (TimeoutError, RuntimeError, concurrent.futures.CancelledError):
            return None

    def apply(
        self,
        resources: Mapping[str, tuple[PciAddress, ...]],
        dra: frozenset[str] = frozenset(),
        mdevs: tuple[tuple[str, MdevSpec], ...] = (),
    ) -> None:
        configs = to_resource_configs(resources, dra, mdevs)
        log.info(
            "serving %s",
            ", ".join(
                f"{c.resource_name} ({len(c.selector.pci_addresses)}{', DRA' if c.dra else ''})"
                for c in configs
            )
            or "no resources",
        )
        asyncio.run_coroutine_threadsafe(self._apply(configs), self.loop).result(self.timeout)


async def run_cluster(
    args: argparse.Namespace,
    manager: PluginManager,
    stop: asyncio.Event,
    *,
    api: ApiClient,
    memory: DriverMemory,
    first: FirstServe,
) -> int:
    """Run the NodeState loop until ``stop`` is set (or the loop dies). ``first``: what the
    start served (:mod:`.first`); the loop's first sync tells the plugins only what differs."""
    node = str(args.node_name)
    # Prepared claims are known before the first sync (units they hold stay held).
    dra = await start_dra(args, manager, api, node)
    sink = ManagerSink(manager, asyncio.get_running_loop())

    def allocated() -> Mapping[PciAddress, str]:
        live = sink.allocated()  # a stuck event loop must not hide allocations: saved lists
        return live if live is not None else saved_allocations(args.state_dir)

    loop = NodeStateLoop(
        NodeStateClient(api, node),
        Syncer(Sysfs(args.host_root), memory, allocated=allocated),
        sink,
        allocations=KubeletAllocations(
            PodResourcesClient(args.pod_resources_socket), LauncherPods(api, node)
        ),
        settings=LoopSettings(resync=args.nodestate_resync_seconds),
        live_inventory=sink.inventory,
        served=first.served,
        pods_gone=LauncherPodWatch(api, node),
        mdev_status=manager.mdev.status,
    )
    log.info("cluster mode: applying PassthroughNodeState %s", node)
    halt = threading.Event()
    worker = asyncio.create_task(asyncio.to_thread(loop.run, halt), name="nodestate")
    stopper = asyncio.create_task(stop.wait(), name="stop")
    try:
        await asyncio.wait({worker, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        halt.set()
        stopper.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        if dra is not None:
            await dra.close()
    if worker.exception() is not None:
        log.error("NodeState loop for %s died: %s", node, worker.exception())
        return 1
    return 0
