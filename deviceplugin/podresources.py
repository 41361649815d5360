"""Client for the kubelet PodResources API v1 (``List``): which container holds which devices.

The kubelet serves it on a unix socket (``/var/lib/kubelet/pod-resources/kubelet.sock``);
device IDs are what the device plugins advertised (for hostdev: PCI addresses).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from hostdev.deviceplugin.flags import DEFAULT_POD_RESOURCES_SOCKET
from hostdev.deviceplugin.wire import messages as msg
from hostdev.deviceplugin.wire import rpc
from hostdev.deviceplugin.wire.pb import DecodeError
from hostdev.policy.dra import DRIVER, address_of
from hostdev.policy.nodestatus import PodDevices


class PodResourcesError(RuntimeError):
    """The kubelet could not be asked; the message says why (socket, RPC status)."""


class PodResourcesClient:
    def __init__(
        self, socket_path: str = DEFAULT_POD_RESOURCES_SOCKET, *, timeout: float = 10.0
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def list(self) -> tuple[PodDevices, ...]:
        """Every container's devices, one entry per (container, resource). Blocking: for
        threads without an event loop (the NodeState loop, the agent's resync worker)."""
        if not os.path.exists(self.socket_path):
            raise PodResourcesError(
                f"kubelet PodResources socket {self.socket_path} does not exist (is the "
                "pod-resources directory mounted into the agent?)"
            )
        try:
            raw = rpc.call_blocking(
                os.path.abspath(self.socket_path), msg.POD_RESOURCES_LIST, b"", within=self.timeout
            )
            resp = msg.LIST_POD_RESOURCES_RESPONSE.decode(raw)
        except rpc.RpcError as e:
            raise PodResourcesError(
                f"PodResources List on {self.socket_path} failed: {e.code_name}: {e.details}"
            ) from e
        except DecodeError as e:
            raise PodResourcesError(f"PodResources List on {self.socket_path}: {e}") from e
        return pod_devices(resp)


def pod_devices(resp: Mapping[str, Any]) -> tuple[PodDevices, ...]:
    """Device-plugin devices per (container, resource); this driver's DRA devices per container
    as resource ``pci.hostdev.io`` with the units' PCI addresses as IDs."""
    out = []
    for pod in resp["pod_resources"]:
        for c in pod["containers"]:
            dra = [
                str(a)
                for r in c["dynamic_resources"]
                for cr in r["claim_resources"]
                if cr["driver_name"] == DRIVER
                for a in [address_of(cr["device_name"])]
                if a is not None
            ]
            if dra:
                out.append(PodDevices(pod["namespace"], pod["name"], c["name"], DRIVER, tuple(dra)))
            for d in c["devices"]:
                if d["device_ids"]:
                    out.append(
                        PodDevices(
                            namespace=pod["namespace"],
                            pod=pod["name"],
                            container=c["name"],
                            resource_name=d["resource_name"],
                            device_ids=tuple(d["device_ids"]),
                        )
                    )
    return tuple(out)
