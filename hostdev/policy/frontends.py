"""How the kubelet gets a resource's units: a device-plugin server, or DRA (ResourceSlices and a
kubelet DRA plugin). One resource is served one way on a node, never both. (Apart from
:mod:`hostdev.policy.nodeconfig` so the agent's start path does not load the spec parser.)"""

from __future__ import annotations

from typing import Literal

Allocation = Literal["DevicePlugin", "DRA"]
DEVICE_PLUGIN: Allocation = "DevicePlugin"
DRA: Allocation = "DRA"
ALLOCATIONS: tuple[Allocation, ...] = (DEVICE_PLUGIN, DRA)
