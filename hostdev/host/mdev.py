"""Mediated devices (mdev): parents, their types and the instances, as sysfs shows them.

A parent is any device the kernel registered with the mdev core (a vGPU-capable PCI GPU, an
s390 AP matrix, a sample driver's virtual device): ``/sys/class/mdev_bus/<name>`` links to it,
and its ``mdev_supported_types/<type-id>/`` directories carry ``name`` (optional),
``description`` (optional), ``device_api``, ``available_instances`` and the write-only
``create``. An instance is ``/sys/bus/mdev/devices/<uuid>`` (a directory below its parent) with
``mdev_type`` (link to the type), ``iommu_group`` (each instance gets its own group, so its own
``/dev/vfio/<group>``) and ``remove``. One pass reads a few files per type and instance.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from hostdev.host.address import PciAddress, PciAddressError
from hostdev.host.bounded import read_attr

MDEV_CLASS = "sys/class/mdev_bus"
MDEV_DEVICES = "sys/bus/mdev/devices"


@dataclass(frozen=True, slots=True)
class MdevType:
    id: str  # directory name: "nvidia-35", "mtty-2"
    name: str | None  # the `name` file ("GRID M60-2Q"); None when the driver has none
    description: str | None
    device_api: str | None  # "vfio-pci", "vfio-ccw", "vfio-ap"
    available_instances: int | None  # None: unreadable

    @property
    def display_name(self) -> str:
        """The type's name as KubeVirt matches ``mdevNameSelector`` against it: the ``name``
        file, or the type id when there is none."""
        return self.name or self.id


@dataclass(frozen=True, slots=True)
class MdevParent:
    name: str  # device name: "0000:3b:00.0" for a PCI parent, "mtty" for the sample
    pci: PciAddress | None  # set when the parent is a PCI function
    numa_node: int | None
    types: tuple[MdevType, ...]

    def type(self, key: str) -> MdevType | None:
        """The type whose id or name is ``key``."""
        for t in self.types:
            if key in (t.id, t.name):
                return t
        return None


@dataclass(frozen=True, slots=True)
class MdevInstance:
    uuid: str  # lower case, as the kernel names it
    type_id: str | None
    parent: str | None
    iommu_group: int | None
    vfio_node: bool  # /dev/vfio/<group> exists
    driver: str | None  # the mdev driver bound ("vfio_mdev", "mtty"); None: unbound


@dataclass(frozen=True, slots=True)
class MdevInventory:
    parents: Mapping[str, MdevParent]
    instances: Mapping[str, MdevInstance]

    def instances_of(self, parent: str) -> list[MdevInstance]:
        return [i for i in self.instances.values() if i.parent == parent]


def _text(path: str) -> str | None:
    value = read_attr(path)
    return None if value is None else value.strip()


def _int(raw: str | None) -> int | None:
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None


def _link_name(path: str) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def read_type(type_dir: str) -> MdevType:
    return MdevType(
        id=os.path.basename(type_dir),
        name=_text(os.path.join(type_dir, "name")) or None,
        description=_text(os.path.join(type_dir, "description")) or None,
        device_api=_text(os.path.join(type_dir, "device_api")) or None,
        available_instances=_int(_text(os.path.join(type_dir, "available_instances"))),
    )


def read_parent(root: str, name: str) -> MdevParent | None:
    """The parent ``name`` as ``/sys/class/mdev_bus/<name>`` shows it (None: not a parent)."""
    base = os.path.join(root, MDEV_CLASS, name)
    types_dir = os.path.join(base, "mdev_supported_types")
    if not os.path.isdir(types_dir):
        return None
    try:
        pci: PciAddress | None = PciAddress.parse(name)
    except PciAddressError:
        pci = None
    numa = _int(_text(os.path.join(base, "numa_node"))) if pci is not None else None
    types = tuple(read_type(os.path.join(types_dir, t)) for t in _listdir(types_dir))
    return MdevParent(name, pci, None if numa is None or numa < 0 else numa, types)


def read_instance(root: str, uuid: str) -> MdevInstance | None:
    base = os.path.join(root, MDEV_DEVICES, uuid)
    try:
        # The bus entry links to the instance's directory, which sits below its parent's:
        # one readlink instead of resolving the whole path.
        target = os.readlink(base)
    except OSError:
        return None
    group = _int(_link_name(os.path.join(base, "iommu_group")))
    return MdevInstance(
        uuid=uuid,
        type_id=_link_name(os.path.join(base, "mdev_type")),
        parent=os.path.basename(os.path.dirname(target)) or None,
        iommu_group=group,
        vfio_node=group is not None and os.path.exists(os.path.join(root, "dev/vfio", str(group))),
        driver=_link_name(os.path.join(base, "driver")),
    )


def discover_mdev(root: str) -> MdevInventory:
    """Every mdev parent and instance under the host ``root`` (empty when mdev is not loaded)."""
    parents = {}
    for name in _listdir(os.path.join(root, MDEV_CLASS)):
        p = read_parent(root, name)
        if p is not None:
            parents[name] = p
    instances = {}
    for uuid in _listdir(os.path.join(root, MDEV_DEVICES)):
        inst = read_instance(root, uuid)
        if inst is not None:
            instances[uuid] = inst
    return MdevInventory(parents, instances)


def type_dir(root: str, parent: str, type_id: str) -> str:
    return os.path.join(root, MDEV_CLASS, parent, "mdev_supported_types", type_id)


def instance_dir(root: str, uuid: str) -> str:
    return os.path.join(root, MDEV_DEVICES, uuid)
