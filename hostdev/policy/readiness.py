"""Verdicts: is this node ready for passthrough, and can this device be assigned? Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hostdev.host.model import Inventory, NodeIommu, PciDevice

State = Literal["ready", "needs-binding", "no"]


@dataclass(frozen=True, slots=True)
class Verdict:
    state: State
    reason: str

    def __str__(self) -> str:
        return "yes" if self.state == "ready" else f"{self.state}: {self.reason}"


IOMMU_OFF = (
    "IOMMU is off: enable VT-d / AMD-Vi in the firmware and boot with intel_iommu=on "
    "(Intel) or amd_iommu=on (AMD)"
)


def node_problems(node: NodeIommu) -> list[str]:
    """What stops (or weakens) passthrough on this node, most important first."""
    out = []
    if not node.enabled:
        out.append(IOMMU_OFF)
        return out
    if node.interrupt_remapping is False:
        out.append(
            "interrupt remapping is off: devices can forge interrupts; VFIO refuses unless "
            "vfio_iommu_type1.allow_unsafe_interrupts=1"
        )
    missing = [m for m, loaded in node.vfio_modules.items() if not loaded]
    if missing:
        out.append(f"VFIO modules not loaded: {', '.join(missing)} (modprobe vfio-pci)")
    elif not node.vfio_container:
        out.append("/dev/vfio/vfio is missing")
    return out


def assignability(dev: PciDevice, inventory: Inventory) -> Verdict:
    """Whether ``dev`` can go to a VM now, after rebinding, or not at all (and why)."""
    if not inventory.node.enabled:
        return Verdict("no", "IOMMU is off")
    if dev.class_code is not None and dev.class_code.startswith("06"):
        return Verdict("no", "bridge")
    if dev.iommu_group is None:
        return Verdict("no", "in no IOMMU group")
    if dev.busy is not None:
        return Verdict("no", dev.busy)
    if dev.is_pf and dev.sriov_numvfs:
        return Verdict("no", f"SR-IOV PF with {dev.sriov_numvfs} VFs enabled: assign its VFs")
    group = inventory.group_of(dev)
    if group is None:
        return Verdict("no", f"IOMMU group {dev.iommu_group} has no listing")
    others = [
        inventory.devices[a]
        for a in group.members
        if a != dev.address and a in inventory.devices and not inventory.devices[a].is_bridge
    ]
    companions = f" with {', '.join(str(o.address) for o in others)}" if others else ""
    if not dev.on_vfio:
        now = f"on {dev.driver}" if dev.driver else "unbound"
        return Verdict("needs-binding", f"{now}; bind group {group.number}{companions} to vfio-pci")
    if not group.viable:
        return Verdict("needs-binding", f"group {group.number} not viable: {group.reason}")
    if not group.vfio_node:
        return Verdict("no", f"/dev/vfio/{group.number} missing")
    return Verdict("ready", f"group {group.number}{companions}")
