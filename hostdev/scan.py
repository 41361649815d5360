"""The ``hostdev scan`` report: node readiness and a device table, as text or JSON."""

from __future__ import annotations

from typing import Any

from hostdev.host.model import Inventory
from hostdev.host.pciids import PciIds
from hostdev.policy.allocation import build_units
from hostdev.policy.dra import DRIVER, device_name, unit_attributes
from hostdev.policy.readiness import assignability, node_problems


def report(inv: Inventory, ids: PciIds) -> dict[str, Any]:
    """A JSON-ready report (stable keys, camelCase like the CRDs)."""
    problems = node_problems(inv.node)
    n = inv.node
    devices = []
    for dev in inv.devices.values():
        verdict = assignability(dev, inv)
        devices.append(
            {
                "address": str(dev.address),
                "vendor": dev.vendor,
                "device": dev.device,
                "subsystemVendor": dev.subsystem_vendor,
                "subsystemDevice": dev.subsystem_device,
                "class": dev.class_code,
                "className": ids.class_name(dev.class_code),
                "name": ids.device_name(dev.vendor, dev.device),
                "driver": dev.driver,
                "iommuGroup": dev.iommu_group,
                "numaNode": dev.numa_node,
                "physfn": str(dev.physfn) if dev.physfn else None,
                "vfIndex": dev.vf_index,
                "sriovTotalVfs": dev.sriov_totalvfs,
                "sriovNumVfs": dev.sriov_numvfs,
                "netdevs": list(dev.netdevs),
                "vfioCdev": dev.vfio_cdev,
                "assignable": verdict.state,
                "reason": verdict.reason,
                "problems": list(dev.problems),
                "busy": dev.busy,
            }
        )
    return {
        "node": {
            "iommu": n.enabled,
            "iommuVendor": n.vendor,
            "iommuUnits": list(n.units),
            "interruptRemapping": n.interrupt_remapping,
            "vfioModules": dict(n.vfio_modules),
            "vfioContainer": n.vfio_container,
            "iommufd": n.iommufd,
            "kernelParameters": list(n.cmdline),
            "iommuGroups": n.group_count,
        },
        "ready": not problems,
        "problems": problems,
        "pciIds": ids.source,
        "devices": devices,
        "groups": [
            {
                "number": g.number,
                "members": [str(a) for a in g.members],
                "viable": g.viable,
                "reason": g.reason,
                "vfioNode": g.vfio_node,
            }
            for g in inv.groups.values()
        ],
        "warnings": list(inv.warnings),
        "dra": dra_report(inv, ids),
    }


def dra_report(inv: Inventory, ids: PciIds) -> dict[str, Any]:
    """What each unit would publish as a DRA device: one per IOMMU group (functions without a
    group alone), bridges aside; the policy adds resourceName."""
    devices = [d for d in inv.devices.values() if not d.is_bridge]
    return {
        "driver": DRIVER,
        "devices": [
            {
                "name": device_name(u.addresses[0]),
                "addresses": [str(a) for a in u.addresses],
                "attributes": unit_attributes(u, None, inv, ids),
            }
            for u in build_units(devices)
        ],
    }


def _tri(value: bool | None, yes: str = "on", no: str = "off") -> str:
    return "unknown (the kernel does not say)" if value is None else (yes if value else no)


def render_text(rep: dict[str, Any]) -> str:
    n = rep["node"]
    mods = ", ".join(f"{m} {'loaded' if ok else 'missing'}" for m, ok in n["vfioModules"].items())
    iommu = f"on ({n['iommuVendor']}: {', '.join(n['iommuUnits'])})" if n["iommu"] else "off"
    lines = [
        "Passthrough readiness",
        f"  IOMMU                {iommu}; {n['iommuGroups']} IOMMU groups",
        f"  Interrupt remapping  {_tri(n['interruptRemapping'])}",
        f"  VFIO modules         {mods}",
        f"  /dev/vfio/vfio       {'present' if n['vfioContainer'] else 'missing'}",
        f"  iommufd /dev/iommu   {'present' if n['iommufd'] else 'absent'}",
        f"  Kernel parameters    {' '.join(n['kernelParameters']) or '(no IOMMU parameters)'}",
    ]
    if rep["ready"]:
        lines.append("  Verdict              READY for PCI passthrough")
    else:
        lines.append("  Verdict              NOT READY for PCI passthrough:")
        lines += [f"    - {p}" for p in rep["problems"]]
    lines.append("")
    header = ("ADDRESS", "CLASS", "IDS", "NAME", "DRIVER", "GROUP", "NUMA", "SR-IOV", "ASSIGNABLE")
    rows = [header]
    for d in rep["devices"]:
        verdict = "yes" if d["assignable"] == "ready" else f"{d['assignable']}: {d['reason']}"
        if d["assignable"] == "ready":
            verdict = f"yes ({d['reason']})"
        sriov = "-"
        if d["sriovTotalVfs"]:
            now = "busy" if d["busy"] else d["sriovNumVfs"] or 0
            sriov = f"PF {now}/{d['sriovTotalVfs']}"
        elif d["physfn"]:
            sriov = f"VF{d['vfIndex'] if d['vfIndex'] is not None else '?'} of {d['physfn']}"
        rows.append(
            (
                d["address"],
                d["className"][:24],
                f"{d['vendor'] or '????'}:{d['device'] or '????'}",
                d["name"][:40],
                d["driver"] or "-",
                "-" if d["iommuGroup"] is None else str(d["iommuGroup"]),
                "-" if d["numaNode"] is None else str(d["numaNode"]),
                sriov,
                verdict,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    if not rep["devices"]:
        lines.append("(no PCI devices found)")
    if rep["pciIds"] is None:
        lines.append("\nnote: no pci.ids found (install hwdata or pciutils); names are ids only")
    lines += [f"warning: {w}" for w in rep["warnings"]]
    return "\n".join(lines)
