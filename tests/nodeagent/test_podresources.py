"""The PodResources v1 client against a fake kubelet: the generated servicer on a real unix
socket, real gRPC."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from hostdev.deviceplugin.api.podresources.v1 import api_pb2, api_pb2_grpc
from hostdev.deviceplugin.nodestate.allocations import KubeletAllocations
from hostdev.deviceplugin.podresources import PodResourcesClient, PodResourcesError
from hostdev.host import PciAddress, Sysfs
from hostdev.policy.nodestatus import AllocationRow, PodDevices
from hostdev.testing import scenarios

A = PciAddress.parse
GPU = "example.com/gpu"


class FakeKubelet(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self) -> None:
        self.pods: list[api_pb2.PodResources] = []
        self.fail: grpc.StatusCode | None = None
        self.calls = 0

    def List(
        self, request: api_pb2.ListPodResourcesRequest, context: grpc.ServicerContext
    ) -> api_pb2.ListPodResourcesResponse:
        self.calls += 1
        if self.fail is not None:
            context.abort(self.fail, "kubelet says no")
        return api_pb2.ListPodResourcesResponse(pod_resources=self.pods)


def pod(ns: str, name: str, *containers: tuple[str, str, list[str]]) -> api_pb2.PodResources:
    return api_pb2.PodResources(
        namespace=ns,
        name=name,
        containers=[
            api_pb2.ContainerResources(
                name=c,
                devices=[api_pb2.ContainerDevices(resource_name=r, device_ids=ids)],
            )
            for c, r, ids in containers
        ],
    )


@pytest.fixture
def kubelet() -> Iterator[tuple[FakeKubelet, str]]:
    # unix socket paths are limited to 107 bytes: keep it short, not under tmp_path.
    d = tempfile.mkdtemp(prefix="podres-", dir="/tmp")
    sock = f"{d}/kubelet.sock"
    fake = FakeKubelet()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(fake, server)
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    try:
        yield fake, sock
    finally:
        server.stop(None).wait()
        Path(sock).unlink(missing_ok=True)
        Path(d).rmdir()


def test_list_flattens_pods_containers_resources(kubelet: tuple[FakeKubelet, str]) -> None:
    fake, sock = kubelet
    fake.pods = [
        pod("vms", "virt-launcher-a-x", ("compute", GPU, ["0000:17:00.0"])),
        pod(
            "default",
            "two",
            ("c1", "example.com/nic", ["0000:3b:02.0", "0000:3b:02.1"]),
            ("c2", "example.com/nic", []),  # a container without devices is not listed
        ),
    ]
    got = PodResourcesClient(sock).list()
    assert got == (
        PodDevices("vms", "virt-launcher-a-x", "compute", GPU, ("0000:17:00.0",)),
        PodDevices("default", "two", "c1", "example.com/nic", ("0000:3b:02.0", "0000:3b:02.1")),
    )
    assert fake.calls == 1


def test_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PodResourcesError, match="does not exist"):
        PodResourcesClient(str(tmp_path / "nope.sock")).list()


def test_rpc_error_names_the_status(kubelet: tuple[FakeKubelet, str]) -> None:
    fake, sock = kubelet
    fake.fail = grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(PodResourcesError, match="PERMISSION_DENIED: kubelet says no"):
        PodResourcesClient(sock).list()


class FakePods:
    def __init__(self) -> None:
        self.calls = 0

    def vmis(self) -> dict[tuple[str, str], str]:
        self.calls += 1
        return {("vms", "virt-launcher-a-x"): "a"}


def test_allocation_report(kubelet: tuple[FakeKubelet, str], tmp_path: Path) -> None:
    fake, sock = kubelet
    scenarios.gpu_with_audio(tmp_path)
    inv = Sysfs(str(tmp_path)).discover()
    served = {GPU: (A("0000:17:00.0"), A("0000:17:00.1"))}
    pods = FakePods()
    reader = KubeletAllocations(PodResourcesClient(sock), pods)  # type: ignore[arg-type]

    # Nobody holds our devices: no pods read from the API server.
    fake.pods = [pod("x", "y", ("c", "other.io/thing", ["t1"]))]
    assert reader.read(served, inv) == ()
    assert pods.calls == 0

    fake.pods.append(pod("vms", "virt-launcher-a-x", ("compute", GPU, ["0000:17:00.0"])))
    assert reader.read(served, inv) == (
        AllocationRow(A("0000:17:00.0"), GPU, "vms", "virt-launcher-a-x", "compute", "a"),
        AllocationRow(A("0000:17:00.1"), GPU, "vms", "virt-launcher-a-x", "compute", "a"),
    )
    assert pods.calls == 1

    # The kubelet going away makes allocations unknown (None), not empty.
    fake.fail = grpc.StatusCode.UNAVAILABLE
    assert reader.read(served, inv) is None


def test_dra_claims_of_this_driver_are_reported_under_their_resource(
    kubelet: tuple[FakeKubelet, str], tmp_path: Path
) -> None:
    """A pod holding a unit through a DRA claim: PodResources lists it among the container's
    dynamic resources (driver, pool, device); it counts as held under the unit's resource."""
    fake, sock = kubelet
    scenarios.gpu_with_audio(tmp_path)
    inv = Sysfs(str(tmp_path)).discover()
    served = {GPU: (A("0000:17:00.0"), A("0000:17:00.1"))}
    container = api_pb2.ContainerResources(
        name="compute",
        dynamic_resources=[
            api_pb2.DynamicResource(
                claim_name="vm-a-gpus-x7k2",
                claim_namespace="vms",
                claim_resources=[
                    api_pb2.ClaimResource(
                        driver_name="pci.hostdev.io", pool_name="node-1", device_name=name
                    )
                    for name in ("pci-0000-17-00-0", "pci-0000-99-00-0")
                ]
                + [
                    api_pb2.ClaimResource(
                        driver_name="gpu.example.com", pool_name="p", device_name="pci-0000-17-00-0"
                    )
                ],
            )
        ],
    )
    fake.pods = [
        api_pb2.PodResources(namespace="vms", name="virt-launcher-a-x", containers=[container])
    ]
    listed = PodResourcesClient(sock).list()
    assert listed == (
        PodDevices(
            "vms",
            "virt-launcher-a-x",
            "compute",
            "pci.hostdev.io",
            ("0000:17:00.0", "0000:99:00.0"),
        ),
    )
    reader = KubeletAllocations(PodResourcesClient(sock), FakePods())  # type: ignore[arg-type]
    # The unknown unit (not served here) is skipped; the served one expands to its functions.
    assert reader.read(served, inv) == (
        AllocationRow(A("0000:17:00.0"), GPU, "vms", "virt-launcher-a-x", "compute", "a"),
        AllocationRow(A("0000:17:00.1"), GPU, "vms", "virt-launcher-a-x", "compute", "a"),
    )
