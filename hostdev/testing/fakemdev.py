"""Mediated devices in a fake host tree, and the kernel's answers to ``create`` / ``remove``.

Lays out what the mdev core and a parent driver show (see :mod:`hostdev.host.mdev`) and, like
:class:`~hostdev.testing.fakekernel.FakeKernel`, turns the writes the node agent makes into the
kernel's effects: ``create`` with a UUID makes the instance (its own IOMMU group named
``vfio-noiommu`` and ``/dev/vfio/<group>``, as the mtty sample does on a real kernel), EINVAL
for a malformed or taken UUID, ENOSPC when the type has no instance left; ``remove`` of ``1``
removes it. Types of one parent share a capacity pool when ``shared_pool`` is set (mtty's do:
one port pool split into 1- and 2-port instances).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from hostdev.host.address import PciAddress
from hostdev.host.mdevuuid import UUID_RE
from hostdev.testing.fakesysfs import FakeHost


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


@dataclass(frozen=True)
class FakeType:
    id: str
    name: str | None = None
    description: str | None = None
    device_api: str = "vfio-pci"
    cost: int = 1  # pool units one instance takes


@dataclass
class FakeMdev:
    host: FakeHost
    writes: list[tuple[str, str]] = field(default_factory=list)
    _pools: dict[str, int] = field(default_factory=dict)  # parent -> units left
    _types: dict[str, dict[str, FakeType]] = field(default_factory=dict)
    _dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def sys(self) -> Path:
        return self.host.sys

    def add_parent(
        self, name: str, types: list[FakeType], capacity: int, *, pci: bool = False
    ) -> Path:
        """A parent device ``name`` (a PCI address already added to the host when ``pci``, else a
        virtual device like mtty's) offering ``types`` from one pool of ``capacity`` units."""
        d = (
            self.host.device_dir(PciAddress.parse(name))
            if pci
            else self.sys / "devices/virtual" / name / name
        )
        d.mkdir(parents=True, exist_ok=True)
        _link(self.sys / "class/mdev_bus" / name, d)
        self._pools[name] = capacity
        self._types[name] = {t.id: t for t in types}
        self._dirs[name] = d
        for t in types:
            tdir = d / "mdev_supported_types" / t.id
            if t.name is not None:
                _write(tdir / "name", t.name + "\n")
            if t.description is not None:
                _write(tdir / "description", t.description + "\n")
            _write(tdir / "device_api", t.device_api + "\n")
            _write(tdir / "create", "")
            (tdir / "devices").mkdir(exist_ok=True)
        self._sync_available(name)
        return d

    def remove_parent(self, name: str) -> None:
        """The parent goes away (driver unloaded, device unplugged): its instances with it."""
        for uuid in [u for u, p in self._instances().items() if p == name]:
            self._remove(uuid)
        link = self.sys / "class/mdev_bus" / name
        d = self._dirs.pop(name)
        link.unlink()
        for tdir in (d / "mdev_supported_types").iterdir():
            for f in tdir.iterdir():
                if f.is_dir():
                    f.rmdir()
                else:
                    f.unlink()
            tdir.rmdir()
        (d / "mdev_supported_types").rmdir()
        self._pools.pop(name)
        self._types.pop(name)

    def _instances(self) -> dict[str, str]:
        out = {}
        bus = self.sys / "bus/mdev/devices"
        for e in bus.iterdir() if bus.exists() else ():
            out[e.name] = e.resolve().parent.name
        return out

    def _sync_available(self, parent: str) -> None:
        for t in self._types[parent].values():
            tdir = self._dirs[parent] / "mdev_supported_types" / t.id
            _write(tdir / "available_instances", f"{self._pools[parent] // t.cost}\n")

    # ---- what the kernel does -------------------------------------------------------------
    def add_instance(self, parent: str, type_id: str, uuid: str) -> int:
        """Make instance ``uuid`` as the kernel does on ``create``; returns its IOMMU group."""
        t = self._types[parent][type_id]
        if self._pools[parent] < t.cost:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._pools[parent] -= t.cost
        d = self._dirs[parent] / uuid
        d.mkdir()
        tdir = self._dirs[parent] / "mdev_supported_types" / type_id
        _link(d / "mdev_type", tdir)
        _link(tdir / "devices" / uuid, d)
        _write(d / "remove", "")
        _link(self.sys / "bus/mdev/devices" / uuid, d)
        drv = self.sys / "bus/mdev/drivers/vfio_mdev"
        drv.mkdir(parents=True, exist_ok=True)
        _link(d / "driver", drv)
        g = self.host.new_group()
        gdir = self.sys / "kernel/iommu_groups" / str(g)
        _link(gdir / "devices" / uuid, d)
        _write(gdir / "name", "vfio-noiommu\n")
        _link(d / "iommu_group", gdir)
        _write(self.host.root / "dev/vfio" / str(g), "")
        self._sync_available(parent)
        return g

    def _remove(self, uuid: str) -> None:
        d = (self.sys / "bus/mdev/devices" / uuid).resolve()
        parent = d.parent.name
        type_id = os.path.basename(os.readlink(d / "mdev_type"))
        gdir = (d / os.readlink(d / "iommu_group")).resolve()
        (self.host.root / "dev/vfio" / gdir.name).unlink(missing_ok=True)
        (gdir / "devices" / uuid).unlink()
        (gdir / "devices").rmdir()
        (gdir / "name").unlink()
        gdir.rmdir()
        tdir = self._dirs[parent] / "mdev_supported_types" / type_id
        (tdir / "devices" / uuid).unlink()
        for f in ("mdev_type", "remove", "driver", "iommu_group"):
            (d / f).unlink()
        d.rmdir()
        (self.sys / "bus/mdev/devices" / uuid).unlink()
        self._pools[parent] += self._types[parent][type_id].cost
        self._sync_available(parent)

    def write(self, path: str, value: str) -> None:
        """The node agent's write of ``value`` to ``path`` (a ``create`` or ``remove`` file)."""
        self.writes.append((path, value))
        p = Path(path)
        if p.name == "create":
            uuid = value.strip().lower()
            parent, type_id = p.parents[2].name, p.parent.name
            if not UUID_RE.match(uuid) or (self.sys / "bus/mdev/devices" / uuid).exists():
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
            try:
                self.add_instance(parent, type_id, uuid)
            except OSError as e:
                raise OSError(e.errno, e.strerror, path) from None
        elif p.name == "remove":
            if value.strip() != "1":
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
            self._remove(p.parent.name)
        else:
            raise OSError(errno.EACCES, f"fake mdev: unexpected write to {path}")
