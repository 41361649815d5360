"""The node agent (``hostdev-node`` as a real process) against the REAL kubelet device manager
(``k8s.io/kubernetes/pkg/kubelet/cm/devicemanager`` run by tests/tools/kubelet-harness)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hostdev.testing.fakesysfs import FakeHost
from hostdev.testing.scenarios import gpu_with_audio, sriov_nic_dual_socket
from tests.fixtures.kubelet import KubeletHarness
from tests.fixtures.nodeagent import AgentStarter, agent_log

pytestmark = pytest.mark.kubelet

VF_RES = "example.com/e810_vf"
VF_ENV = "PCI_RESOURCE_EXAMPLE_COM_E810_VF"


def _wait_log(node: Path, text: str, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in agent_log(node):
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{agent_log(node)}"
        time.sleep(0.05)


def _group(h: FakeHost, addr: str) -> str:
    return os.path.basename(os.readlink(h.device_dir(addr) / "iommu_group"))


def test_real_device_manager_capacity_and_allocate(
    node: Path, kubelet_harness: KubeletHarness, start_agent: AgentStarter
) -> None:
    h = sriov_nic_dual_socket(node / "host", numvfs=4)
    vfs = {
        str(h.vf_address(pf, i))
        for pf in ("0000:3b:00.0", "0000:3b:00.1", "0000:86:00.0")
        for i in range(4)
    }
    # The agent first: it must register again when the (re)starting kubelet creates kubelet.sock.
    start_agent([{"resourceName": VF_RES, "selector": {"vendors": ["8086"], "devices": ["1889"]}}])
    _wait_log(node, "waiting for", "the agent to look for kubelet.sock")
    run = kubelet_harness.start(node / "dp", VF_RES, expect=12, allocate=2, numa_nodes=2)
    try:
        res = run.result(timeout=60)
    except Exception:
        print(agent_log(node))
        raise
    assert res["capacity"][VF_RES] == 12
    assert res["allocatable"][VF_RES] == 12
    devices = {d["id"]: d for d in res["devices"][VF_RES]}
    assert set(devices) == vfs
    assert {d["health"] for d in devices.values()} == {"Healthy"}
    assert devices[str(h.vf_address("0000:86:00.0", 0))]["numa_nodes"] == [1]
    alloc = res["allocate"]
    assert res["preferred_called"] is True and res["prestart_called"] is False
    ids = alloc["device_ids"]
    assert len(ids) == 2 and set(ids) <= vfs
    assert list(alloc["envs"]) == [VF_ENV]
    assert sorted(alloc["envs"][VF_ENV].split(",")) == sorted(ids)  # full addresses, no spaces
    want = {"/dev/vfio/vfio", *(f"/dev/vfio/{_group(h, i)}" for i in ids)}
    assert {d["host_path"] for d in alloc["devices"]} == want
    assert all(
        d["container_path"] == d["host_path"] and d["permissions"] == "mrw"
        for d in alloc["devices"]
    )
    assert len(alloc["devices"]) == 3


def test_real_device_manager_group_unit_and_health_change(
    node: Path, kubelet_harness: KubeletHarness, start_agent: AgentStarter
) -> None:
    h = gpu_with_audio(node / "host")
    res_name = "nvidia.com/a10"
    # The watch window outlasts the test: it ends as soon as the awaited change is seen.
    run = kubelet_harness.start(node / "dp", res_name, expect=1, allocate=1, watch_seconds=300)
    run.wait_for_socket()
    start_agent([{"resourceName": res_name, "selector": {"vendors": ["10de"]}}])
    try:
        res = run.result(timeout=60)
    except Exception:
        print(agent_log(node))
        raise
    assert res["capacity"][res_name] == 1
    alloc = res["allocate"]
    assert alloc["device_ids"] == ["0000:17:00.0"]
    # One unit (GPU + audio, one group): its primary function first, then the companion.
    assert alloc["envs"] == {"PCI_RESOURCE_NVIDIA_COM_A10": "0000:17:00.0,0000:17:00.1"}
    assert [d["host_path"] for d in alloc["devices"]] == [
        "/dev/vfio/vfio",
        f"/dev/vfio/{_group(h, '0000:17:00.0')}",
    ]
    # Now hand both functions back to host drivers (/dev/vfio/<g> goes away): allocatable
    # must drop to 0 while capacity stays 1.
    h.bind("0000:17:00.1", "snd_hda_intel")
    h.bind("0000:17:00.0", "nvidia")
    final = run.wait_line("0 allocatable", lambda w: w["allocatable"].get(res_name) == 0)[-1]
    run.stop()
    assert final["capacity"][res_name] == 1
    assert final["allocatable"][res_name] == 0, agent_log(node)
