"""Who holds our devices: kubelet PodResources (pod, container, device IDs) + the VMI name of
each virt-launcher pod (from the API server, when the agent may list pods)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from hostdev.deviceplugin.nodestate.kube import LauncherPods
from hostdev.deviceplugin.podresources import PodResourcesClient, PodResourcesError
from hostdev.host.address import PciAddress
from hostdev.host.model import Inventory
from hostdev.policy.dra import DRIVER
from hostdev.policy.nodestatus import AllocationRow, allocations_from

log = logging.getLogger(__name__)


class KubeletAllocations:
    def __init__(self, podresources: PodResourcesClient, pods: LauncherPods | None = None) -> None:
        self.podresources = podresources
        self.pods = pods
        self._last_error: str | None = None

    def read(
        self, served: Mapping[str, tuple[PciAddress, ...]], inventory: Inventory
    ) -> tuple[AllocationRow, ...] | None:
        """None when the kubelet cannot be asked (the last report then stays as it is)."""
        try:
            listed = self.podresources.list()
        except PodResourcesError as e:
            if str(e) != self._last_error:  # say it once, not every poll
                log.warning("allocations unknown: %s", e)
                self._last_error = str(e)
            return None
        self._last_error = None
        ours = [p for p in listed if p.resource_name in served or p.resource_name == DRIVER]
        vmis = self.pods.vmis() if ours and self.pods is not None else {}
        return allocations_from(ours, served, inventory, vmis)
