"""The DRA front end's command-line flags and its start in cluster mode."""

from __future__ import annotations

import argparse
import asyncio
import logging

from kubernetes import client

from hostdev.deviceplugin.dra.frontend import (
    DEFAULT_CDI_DIR,
    DEFAULT_PLUGINS_DIR,
    DEFAULT_REGISTRY_DIR,
    DraFrontEnd,
    DraSettings,
)
from hostdev.deviceplugin.dra.kube import DraApi
from hostdev.deviceplugin.dra.publisher import SlicePublisher
from hostdev.deviceplugin.manager import PluginManager
from hostdev.host.pciids import PciIds

log = logging.getLogger(__name__)


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


async def start_dra(
    args: argparse.Namespace, manager: PluginManager, api: client.ApiClient, node: str
) -> DraFrontEnd | None:
    """The DRA front end, started (None when turned off)."""
    if not getattr(args, "dra", True):
        log.info("DRA front end off (--no-dra): resources with allocation DRA are not served")
        return None
    dra_api = DraApi(api, node, manager.metrics)
    ids = await asyncio.to_thread(PciIds.find, args.host_root)
    fe = DraFrontEnd(
        manager,
        DraSettings(
            node=node,
            state_dir=args.state_dir,
            registry_dir=args.kubelet_registry_dir,
            plugins_dir=args.kubelet_plugins_dir,
            cdi_dir=args.cdi_dir,
        ),
        get_claim=dra_api.get_claim,
        publisher=SlicePublisher(dra_api),
        ids=ids,
    )
    await fe.start()
    manager.health_checks.append(fe.health)
    return fe
