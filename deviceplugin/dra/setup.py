"""The DRA front end's start in cluster mode (its flags: :mod:`..flags`)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from hostdev.deviceplugin.dra.frontend import DraFrontEnd, DraSettings
from hostdev.deviceplugin.dra.kube import DraApi
from hostdev.deviceplugin.dra.publisher import SlicePublisher
from hostdev.deviceplugin.manager import PluginManager
from hostdev.host.pciids import PciIds
from hostdev.kube.client import ApiClient

log = logging.getLogger(__name__)


async def start_dra(
    args: argparse.Namespace, manager: PluginManager, api: ApiClient, node: str
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
