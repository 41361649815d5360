"""Client for the kubelet PodResources API v1 (``List``): which container holds which devices.

The kubelet serves it on a unix socket (``/var/lib/kubelet/pod-resources/kubelet.sock``);
device IDs are what the device plugins advertised (for hostdev: PCI addresses).
"""

from __future__ import annotations

import os

import grpc

from hostdev.deviceplugin.api.podresources.v1 import api_pb2, api_pb2_grpc
from hostdev.policy.dra import DRIVER, address_of
from hostdev.policy.nodestatus import PodDevices

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
# The kubelet caps responses at 16 MiB (podresources.DefaultMaxMsgSize); match it.
MAX_MESSAGE = 16 * 1024 * 1024


class PodResourcesError(RuntimeError):
    """The kubelet could not be asked; the message says why (socket, RPC status)."""


class PodResourcesClient:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, *, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def list(self) -> tuple[PodDevices, ...]:
        """Every container's devices, one entry per (container, resource)."""
        if not os.path.exists(self.socket_path):
            raise PodResourcesError(
                f"kubelet PodResources socket {self.socket_path} does not exist (is the "
                "pod-resources directory mounted into the agent?)"
            )
        target = f"unix://{os.path.abspath(self.socket_path)}"
        with grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", MAX_MESSAGE)]
        ) as channel:
            stub = api_pb2_grpc.PodResourcesListerStub(channel)
            try:
                resp = stub.List(api_pb2.ListPodResourcesRequest(), timeout=self.timeout)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                details = e.details() if isinstance(e, grpc.Call) else str(e)
                raise PodResourcesError(
                    f"PodResources List on {self.socket_path} failed: "
                    f"{code.name if code else 'error'}: {details}"
                ) from e
        return pod_devices(resp)


def pod_devices(resp: api_pb2.ListPodResourcesResponse) -> tuple[PodDevices, ...]:
    """Device-plugin devices per (container, resource); this driver's DRA devices per container
    as resource ``pci.hostdev.io`` with the units' PCI addresses as IDs."""
    out = []
    for pod in resp.pod_resources:
        for c in pod.containers:
            dra = [
                str(a)
                for r in c.dynamic_resources
                for cr in r.claim_resources
                if cr.driver_name == DRIVER
                for a in [address_of(cr.device_name)]
                if a is not None
            ]
            if dra:
                out.append(PodDevices(pod.namespace, pod.name, c.name, DRIVER, tuple(dra)))
            for d in c.devices:
                if d.device_ids:
                    out.append(
                        PodDevices(
                            namespace=pod.namespace,
                            pod=pod.name,
                            container=c.name,
                            resource_name=d.resource_name,
                            device_ids=tuple(d.device_ids),
                        )
                    )
    return tuple(out)
