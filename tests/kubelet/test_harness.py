"""The kubelet-harness itself, against a minimal in-test device plugin (not the project's).

It proves the harness drives Kubernetes' real device manager end to end (registration,
ListAndWatch health, GetPreferredAllocation, Allocate, PreStartContainer) so the device-plugin
tests can trust what it reports.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from hostdev.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as pb
from hostdev.deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc
from tests.fixtures.kubelet import HarnessError, KubeletHarness

pytestmark = pytest.mark.kubelet

RESOURCE = "hostdev.io/test-nic"
IDS = ["0000:3b:00.0", "0000:3b:00.1", "0000:3b:00.2"]


class _Plugin(pb_grpc.DevicePluginServicer):
    """Three devices on NUMA 0; prefers the highest IDs; marks one unhealthy on demand."""

    def __init__(self) -> None:
        self.health = dict.fromkeys(IDS, "Healthy")
        self.changed = threading.Condition()
        self.calls: list[str] = []
        self.stopped = False

    def devices(self) -> list[pb.Device]:
        numa = pb.TopologyInfo(nodes=[pb.NUMANode(ID=0)])
        return [pb.Device(ID=i, health=h, topology=numa) for i, h in self.health.items()]

    def set_health(self, dev: str, health: str) -> None:
        with self.changed:
            self.health[dev] = health
            self.changed.notify_all()

    def GetDevicePluginOptions(self, request: pb.Empty, context: Any) -> pb.DevicePluginOptions:
        return pb.DevicePluginOptions(
            pre_start_required=True, get_preferred_allocation_available=True
        )

    def ListAndWatch(self, request: pb.Empty, context: Any) -> Iterator[pb.ListAndWatchResponse]:
        with self.changed:
            while context.is_active() and not self.stopped:
                yield pb.ListAndWatchResponse(devices=self.devices())
                self.changed.wait(0.5)

    def GetPreferredAllocation(
        self, request: pb.PreferredAllocationRequest, context: Any
    ) -> pb.PreferredAllocationResponse:
        self.calls.append("GetPreferredAllocation")
        return pb.PreferredAllocationResponse(
            container_responses=[
                pb.ContainerPreferredAllocationResponse(
                    deviceIDs=sorted(r.available_deviceIDs)[-r.allocation_size :]
                )
                for r in request.container_requests
            ]
        )

    def Allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        self.calls.append("Allocate")
        return pb.AllocateResponse(
            container_responses=[
                pb.ContainerAllocateResponse(
                    envs={"PCI_RESOURCE_HOSTDEV_IO_TEST-NIC": ",".join(sorted(r.devices_ids))},
                    devices=[
                        pb.DeviceSpec(
                            container_path="/dev/vfio/vfio",
                            host_path="/dev/vfio/vfio",
                            permissions="mrw",
                        )
                    ],
                )
                for r in request.container_requests
            ]
        )

    def PreStartContainer(
        self, request: pb.PreStartContainerRequest, context: Any
    ) -> pb.PreStartContainerResponse:
        self.calls.append("PreStartContainer")
        return pb.PreStartContainerResponse()


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[_Plugin]:
    """The servicer; the test serves it once the manager is up (which deletes old sockets)."""
    servicer = _Plugin()
    yield servicer
    with servicer.changed:  # end ListAndWatch streams so the server stops promptly
        servicer.stopped = True
        servicer.changed.notify_all()


def _register(plugin_dir: Path) -> None:
    with grpc.insecure_channel(f"unix://{plugin_dir}/kubelet.sock") as channel:
        pb_grpc.RegistrationStub(channel).Register(
            pb.RegisterRequest(
                version="v1beta1",
                endpoint="test-nic.sock",
                resource_name=RESOURCE,
                options=pb.DevicePluginOptions(
                    pre_start_required=True, get_preferred_allocation_available=True
                ),
            ),
            timeout=10,
        )


def test_allocation_through_the_real_device_manager(
    kubelet_harness: KubeletHarness, tmp_path: Path, plugin: _Plugin
) -> None:
    # A watch window far longer than the test: it ends when the awaited line is seen.
    run = kubelet_harness.start(tmp_path, RESOURCE, expect=3, allocate=2, watch_seconds=300)
    run.wait_for_socket()
    # Serve only now: the manager deletes every socket in the directory when it starts.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_DevicePluginServicer_to_server(plugin, server)
    server.add_insecure_port(f"unix://{tmp_path}/test-nic.sock")
    server.start()
    try:
        _register(tmp_path)
        result = run.result()
        plugin.set_health(IDS[0], "Unhealthy")  # during the watch window
        watch = run.wait_line("2 allocatable", lambda w: w["allocatable"] == {RESOURCE: 2})
        run.stop()
    finally:
        with plugin.changed:
            plugin.stopped = True
            plugin.changed.notify_all()
        server.stop(grace=None).wait()

    assert result["capacity"] == {RESOURCE: 3}
    assert result["allocatable"] == {RESOURCE: 3}
    assert [d["id"] for d in result["devices"][RESOURCE]] == IDS
    assert result["devices"][RESOURCE][0] == {"id": IDS[0], "health": "Healthy", "numa_nodes": [0]}
    alloc = result["allocate"]
    # The manager honoured the plugin's preference (highest IDs) and passed the response on.
    assert alloc["device_ids"] == IDS[1:]
    assert alloc["envs"] == {"PCI_RESOURCE_HOSTDEV_IO_TEST-NIC": ",".join(IDS[1:])}
    assert alloc["devices"] == [
        {"host_path": "/dev/vfio/vfio", "container_path": "/dev/vfio/vfio", "permissions": "mrw"}
    ]
    assert result["preferred_called"] is True
    assert result["prestart_called"] is True
    assert plugin.calls == ["GetPreferredAllocation", "Allocate", "PreStartContainer"]
    # Watch lines: healthy 3/3, then one device unhealthy: capacity stays, allocatable drops.
    assert watch[0]["capacity"] == {RESOURCE: 3}
    assert watch[-1]["capacity"] == {RESOURCE: 3}
    assert watch[-1]["allocatable"] == {RESOURCE: 2}


def test_times_out_without_plugin(kubelet_harness: KubeletHarness, tmp_path: Path) -> None:
    run = kubelet_harness.start(tmp_path, RESOURCE, expect=1, timeout=1)
    with pytest.raises(HarnessError) as err:
        run.result()
    assert (
        f'timeout after 1s: capacity of "{RESOURCE}" is 0, expected >= 1 '
        f"(did a plugin register at {tmp_path}/kubelet.sock?)"
    ) in str(err.value)
