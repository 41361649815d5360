"""The node agent's NodeState loop against a real kube-apiserver + etcd (the test tier's control
plane) and a fake host run by the simulated kernel. Prints figures only.

For N VFs on one PF: seconds from creating the NodeState until its status says Succeeded (VFs
created, bound to vfio-pci, resources handed over, status written), the same for a spec change
that halves N, status PATCHes for each, and PATCHes during a quiet period with health and
allocation refreshes every 0.2 s (should be 0: status is written only on change).

    .venv/bin/python bench/nodestate_loop.py [--vfs 8,64,256] [--quiet 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# tests/ holds the control-plane code; append, never prepend (operator/ would shadow stdlib).
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from kubernetes import client as k8s  # noqa: E402

from hostdev.deviceplugin.config.memory import DriverMemory  # noqa: E402
from hostdev.deviceplugin.nodestate.kube import GROUP, PLURAL, VERSION  # noqa: E402
from hostdev.deviceplugin.nodestate.kube import NodeStateClient as _Client  # noqa: E402
from hostdev.deviceplugin.nodestate.loop import LoopSettings, NodeStateLoop  # noqa: E402
from hostdev.deviceplugin.nodestate.sync import Syncer  # noqa: E402
from hostdev.host import PciAddress, Sysfs  # noqa: E402
from hostdev.testing.fakekernel import FakeKernel  # noqa: E402
from hostdev.testing.scenarios import sriov_scale  # noqa: E402
from tests.fixtures.kube import ControlPlane, find_tools, light_client  # noqa: E402

RES = "example.com/bench-vf"


class Counting(_Client):
    patches = 0

    def patch_status(self, status: Mapping[str, Any]) -> Mapping[str, Any]:
        self.patches += 1
        return super().patch_status(status)


class Sink:
    def __init__(self) -> None:
        self.applies = 0

    def apply(self, resources: Mapping[str, tuple[PciAddress, ...]]) -> None:
        self.applies += 1


def spec(n: int) -> dict[str, Any]:
    return {
        "pfs": [{"pciAddress": "0000:10:00.0", "numVfs": n}],
        "devices": [{"selector": {"pfNames": [f"ens1f0#0-{n - 1}"]}, "resourceName": RES}],
    }


def wait_status(crd: k8s.CustomObjectsApi, name: str, generation: int) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        obj: Any = crd.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        st = obj.get("status") or {}
        if st.get("observedGeneration") == generation and st.get("syncStatus") == "Succeeded":
            return
        if st.get("syncStatus") == "Failed":
            raise SystemExit(f"sync failed: {st.get('lastError')}")
        time.sleep(0.02)
    raise SystemExit("timed out")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vfs", default="8,64,256")
    p.add_argument("--quiet", type=float, default=5.0)
    args = p.parse_args()
    tools = find_tools()
    if tools is None:
        raise SystemExit("kube-apiserver or etcd missing: run scripts/setup-test-tools.sh")
    with tempfile.TemporaryDirectory() as work:
        plane = ControlPlane(Path(work) / "kube", tools)
        cluster = plane.start()
        try:
            api = cluster.api_client()
            crd = k8s.CustomObjectsApi(api)
            print(
                f"{'VFs':>5} {'create->Succeeded':>18} {'PATCHes':>8} "
                f"{'halve->Succeeded':>17} {'PATCHes':>8} {'quiet PATCHes':>14}"
            )
            for n in (int(x) for x in args.vfs.split(",")):
                root = Path(work) / f"host-{n}"
                host = sriov_scale(root, pfs=1, vfs=0)
                kernel = FakeKernel(host, vf_drivers={"0000:10:00.0": "iavf"})
                name = f"bench-{uuid.uuid4().hex[:6]}"
                client = Counting(light_client(api), name)
                loop = NodeStateLoop(
                    client,
                    Syncer(Sysfs(str(root)), DriverMemory(str(root / "state")), io=kernel),
                    Sink(),
                    settings=LoopSettings(allocations_every=0.2),
                )
                stop = threading.Event()
                thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
                thread.start()
                t = time.perf_counter()
                crd.create_cluster_custom_object(
                    GROUP,
                    VERSION,
                    PLURAL,
                    {
                        "apiVersion": f"{GROUP}/{VERSION}",
                        "kind": "PassthroughNodeState",
                        "metadata": {"name": name},
                        "spec": spec(n),
                    },
                )
                wait_status(crd, name, 1)
                create_s = time.perf_counter() - t
                time.sleep(1.5)  # the last batch
                create_p = client.patches
                t = time.perf_counter()
                crd.patch_cluster_custom_object(
                    GROUP, VERSION, PLURAL, name, {"spec": spec(max(1, n // 2))}
                )
                wait_status(crd, name, 2)
                halve_s = time.perf_counter() - t
                time.sleep(1.5)
                halve_p = client.patches - create_p
                before = client.patches
                time.sleep(args.quiet)
                quiet_p = client.patches - before
                stop.set()
                thread.join(30)
                crd.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
                print(
                    f"{n:>5} {create_s:>17.2f}s {create_p:>8} {halve_s:>16.2f}s "
                    f"{halve_p:>8} {quiet_p:>14}"
                )
            api.close()
        finally:
            cluster.close()
            plane.stop()


if __name__ == "__main__":
    main()
