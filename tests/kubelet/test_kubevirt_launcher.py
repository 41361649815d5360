"""The node agent's Allocate answers, fed to KubeVirt's OWN virt-launcher code.

Each case runs the real ``hostdev-node`` process on a fake host tree, allocates through the real
kubelet device manager (tests/tools/kubelet-harness) and hands the container env it produced,
with a VMI asking for that many ``gpus``/``hostDevices`` entries, to virt-launcher's host-device
code from kubevirt.io/kubevirt v1.9.0 (tests/tools/kubevirt-harness).

The contract (docs/DESIGN.md, node agent item 4): each entry gets exactly one unit, and that
unit's primary function (the kubelet device ID, the lowest address of the unit). A companion
(GPU audio, the second GPU of a group) must never take another entry's slot: KubeVirt attaches
one address per entry, in env order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from hostdev.policy.naming import resource_env_var
from hostdev.testing.fakesysfs import FakeHost
from hostdev.testing.scenarios import (
    gpus_behind_switch_without_acs,
    single_function_gpus,
    sriov_nic_dual_socket,
    two_gpus_with_audio,
)
from tests.fixtures.kubelet import KubeletHarness
from tests.fixtures.kubevirt import KubeVirtLauncher, vmi
from tests.fixtures.nodeagent import AgentStarter, agent_log

pytestmark = [pytest.mark.kubelet, pytest.mark.kubevirt]

NVIDIA = {"vendors": ["10de"]}  # every function of the card: GPU + audio in one resource
E810_VF = {"vendors": ["8086"], "devices": ["1889"]}
_ARG = {"gpus": "gpus", "hostDevices": "host_devices"}  # VMI entry list -> vmi() keyword


def _iommufd_vfs(root: Path) -> FakeHost:
    """VFs on an iommufd host: /dev/iommu and a /dev/vfio/devices/vfioN per VF."""
    h = sriov_nic_dual_socket(root, numvfs=2, iommufd=True)
    h.make_cdev_nodes()
    return h


@dataclass(frozen=True)
class Case:
    host: Callable[[Path], FakeHost]
    resource: str
    selector: dict[str, list[str]]
    units: int  # allocatable units the tree yields for the resource
    allocate: int  # VM entries = devices the kubelet allocates
    entry: str = "gpus"  # or "hostDevices"
    functions_per_unit: int = 1


CASES = {
    "single-function-x1": Case(
        partial(single_function_gpus, count=2), "example.com/a100", NVIDIA, 2, 1
    ),
    "single-function-x2": Case(
        partial(single_function_gpus, count=2), "example.com/a100", NVIDIA, 2, 2
    ),
    "gpu-audio-x1": Case(two_gpus_with_audio, "nvidia.com/a10", NVIDIA, 2, 1, functions_per_unit=2),
    "gpu-audio-x2": Case(two_gpus_with_audio, "nvidia.com/a10", NVIDIA, 2, 2, functions_per_unit=2),
    "two-gpu-group-x1": Case(
        partial(gpus_behind_switch_without_acs, switches=2),
        "nvidia.com/a100",
        NVIDIA,
        2,
        1,
        functions_per_unit=2,
    ),
    "two-gpu-group-x2": Case(
        partial(gpus_behind_switch_without_acs, switches=2),
        "nvidia.com/a100",
        NVIDIA,
        2,
        2,
        functions_per_unit=2,
    ),
    "vf-x1": Case(
        partial(sriov_nic_dual_socket, numvfs=2),
        "example.com/e810_vf",
        E810_VF,
        6,
        1,
        entry="hostDevices",
    ),
    "vf-x2": Case(
        partial(sriov_nic_dual_socket, numvfs=2),
        "example.com/e810_vf",
        E810_VF,
        6,
        2,
        entry="hostDevices",
    ),
    # Upper case is allowed in the name part, '-' stays '-' in the env name (KubeVirt's rule).
    "mixed-case-dashed-name": Case(
        partial(sriov_nic_dual_socket, numvfs=2),
        "intel.com/E810-VF_Fast",
        E810_VF,
        6,
        2,
        entry="hostDevices",
    ),
    "iommufd-vf-x2": Case(
        _iommufd_vfs,
        "example.com/e810_vf",
        E810_VF,
        6,
        2,
        entry="hostDevices",
    ),
}


def _allocate(
    node: Path,
    kubelet_harness: KubeletHarness,
    start_agent: AgentStarter,
    case: Case,
) -> dict[str, Any]:
    """The kubelet's Allocate result for ``case.allocate`` devices of the agent's resource."""
    run = kubelet_harness.start(
        node / "dp", case.resource, expect=case.units, allocate=case.allocate, numa_nodes=2
    )
    run.wait_for_socket()  # the manager deletes old sockets on start: the agent comes second
    start_agent([{"resourceName": case.resource, "selector": case.selector}])
    try:
        result: dict[str, Any] = run.result(timeout=90)
    except Exception:
        print(agent_log(node))
        raise
    return result


@pytest.mark.parametrize("name", list(CASES))
def test_kubevirt_attaches_one_primary_function_per_unit(
    name: str,
    node: Path,
    kubelet_harness: KubeletHarness,
    start_agent: AgentStarter,
    kubevirt_launcher: KubeVirtLauncher,
) -> None:
    case = CASES[name]
    host = case.host(node / "host")
    result = _allocate(node, kubelet_harness, start_agent, case)
    assert result["capacity"][case.resource] == case.units
    alloc = result["allocate"]
    units = alloc["device_ids"]  # each unit's ID is its primary (lowest) address
    assert len(units) == case.allocate
    env_name = resource_env_var(case.resource)
    assert list(alloc["envs"]) == [env_name]
    assert len(alloc["envs"][env_name].split(",")) == case.allocate * case.functions_per_unit

    entries = [{"name": f"dev{i}", "deviceName": case.resource} for i in range(case.allocate)]
    kv = kubevirt_launcher.run(vmi(**{_ARG[case.entry]: entries}), env=alloc["envs"])

    assert kv["error"] is None, kv["error"]
    attached = kv[case.entry]
    assert kv["hostDevices" if case.entry == "gpus" else "gpus"] == []
    prefix = "ua-gpu-" if case.entry == "gpus" else "ua-hostdevice-"
    assert [d["alias"] for d in attached] == [prefix + e["name"] for e in entries]
    assert all(d["type"] == "pci" and d["managed"] == "no" for d in attached)
    # One unit per entry, and the unit's primary function: a companion never takes a slot.
    assert sorted(d["pciAddress"] for d in attached) == sorted(units), (
        f"KubeVirt attached {[d['pciAddress'] for d in attached]} for units {units} "
        f"from {env_name}={alloc['envs'][env_name]}"
    )
    if host.iommufd:
        paths = {d["host_path"] for d in alloc["devices"]}
        assert "/dev/iommu" in paths
        assert sum(p.startswith("/dev/vfio/devices/vfio") for p in paths) == case.allocate


def test_kubevirt_refuses_a_vm_with_more_entries_than_allocated_addresses(
    node: Path,
    kubelet_harness: KubeletHarness,
    start_agent: AgentStarter,
    kubevirt_launcher: KubeVirtLauncher,
) -> None:
    """The harness reports KubeVirt's refusal verbatim (two entries, one single-function unit
    allocated), so the cases above can fail."""
    case = CASES["single-function-x1"]
    case.host(node / "host")
    alloc = _allocate(node, kubelet_harness, start_agent, case)["allocate"]
    entries = [{"name": f"dev{i}", "deviceName": case.resource} for i in range(2)]
    kv = kubevirt_launcher.run(vmi(gpus=entries), env=alloc["envs"])
    assert kv["error"] is not None
    assert kv["error"]["stage"] == "gpu.CreateHostDevices"
    assert kv["error"]["message"].startswith(
        "failed to create GPU host-devices: the number of device plugin GPU/s do not match"
    )
