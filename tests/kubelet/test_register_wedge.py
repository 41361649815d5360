"""The node agent when the REAL kubelet device manager (v1.37) refuses its socket path for good.

The device manager keeps one endpoint per resource and socket path. A Register for a path it
still holds fails with "device plugin already connected: <path>", and the failure path drops
*every* client with that path, the live one too; when that client's ListAndWatch then ends,
nothing calls PluginDisconnected, so the endpoint stays and every later Register of the path
fails the same way until the kubelet restarts (plugin/v1beta1/handler.go connectClient,
deregisterClient, runClient; manager.go PluginConnected). The agent must then serve and
register on a fresh socket path.

The test wedges the path itself: a Register naming the agent's endpoint while the agent is
registered (as a second agent on the same directory, or the agent's own Register racing the
kubelet's handling of the old stream's end, would), then deletes the agent's socket so that
the agent serves again and registers the same path.

That Register must come after the kubelet has seen the old stream end: if it comes first, the
old client's clean-up finds the new client under the same path and removes the endpoint, so
the path registers fine (the kubelet recovers by luck; seen on a loaded machine). So the test
moves kubelet.sock aside (the agent waits for it, as after a kubelet restart) until the
kubelet has logged the end of the old stream, then moves it back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from hostdev.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as pb
from hostdev.deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc
from hostdev.policy.naming import resource_env_var, socket_name
from hostdev.testing.scenarios import sriov_nic_dual_socket
from tests.fixtures.kubelet import KubeletHarness
from tests.fixtures.nodeagent import AgentStarter, agent_log

pytestmark = pytest.mark.kubelet

VF_RES = "example.com/e810_vf"
E810_VF = {"vendors": ["8086"], "devices": ["1889"]}
PF = "0000:3b:00.0"


def _wait_text(
    what: str, read: Callable[[], str], ok: Callable[[str], bool], timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while not ok(text := read()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{text}"
        time.sleep(0.05)


def _wait_log(node: Path, what: str, ok: Callable[[str], bool], timeout: float = 30) -> None:
    _wait_text(what, lambda: agent_log(node), ok, timeout)


def _register_agents_endpoint(plugin_dir: Path) -> grpc.RpcError:
    """Register the agent's own endpoint once more; the kubelet's error."""
    request = pb.RegisterRequest(
        version="v1beta1",
        endpoint=socket_name(VF_RES),
        resource_name=VF_RES,
        options=pb.DevicePluginOptions(get_preferred_allocation_available=True),
    )
    with (
        grpc.insecure_channel(f"unix://{plugin_dir}/kubelet.sock") as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        pb_grpc.RegistrationStub(channel).Register(request, timeout=10)
    return err.value


def test_agent_registers_a_fresh_socket_when_the_kubelet_wedged_its_path(
    node: Path, kubelet_harness: KubeletHarness, start_agent: AgentStarter
) -> None:
    h = sriov_nic_dual_socket(node / "host", numvfs=2)  # 6 VFs
    vfs = {str(h.vf_address(pf, i)) for pf in (PF, "0000:3b:00.1", "0000:86:00.0") for i in (0, 1)}
    late = str(h.vf_address(PF, 0))
    h.bind(late, "iavf")  # Unhealthy until it is back on vfio-pci, after the wedge
    dp = node / "dp"
    first, fresh = dp / socket_name(VF_RES), dp / socket_name(VF_RES, 2)
    # The harness allocates once the kubelet counts all 6 VFs healthy: only a ListAndWatch
    # opened after the wedge can tell it. Its watch window outlasts the test.
    run = kubelet_harness.start(
        dp, VF_RES, expect=6, allocatable=True, allocate=2, timeout=60, watch_seconds=300
    )
    run.wait_for_socket()
    start_agent([{"resourceName": VF_RES, "selector": E810_VF}])
    _wait_log(
        node,
        "the kubelet's ListAndWatch and the agent's directory watch",
        lambda log: "kubelet watching" in log and f"watching {dp} and" in log,
    )

    err = _register_agents_endpoint(dp)
    assert err.code() == grpc.StatusCode.UNKNOWN
    assert err.details() == f"device plugin already connected: {first}"
    # The kubelet dropped its client of the agent's stream: once that stream ends, the endpoint
    # is never removed. The agent serves again (ending the stream), then registers, once the
    # kubelet has seen that end.
    kubelet_sock, aside = dp / "kubelet.sock", dp / "kubelet.sock.aside"
    kubelet_sock.rename(aside)
    first.unlink()
    _wait_log(
        node,
        "the agent to serve again and wait for kubelet.sock",
        lambda log: log.count(": serving on ") >= 2 and f"waiting for {kubelet_sock}" in log,
    )
    _wait_text(
        "the kubelet to see the old stream end (its log)",
        lambda: run.stderr,
        lambda err: "ListAndWatch ended unexpectedly" in err,
    )
    aside.rename(kubelet_sock)
    h.bind(late, "vfio-pci")
    try:
        res = run.result(timeout=90)
    except Exception:
        print(agent_log(node))
        raise

    assert res["capacity"] == {VF_RES: 6}
    assert res["allocatable"] == {VF_RES: 6}
    assert {d["id"] for d in res["devices"][VF_RES]} == vfs
    # Allocate went to the agent's new endpoint: the kubelet holds it as the resource's own.
    ids = res["allocate"]["device_ids"]
    assert len(ids) == 2 and set(ids) <= vfs
    env = res["allocate"]["envs"][resource_env_var(VF_RES)]
    assert sorted(env.split(",")) == sorted(ids)
    assert fresh.is_socket() and not first.exists(), agent_log(node)
    log = agent_log(node)
    assert log.count("refuses to register") == 1, log
    assert f"refuses to register {first} again" in log
    assert f"serving on {fresh} instead" in log

    # Later changes reach the kubelet too: a VF no pod holds leaves vfio-pci.
    gone = sorted(vfs - set(ids))[0]
    h.bind(gone, "iavf")
    final = run.wait_line("5 allocatable", lambda w: w["allocatable"].get(VF_RES) == 5)[-1]
    run.stop()
    assert final["capacity"] == {VF_RES: 6}, agent_log(node)
