"""The first moments of cluster mode, before the NodeState loop runs: serve at once.

1. The lists saved before this restart are served immediately (running VMs' pods are
   re-admitted by the kubelet only while their resources exist).
2. This node's ``PassthroughNodeState`` is read (one GET, while the host is scanned), and the
   devices its spec names that the host has now are served: nothing on the host is changed
   before the spec is read, and nothing is changed here at all. The loop's first sync then
   applies the spec (VF counts, drivers) and corrects the lists.

Kept small on purpose: this is on the way from process start to the kubelet's device count,
so it imports neither the configuration engine nor the status code.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hostdev.deviceplugin.config.memory import DriverMemory, StateFileError
from hostdev.deviceplugin.manager import PluginManager
from hostdev.deviceplugin.nodestate.kube import NodeStateClient
from hostdev.deviceplugin.resources import ResourceConfig
from hostdev.host.address import PciAddress
from hostdev.kube.client import ApiClient, ApiError, ConfigError
from hostdev.kube.client import load as load_credentials
from hostdev.policy.frontends import DEVICE_PLUGIN, DRA
from hostdev.policy.nodeconfig import NodeConfigError, parse_node_config, served_now
from hostdev.policy.selector import DeviceSelector

if TYPE_CHECKING:
    from hostdev.policy.mdev import MdevSpec

log = logging.getLogger(__name__)

Served = Mapping[str, tuple[PciAddress, ...]]


class ClusterSetupError(Exception):
    """Cluster mode cannot start; the message says why (nothing was served or changed)."""


@dataclass(frozen=True, slots=True)
class ClusterSetup:
    node: str
    api: ApiClient
    memory: DriverMemory  # the original drivers of devices moved to vfio-pci (state dir)


def cluster_setup(args: argparse.Namespace) -> ClusterSetup:
    """The state file and the API credentials, checked before anything is served."""
    node = str(args.node_name)
    try:
        memory = DriverMemory(args.state_dir)
    except StateFileError as e:
        raise ClusterSetupError(str(e)) from None
    try:
        api = ApiClient(load_credentials(args.kubeconfig, args.service_account_dir))
    except (ConfigError, OSError) as e:
        raise ClusterSetupError(f"cannot reach the API server for NodeState {node}: {e}") from None
    return ClusterSetup(node, api, memory)


@dataclass(frozen=True, slots=True)
class FirstServe:
    """What the start served: resources (None: nothing yet) and their DRA subset."""

    served: Served | None
    dra: frozenset[str] = frozenset()


def to_resource_configs(
    served: Served,
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
    return pci + tuple(
        ResourceConfig(
            name, DeviceSelector(), allocation=DRA if name in dra else DEVICE_PLUGIN, mdev=spec
        )
        for name, spec in mdevs
    )


def saved_resources(manager: PluginManager) -> dict[str, tuple[PciAddress, ...]]:
    """What the plugins served before this start (their saved lists), as resource -> devices."""
    return {
        name: tuple(sorted({a for adv in saved.devices for a in adv.unit.addresses}))
        for name, saved in sorted(manager.saved.items())
        if saved.devices
    }


def from_spec(obj: Mapping[str, Any]) -> tuple[Any, frozenset[str]] | None:
    """The parsed spec and its DRA resources (None: a spec the loop will report as bad)."""
    try:
        config = parse_node_config(obj.get("spec") or {})
    except NodeConfigError:
        return None
    return config, config.dra_resources()


async def first_serve(manager: PluginManager, api: ApiClient | None, node: str) -> FirstServe:
    """Serve the saved lists, then what the host has of the NodeState's spec."""
    seed = saved_resources(manager)
    if seed:
        log.info("serving the %d saved resources until NodeState %s is read", len(seed), node)
        await manager.apply(to_resource_configs(seed))
    manager.request_full_rescan()
    if api is None:
        return FirstServe(seed or None)
    try:
        obj = await asyncio.to_thread(NodeStateClient(api, node).get)
    except ApiError as e:
        log.warning("NodeState %s not read at start (%s): the loop keeps trying", node, e)
        return FirstServe(seed or None)
    parsed = None if obj is None else from_spec(obj)
    if parsed is None:
        return FirstServe(seed or None)
    config, dra = parsed
    if not manager.scanned:
        await manager.wait_scan()  # the scan requested above
    served = served_now(config, manager.view.inventory)
    log.info(
        "NodeState %s read: serving what the host has of it (%s) until the spec is applied",
        node,
        ", ".join(f"{r} ({len(a)})" for r, a in served.items()) or "nothing yet",
    )
    await manager.apply(to_resource_configs(served, dra))
    return FirstServe(served, dra)
