"""A simulated kernel for fake host trees: reacts to sysfs writes the way Linux does.

Plain files in a fake tree do nothing when written; this turns the writes the configuration
executor makes into the kernel's effects on a :class:`~hostdev.testing.fakesysfs.FakeHost`:

- ``sriov_numvfs``: creates/removes VF directories and links; ERANGE above ``sriov_totalvfs``,
  ENOENT when the PF has no driver or is on vfio-pci (no SR-IOV enable), EBUSY when changing a
  non-zero count without 0 first; new VFs are probed to their VF driver when
  ``sriov_drivers_autoprobe`` is 1.
- ``sriov_drivers_autoprobe``: 0 or 1; while 0, the PF's VFs bind only to the driver their
  ``driver_override`` names (``pci_device_can_probe``).
- ``driver_override``: stored (empty clears it, shown as ``(null)``).
- ``drivers/<d>/unbind``: ENODEV unless the device is bound to ``d``.
- ``drivers/<d>/bind`` and ``drivers_probe``: honour ``driver_override``; without one a device
  binds to its own host driver (the one it had when first seen: the kernel's modalias match).

Errors can be injected (``inject``) and the agent "killed" after the n-th write
(``kill_after``), which raises :class:`AgentKilled` (a BaseException, like SystemExit, so no
``except Exception`` in the agent swallows it). The driver table persists in the tree, so a
second process (a restarted agent) sees the same kernel.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

from hostdev.host.address import PciAddress, PciAddressError
from hostdev.testing.fakesysfs import FakeHost

STATE = ".fakekernel.json"


class AgentKilled(BaseException):
    """The simulated agent process died right after a write."""


@dataclass
class _Fault:
    attr: str  # sriov_numvfs | driver_override | unbind | bind | drivers_probe
    err: int
    address: PciAddress | None
    times: int


def _oserror(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


class FakeKernel:
    def __init__(self, host: FakeHost, *, vf_drivers: dict[str, str | None] | None = None) -> None:
        self.host = host
        self.root = Path(host.root)
        self.writes: list[tuple[str, str]] = []
        self._faults: list[_Fault] = []
        self._kill_after: int | None = None
        state = self.root / STATE
        if state.exists():
            data = json.loads(state.read_text())
            self.defaults: dict[str, str | None] = data["defaults"]
            self.vf_drivers: dict[str, str | None] = data["vf_drivers"]
        else:
            self.defaults = {}
            self.vf_drivers = {}
            for link in (self.root / "sys/bus/pci/devices").iterdir():
                self.defaults[link.name] = self._driver(link.name)
                if (link / "sriov_totalvfs").exists():
                    vfs = sorted(link.glob("virtfn*"))
                    self.vf_drivers[link.name] = (
                        self._driver(vfs[0].resolve().name) if vfs else None
                    )
        self.vf_drivers.update(vf_drivers or {})
        for pf, drv in (vf_drivers or {}).items():
            # The driver the kernel binds to a new VF is the one its modalias matches: keep
            # modules.alias saying so, as the agent reads it to learn a VF's host driver.
            if drv is not None and drv != "vfio-pci":
                vendor = (self._dev(pf) / "vendor").read_text().strip().removeprefix("0x")
                vf_dev = (self._dev(pf) / "sriov_vf_device").read_text().strip()
                host.add_module_alias(vendor, vf_dev, drv)
        groups = [int(g.name) for g in (self.root / "sys/kernel/iommu_groups").iterdir()]
        host._next_group = max([host._next_group, *groups])
        self._save()

    # ---- test controls ----------------------------------------------------------------------
    def inject(
        self, attr: str, err: int, address: PciAddress | str | None = None, times: int = 1
    ) -> None:
        """The next ``times`` writes to ``attr`` (for ``address``, or any) fail with ``err``."""
        a = PciAddress.parse(address) if isinstance(address, str) else address
        self._faults.append(_Fault(attr, err, a, times))

    def kill_after(self, writes: int) -> None:
        """Raise AgentKilled right after the ``writes``-th successful write from now."""
        self._kill_after = len(self.writes) + writes

    # ---- helpers ----------------------------------------------------------------------------
    def _save(self) -> None:
        (self.root / STATE).write_text(
            json.dumps({"defaults": self.defaults, "vf_drivers": self.vf_drivers})
        )

    def _dev(self, a: str) -> Path:
        return self.root / "sys/bus/pci/devices" / a

    def _driver(self, a: str) -> str | None:
        link = self._dev(a) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def _override(self, a: str) -> str | None:
        p = self._dev(a) / "driver_override"
        v = p.read_text().strip() if p.exists() else ""
        return None if v in ("", "(null)") else v

    def _fault(self, attr: str, a: str | None, path: str) -> None:
        for f in self._faults:
            if f.attr == attr and f.times > 0 and (f.address is None or str(f.address) == a):
                f.times -= 1
                raise _oserror(f.err, path)

    def _loaded(self, driver: str) -> bool:
        return (self.root / "sys/bus/pci/drivers" / driver).is_dir()

    def _attach(self, a: str, driver: str | None) -> None:
        self.host.bind(a, driver)

    # ---- the write entry point --------------------------------------------------------------
    def write(self, path: str, value: str) -> None:
        rel = os.path.relpath(path, self.root)
        parts = rel.split(os.sep)
        text = value.strip()
        if parts[:4] == ["sys", "bus", "pci", "devices"] and len(parts) == 6:
            a, attr = parts[4], parts[5]
            if not self._dev(a).exists():
                raise _oserror(errno.ENOENT, path)
            if attr == "sriov_numvfs":
                self._fault(attr, a, path)
                self._numvfs(a, text, path)
            elif attr == "driver_override":
                self._fault(attr, a, path)
                (self._dev(a) / attr).write_text((text or "(null)") + "\n")
            elif attr == "sriov_drivers_autoprobe" and (self._dev(a) / attr).exists():
                if text not in ("0", "1"):
                    raise _oserror(errno.EINVAL, path)
                (self._dev(a) / attr).write_text(text + "\n")
            else:
                raise _oserror(errno.EACCES, path)
        elif parts[:4] == ["sys", "bus", "pci", "devices"] and parts[5:] == ["driver", "unbind"]:
            drv = self._driver(parts[4])
            if drv is None:
                raise _oserror(errno.ENOENT, path)
            self._unbind(drv, text, path)
        elif parts[:4] == ["sys", "bus", "pci", "drivers"] and len(parts) == 6:
            drv, attr = parts[4], parts[5]
            if attr == "unbind":
                self._unbind(drv, text, path)
            elif attr == "bind":
                self._bind(drv, text, path)
            else:
                raise _oserror(errno.EACCES, path)
        elif rel == "sys/bus/pci/drivers_probe":
            self._fault("drivers_probe", text, path)
            self._probe(text, path)
        else:
            raise _oserror(errno.EACCES, path)
        self.writes.append((rel, text))
        if self._kill_after is not None and len(self.writes) >= self._kill_after:
            self._kill_after = None
            raise AgentKilled(f"agent killed after write {len(self.writes)}: {rel} <- {text}")

    # ---- kernel behaviour -------------------------------------------------------------------
    def _numvfs(self, a: str, text: str, path: str) -> None:
        try:
            n = int(text, 0)
        except ValueError:
            raise _oserror(errno.EINVAL, path) from None
        d = self._dev(a)
        total = int((d / "sriov_totalvfs").read_text())
        cur = int((d / "sriov_numvfs").read_text())
        if n < 0:
            raise _oserror(errno.EINVAL, path)
        if n > total:
            raise _oserror(errno.ERANGE, path)
        if n == cur:
            return
        if self._driver(a) in (None, "vfio-pci"):
            raise _oserror(errno.ENOENT, path)
        if n and cur:
            raise _oserror(errno.EBUSY, path)
        autoprobe = (d / "sriov_drivers_autoprobe").read_text().strip() == "1"
        vf_driver = self.vf_drivers.get(a)
        self.host.set_numvfs(a, n, vf_driver=vf_driver if autoprobe else None)
        if n and vf_driver is not None:
            # udev loads the VF driver's module on the VFs' add events even when autoprobe is
            # off (it only stops the binding), so a later drivers_probe can bind them.
            (self.root / "sys/bus/pci/drivers" / vf_driver).mkdir(parents=True, exist_ok=True)
        for link in d.glob("virtfn*"):
            self.defaults[link.resolve().name] = vf_driver
        self._save()

    def _unbind(self, drv: str, a: str, path: str) -> None:
        self._fault("unbind", a, path)
        if not self._dev(a).exists() or self._driver(a) != drv:
            raise _oserror(errno.ENODEV, path)
        self._attach(a, None)

    def _candidate(self, a: str) -> str | None:
        ov = self._override(a)
        if ov is not None:
            return ov
        pf = self._dev(a) / "physfn"
        if pf.is_symlink() and (pf / "sriov_drivers_autoprobe").read_text().strip() == "0":
            return None  # a VF of a PF that does not autoprobe binds only by override
        return self.defaults.get(a)

    def _bind(self, drv: str, a: str, path: str) -> None:
        self._fault("bind", a, path)
        try:
            PciAddress.parse(a)
        except PciAddressError:
            raise _oserror(errno.ENODEV, path) from None
        if not self._dev(a).exists():
            raise _oserror(errno.ENODEV, path)
        if self._driver(a) is not None:
            raise _oserror(errno.EBUSY, path)
        if self._candidate(a) != drv:
            raise _oserror(errno.ENODEV, path)
        self._attach(a, drv)

    def _probe(self, a: str, path: str) -> None:
        if not self._dev(a).exists():
            raise _oserror(errno.ENODEV, path)
        if self._driver(a) is not None:
            return
        drv = self._candidate(a)
        if drv is not None and self._loaded(drv):
            self._attach(a, drv)
