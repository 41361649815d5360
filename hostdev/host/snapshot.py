"""Save the part of a host that discovery reads into a directory, as a portable host root.

``hostdev snapshot DIR`` on a node; ``hostdev scan --host-root DIR`` anywhere else gives the same
report. Attribute files are copied, links are recreated with the kernel's own relative targets,
device nodes become empty files. Nothing else of the host is copied.
"""

from __future__ import annotations

import os

from hostdev.host.sysfs import HostRootError

_ATTRS = (
    "vendor",
    "device",
    "subsystem_vendor",
    "subsystem_device",
    "class",
    "numa_node",
    "driver_override",
    "sriov_totalvfs",
    "sriov_numvfs",
    "sriov_offset",
    "sriov_stride",
    "sriov_vf_device",
    "sriov_drivers_autoprobe",
    "modalias",
    "uevent",
    "enable",
)
_LINKS = ("driver", "iommu_group", "physfn")
_FILES = ("proc/cmdline", "proc/interrupts")


def _copy_file(src: str, dst: str) -> None:
    try:
        with open(src, "rb") as f:
            data = f.read()
    except OSError:
        return  # unreadable attributes (e.g. write-only) are simply absent in the snapshot
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "wb") as f:
        f.write(data)


def _copy_link(src: str, dst: str) -> None:
    try:
        target = os.readlink(src)
    except OSError:
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.lexists(dst):
        os.unlink(dst)
    os.symlink(target, dst)


def _kobject_dir(src: str, dst: str) -> None:
    """A directory whose existence is the fact (an IOMMU unit, a driver, a netdev, a module).

    Its ``uevent`` comes along (every kernel object has one), which also keeps the directory
    in a git checkout of a saved tree: git drops empty directories."""
    os.makedirs(dst, exist_ok=True)
    _copy_file(os.path.join(src, "uevent"), os.path.join(dst, "uevent"))
    if not os.path.exists(os.path.join(dst, "uevent")):
        _touch(os.path.join(dst, "uevent"))


def _touch(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()


def snapshot(host_root: str, out: str) -> int:
    """Copy ``host_root``'s PCI/IOMMU/VFIO view into ``out``; returns the number of devices."""
    src = os.path.abspath(host_root)
    bus = os.path.join(src, "sys/bus/pci/devices")
    if not os.path.isdir(bus):
        raise HostRootError(2, f"no PCI bus at {bus}")
    if os.path.exists(out) and os.listdir(out):
        raise HostRootError(17, f"{out} exists and is not empty")

    def mirror(rel: str) -> tuple[str, str]:
        return os.path.join(src, rel), os.path.join(out, rel)

    count = 0
    for name in sorted(os.listdir(bus)):
        link_src, link_dst = mirror(os.path.join("sys/bus/pci/devices", name))
        _copy_link(link_src, link_dst)
        real = os.path.realpath(link_src)
        rel = os.path.relpath(real, src)
        dev_src, dev_dst = mirror(rel)
        os.makedirs(dev_dst, exist_ok=True)
        count += 1
        for entry in os.scandir(dev_src):
            n = entry.name
            if n in _ATTRS:
                _copy_file(entry.path, os.path.join(dev_dst, n))
            elif n in _LINKS or n.startswith("virtfn"):
                _copy_link(entry.path, os.path.join(dev_dst, n))
            elif n in ("net", "vfio-dev"):
                for sub in os.listdir(entry.path):
                    _kobject_dir(os.path.join(entry.path, sub), os.path.join(dev_dst, n, sub))
            elif n.startswith("virtio") and os.path.isdir(os.path.join(entry.path, "net")):
                for sub in os.listdir(os.path.join(entry.path, "net")):
                    _kobject_dir(
                        os.path.join(entry.path, "net", sub), os.path.join(dev_dst, n, "net", sub)
                    )
    groups = os.path.join(src, "sys/kernel/iommu_groups")
    for g in os.listdir(groups) if os.path.isdir(groups) else ():
        gdir = os.path.join(groups, g, "devices")
        for m in os.listdir(gdir) if os.path.isdir(gdir) else ():
            _copy_link(*mirror(os.path.join("sys/kernel/iommu_groups", g, "devices", m)))
        _copy_file(*mirror(os.path.join("sys/kernel/iommu_groups", g, "type")))
    for d in ("sys/class/iommu", "sys/bus/pci/drivers", "sys/module"):
        base = os.path.join(src, d)
        for n in os.listdir(base) if os.path.isdir(base) else ():
            if d != "sys/module" or n.startswith("vfio"):
                _kobject_dir(os.path.join(base, n), os.path.join(out, d, n))
    vfio = os.path.join(src, "dev/vfio")
    for n in os.listdir(vfio) if os.path.isdir(vfio) else ():
        if not os.path.isdir(os.path.join(vfio, n)):
            _touch(os.path.join(out, "dev/vfio", n))
    if os.path.exists(os.path.join(src, "dev/iommu")):
        _touch(os.path.join(out, "dev/iommu"))
    for f in _FILES:
        _copy_file(*mirror(f))
    return count


__all__ = ["snapshot"]
