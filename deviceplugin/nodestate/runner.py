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
import os
import threading
from collections.abc import Mapping, Sequence

from kubernetes import client, config

from hostdev.deviceplugin.config.memory import DriverMemory, StateFileError
from hostdev.deviceplugin.dra.setup import add_dra_args, start_dra
from hostdev.deviceplugin.manager import PluginManager
from hostdev.deviceplugin.nodestate.allocations import KubeletAllocations
from hostdev.deviceplugin.nodestate.kube import LauncherPods, LauncherPodWatch, NodeStateClient
from hostdev.deviceplugin.nodestate.loop import LoopSettings, NodeStateLoop
from hostdev.deviceplugin.nodestate.sync import Syncer
from hostdev.deviceplugin.persist import saved_allocations
from hostdev.deviceplugin.podresources import DEFAULT_SOCKET, PodResourcesClient
from hostdev.deviceplugin.resources import ResourceConfig
from hostdev.host.address import PciAddress
from hostdev.host.model import Inventory
from hostdev.host.sysfs import Sysfs
from hostdev.policy.mdev import MdevSpec
from hostdev.policy.nodeconfig import DEVICE_PLUGIN, DRA
from hostdev.policy.selector import DeviceSelector

log = logging.getLogger(__name__)

EXIT_SETUP = 2


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
        "--pod-resources-socket",
        default=DEFAULT_SOCKET,
        help=f"kubelet PodResources socket, for the allocation report (default {DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--nodestate-resync-seconds",
        type=float,
        default=LoopSettings().resync,
        help="re-apply the NodeState spec this often even without a change",
    )
    add_dra_args(p)


def cluster_mode(args: argparse.Namespace) -> bool:
    """NodeState mode: a node name and no --config (a resource file means file mode)."""
    return bool(getattr(args, "node_name", None)) and not getattr(args, "config", None)


def to_resource_configs(
    served: Mapping[str, tuple[PciAddress, ...]],
    dra: frozenset[str] = frozenset(),
    mdevs: Sequence[tuple[str, MdevSpec]] = (),
) -> tuple[ResourceConfig, ...]:
    """The resolved devices per resource, as the manager's resource list (exact addresses);
    the resources named in ``dra`` go to the DRA front end; ``mdevs``: mediated-device
    resources (instances the agent keeps)."""
    pci = tuple(
        ResourceConfig(
            name,
            DeviceSelector(pci_addresses=frozenset(addrs)),
            allocation=DRA if name in dra else DEVICE_PLUGIN,
        )
        for name, addrs in sorted(served.items())
        if addrs
    )
    return pci + tuple(ResourceConfig(name, DeviceSelector(), mdev=spec) for name, spec in mdevs)


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


def saved_resources(manager: PluginManager) -> dict[str, tuple[PciAddress, ...]]:
    """What the plugins served before this start (their saved lists), as resource -> devices."""
    return {
        name: tuple(sorted({a for adv in saved.devices for a in adv.unit.addresses}))
        for name, saved in sorted(manager.saved.items())
        if saved.devices
    }


def api_client(kubeconfig: str | None) -> client.ApiClient:
    conf = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=conf)  # type: ignore[no-untyped-call]
    else:
        config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
    return client.ApiClient(conf)


async def run_cluster(args: argparse.Namespace, manager: PluginManager, stop: asyncio.Event) -> int:
    """Run the NodeState loop until ``stop`` is set (or the loop dies)."""
    node = str(args.node_name)
    try:
        memory = DriverMemory(args.state_dir)
    except StateFileError as e:
        log.error("%s", e)
        return EXIT_SETUP
    try:
        api = api_client(args.kubeconfig)
    except (config.ConfigException, OSError) as e:
        log.error("cannot reach the API server for NodeState %s: %s", node, e)
        return EXIT_SETUP
    # Serve what was served before this restart at once (the kubelet re-admits running VMs'
    # pods only while their resources exist); the first sync corrects it once the NodeState
    # is read, which needs the API server.
    seed = saved_resources(manager)
    if seed:
        log.info("serving the %d saved resources until NodeState %s is read", len(seed), node)
        await manager.apply(to_resource_configs(seed))
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
        served=seed or None,
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
        api.close()  # type: ignore[no-untyped-call]
    if worker.exception() is not None:
        log.error("NodeState loop for %s died: %s", node, worker.exception())
        return 1
    return 0
