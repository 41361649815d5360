"""Builders for operator unit tests: policy objects and agent reports as the API returns them."""

from __future__ import annotations

from typing import Any


def policy(
    name: str,
    resource: str = "vendor.example/nic",
    selector: dict[str, Any] | None = None,
    *,
    priority: int = 0,
    created: str = "2026-01-01T00:00:00Z",
    node_selector: dict[str, Any] | None = None,
    num_vfs: int | None = None,
    driver: str | None = None,
    allocation: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "resourceName": resource,
        "selector": selector or {"vendors": ["8086"], "devices": ["154c"]},
        "priority": priority,
    }
    if node_selector is not None:
        spec["nodeSelector"] = node_selector
    if num_vfs is not None:
        spec["sriov"] = {"numVfs": num_vfs}
    if driver is not None:
        spec["driver"] = driver
    if allocation is not None:
        spec["allocation"] = allocation
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": created,
            "generation": 1,
            "uid": f"uid-{name}",
        },
        "spec": spec,
    }


def device(
    address: str,
    vendor: str = "8086",
    dev: str = "154c",
    *,
    resource: str | None = None,
    physfn: str | None = None,
    vf_index: int | None = None,
    netdevs: list[str] | None = None,
    cls: str = "020000",
) -> dict[str, Any]:
    out: dict[str, Any] = {"pciAddress": address, "vendor": vendor, "device": dev, "class": cls}
    if resource:
        out["resourceName"] = resource
    if physfn:
        out["physfn"] = physfn
        out["vfIndex"] = vf_index
    if netdevs:
        out["netdevs"] = netdevs
    return out


def report(*devices: dict[str, Any], allocations: list[dict[str, Any]] | None = None) -> dict:
    return {
        "syncStatus": "Succeeded",
        "devices": list(devices),
        "allocations": allocations or [],
    }
