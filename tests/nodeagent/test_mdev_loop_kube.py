"""The NodeState loop with mediated devices against a real kube-apiserver: spec.mdevs reaches
the agent's mdev owner (instances made on a fake mdev kernel), and status.mdev (parents, types,
instances with their resource, refusals) is written and kept by the CRD schema."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.deviceplugin.mdev import MdevOwner
from hostdev.deviceplugin.nodestate.kube import GROUP, PLURAL, VERSION, NodeStateClient
from hostdev.deviceplugin.nodestate.loop import LoopSettings, NodeStateLoop
from hostdev.deviceplugin.nodestate.sync import Syncer
from hostdev.host import PciAddress, Sysfs
from hostdev.policy.mdev import MdevSpec
from hostdev.testing.fakemdev import FakeMdev, FakeType
from hostdev.testing.fakesysfs import FakeHost
from tests.fixtures.kube import Cluster, light_client

pytestmark = pytest.mark.kube

RES = "example.com/mtty"


class MdevSink:
    """Applies spec.mdevs the way the agent's manager does (one reconcile pass)."""

    def __init__(self, owner: MdevOwner) -> None:
        self.owner = owner

    def apply(
        self,
        resources: Mapping[str, tuple[PciAddress, ...]],
        dra: frozenset[str] = frozenset(),
        mdevs: tuple[tuple[str, MdevSpec], ...] = (),
    ) -> None:
        self.owner.reconcile(dict(mdevs))


def wait(crd: k8s.CustomObjectsApi, name: str, ok: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        obj: dict[str, Any] = crd.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)  # type: ignore[assignment]
        if ok(obj.get("status") or {}):
            return obj
        if time.monotonic() > deadline:
            pytest.fail(f"timed out; status now: {obj.get('status')}")
        time.sleep(0.1)


def test_spec_mdevs_make_instances_and_status_reports_them(
    kube_apiserver: Cluster, tmp_path: Path
) -> None:
    host = FakeHost(tmp_path / "host")
    m = FakeMdev(host)
    m.add_parent("mtty", [FakeType("mtty-1"), FakeType("mtty-2", cost=2)], 8)
    sysfs = Sysfs(str(host.root))
    owner = MdevOwner(sysfs, str(tmp_path / "state"), m.write)
    api = kube_apiserver.api_client()
    light = light_client(api)  # the agent's own API client, with the same identity
    crd = k8s.CustomObjectsApi(api)
    name = f"node-{uuid.uuid4().hex[:8]}"
    spec = {"mdevs": [{"resourceName": RES, "type": "mtty-2", "count": 2}]}
    crd.create_cluster_custom_object(
        GROUP, VERSION, PLURAL,
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PassthroughNodeState",
         "metadata": {"name": name}, "spec": spec},
    )  # fmt: skip
    loop = NodeStateLoop(
        NodeStateClient(light, name),
        Syncer(sysfs, DriverMemory(str(tmp_path / "state"))),
        MdevSink(owner),
        settings=LoopSettings(coalesce=0.3, resync=3600, watch_timeout=2),
        mdev_status=owner.status,
    )
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    try:
        obj = wait(crd, name, lambda st: len((st.get("mdev") or {}).get("instances", [])) == 2)
        st = obj["status"]["mdev"]
        assert st["parents"] == [
            {
                "name": "mtty",
                "types": [
                    {"id": "mtty-1", "deviceApi": "vfio-pci", "availableInstances": 4},
                    {"id": "mtty-2", "deviceApi": "vfio-pci", "availableInstances": 2},
                ],
            }
        ]
        assert sorted(i["uuid"] for i in st["instances"]) == sorted(owner.owned)
        assert {(i["resourceName"], i["type"], i["health"]) for i in st["instances"]} == {
            (RES, "mtty-2", "Healthy")
        }
        assert st["refusals"] == []
        # more than the parent has: refused, nothing changes, the status says why
        crd.patch_cluster_custom_object(
            GROUP, VERSION, PLURAL, name, {"spec": {"mdevs": [{**spec["mdevs"][0], "count": 9}]}}
        )
        obj = wait(crd, name, lambda st: (st.get("mdev") or {}).get("refusals"))
        assert obj["status"]["mdev"]["refusals"] == [
            {
                "resourceName": RES,
                "message": "mdev type mtty-2 exhausted: 7 more instances wanted, the parents "
                "have 2 left (mtty: 2)",
            }
        ]
        assert len(obj["status"]["mdev"]["instances"]) == 2
    finally:
        stop.set()
        thread.join(15)
        light.close()  # after the loop's last write; ends the blocked watch too
        crd.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        api.close()
    assert not thread.is_alive()
