"""Executes a plan against sysfs under the host root, checking every write by reading it back.

I/O lives here and only here. A step that fails stops the plan: the device being moved is put
back on its original driver (or its state is reported exactly), the journal is cleared, and a
later run plans again from what the kernel then shows. Reads of attributes that wait for the
device lock (``sriov_numvfs``, ``driver_override``) have a deadline: a device whose lock is held
(a PF mid-unbind) fails its step as busy instead of hanging the agent.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from hostdev.deviceplugin.config.memory import DriverMemory
from hostdev.host import bounded
from hostdev.host.address import PciAddress
from hostdev.host.model import is_vfio_driver
from hostdev.host.sysfs import Sysfs
from hostdev.policy.plan import Step

log = logging.getLogger(__name__)

SETTLE_SECONDS = 15.0  # async-probing drivers (nvme, GPUs) bind a while after drivers_probe returns


class KernelIO(Protocol):
    """Where writes go: the real sysfs, or a simulated kernel in tests."""

    def write(self, path: str, value: str) -> None: ...


class SysfsIO:
    """The real thing: one ``write(2)`` per attribute, as sysfs requires."""

    def write(self, path: str, value: str) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode("ascii"))
        finally:
            os.close(fd)


class StepError(RuntimeError):
    def __init__(self, step: Step, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.errno = err


@dataclass(frozen=True, slots=True)
class ExecResult:
    done: tuple[Step, ...]
    failed: Step | None = None
    error: str | None = None
    aftermath: tuple[str, ...] = ()  # what the failure left behind, device by device

    @property
    def ok(self) -> bool:
        return self.failed is None


def _errname(e: int | None) -> str:
    return errno.errorcode.get(e, str(e)) if e is not None else "?"


class BusyError(RuntimeError):
    """A read of a device attribute did not finish in time: the kernel holds the device lock."""


def _locked(path: str, timeout: float) -> str | None:
    """An attribute whose show() takes the device lock, read with a deadline."""
    value = bounded.read_one(path, timeout)
    if value == bounded.BUSY:
        raise BusyError(f"{path}: {bounded.BUSY}")
    return value


class Executor:
    def __init__(
        self,
        sysfs: Sysfs,
        memory: DriverMemory,
        io: KernelIO | None = None,
        *,
        settle: float = SETTLE_SECONDS,
        on_step: Callable[[int, Step], None] | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.sysfs = sysfs
        self.memory = memory
        self.io = io or SysfsIO()
        self.settle = settle
        self.read_timeout = sysfs.read_timeout
        self.on_step = on_step  # called after each completed step (tests inject crashes here)
        self.echo = echo or (lambda _line: None)

    # ---- paths and reads --------------------------------------------------------------------
    def _dev(self, a: PciAddress, attr: str) -> str:
        return os.path.join(self.sysfs.pci_device_dir(a), attr)

    def driver_of(self, a: PciAddress) -> str | None:
        try:
            return os.path.basename(os.readlink(self._dev(a, "driver")))
        except OSError:
            return None

    def override_of(self, a: PciAddress) -> str | None:
        v = _locked(self._dev(a, "driver_override"), self.read_timeout)
        return None if not v or v == "(null)" else v

    def numvfs_of(self, a: PciAddress) -> int | None:
        v = _locked(self._dev(a, "sriov_numvfs"), self.read_timeout)
        try:
            return None if v is None else int(v)
        except ValueError:
            return None

    def autoprobe_of(self, a: PciAddress) -> str | None:
        return bounded.read_attr(self._dev(a, "sriov_drivers_autoprobe"))

    def state_line(self, a: PciAddress) -> str:
        if not os.path.isdir(self.sysfs.pci_device_dir(a)):
            return f"{a}: gone"
        try:
            ov = self.override_of(a)
            nv = self.numvfs_of(a)
        except BusyError:
            return f"{a}: driver {self.driver_of(a) or '(none)'}, {bounded.BUSY}"
        return f"{a}: driver {self.driver_of(a) or '(none)'}, driver_override {ov or '(none)'}" + (
            f", sriov_numvfs {nv}" if nv is not None else ""
        )

    # ---- one step ---------------------------------------------------------------------------
    def _write(self, step: Step, path: str, value: str) -> None:
        try:
            self.io.write(path, value)
        except OSError as e:
            raise StepError(step, self.explain(step, e, path), e.errno) from e

    def _wait(self, step: Step, ok: Callable[[], bool], what: Callable[[], str]) -> None:
        deadline = time.monotonic() + self.settle
        while True:
            try:
                if ok():
                    return
                busy = None
            except BusyError as e:
                busy = str(e)  # the lock may be released in a moment: keep trying
            if time.monotonic() >= deadline:
                try:
                    seen = busy or what()
                except BusyError as e:
                    seen = str(e)
                raise StepError(step, f"{step.address}: read-back after write: {seen}")
            time.sleep(0.02)

    def apply_step(self, step: Step) -> None:
        a = step.address
        if step.kind == "remember":
            self.memory.remember(a, step.value or None)
            return
        if step.kind == "forget":
            self.memory.forget(a)
            return
        if step.kind == "remember-autoprobe":
            self.memory.remember_autoprobe(a, step.value == "1")
            return
        if step.kind == "forget-autoprobe":
            self.memory.forget_autoprobe(a)
            return
        self.memory.begin(step.to_dict())
        if step.kind == "set-autoprobe":
            self._write(step, self._dev(a, "sriov_drivers_autoprobe"), step.value)
            self._wait(
                step,
                lambda: self.autoprobe_of(a) == step.value,
                lambda: (
                    f"sriov_drivers_autoprobe reads {self.autoprobe_of(a)}, expected {step.value}"
                ),
            )
        if step.kind == "set-numvfs":
            n = int(step.value)
            self._write(step, self._dev(a, "sriov_numvfs"), step.value)
            self._wait(
                step,
                lambda: self.numvfs_of(a) == n,
                lambda: f"sriov_numvfs reads {self.numvfs_of(a)}, expected {n}",
            )
        elif step.kind == "driver-override":
            # "\n" clears the override (the kernel strips one trailing newline; empty = none).
            self._write(step, self._dev(a, "driver_override"), step.value or "\n")
            want = step.value or None
            self._wait(
                step,
                lambda: self.override_of(a) == want,
                lambda: f"driver_override reads {self.override_of(a)}, expected {want}",
            )
        elif step.kind == "unbind":
            # Through the planned driver's own unbind file: if something else moved the device
            # meanwhile the kernel says ENODEV instead of us unbinding the wrong driver.
            self._write(step, self.sysfs.path("sys/bus/pci/drivers", step.value, "unbind"), str(a))
            self._wait(
                step,
                lambda: self.driver_of(a) is None,
                lambda: f"still bound to {self.driver_of(a)}",
            )
        elif step.kind == "probe":
            self._write(step, self.sysfs.path("sys/bus/pci/drivers_probe"), str(a))
            self._wait(
                step,
                lambda: self.driver_of(a) == step.expect,
                lambda: (
                    f"bound to {self.driver_of(a) or 'no driver'} after drivers_probe, expected "
                    f"{step.expect}"
                    + (
                        f" (is the {step.expect} driver loaded?)"
                        if not os.path.isdir(
                            self.sysfs.path("sys/bus/pci/drivers", step.expect or "")
                        )
                        else ""
                    )
                ),
            )
        self.memory.done()

    # ---- the plan ---------------------------------------------------------------------------
    def run(self, steps: Sequence[Step]) -> ExecResult:
        done: list[Step] = []
        for i, step in enumerate(steps, 1):
            try:
                self.apply_step(step)
            except StepError as e:
                self.memory.done()
                aftermath = self._recover(step, steps)
                self.echo(f"  {i:3d}. FAILED {step.describe()}: {e}")
                return ExecResult(tuple(done), step, str(e), aftermath)
            done.append(step)
            self.echo(f"  {i:3d}. ok     {step.describe()}")
            log.info("step %d done: %s", i, step.describe())
            if self.on_step is not None:
                self.on_step(i, step)
        return ExecResult(tuple(done))

    def _recover(self, failed: Step, steps: Sequence[Step]) -> tuple[str, ...]:
        """Leave the failed device on a known driver: back to its original one when the step
        was part of moving it away; report exactly what every touched device looks like."""
        a = failed.address
        notes: list[str] = []
        moving_away = failed.kind in {"driver-override", "unbind", "probe"} and any(
            s.address == a
            and s.kind == "probe"
            and s.expect != self.memory.originals.get(a, s.expect)
            for s in steps
        )
        if moving_away and a in self.memory.originals:
            original = self.memory.originals[a]
            override = self._dev(a, "driver_override")
            try:
                cur = self.driver_of(a)
                if cur is not None and cur != original:
                    self.io.write(self.sysfs.path("sys/bus/pci/drivers", cur, "unbind"), str(a))
                if original is not None and self.driver_of(a) is None:
                    # Named, so it binds even where nothing probes by itself (a VF whose PF has
                    # sriov_drivers_autoprobe off); cleared right after.
                    self.io.write(override, original)
                    self.io.write(self.sysfs.path("sys/bus/pci/drivers_probe"), str(a))
                deadline = time.monotonic() + self.settle
                while self.driver_of(a) != original and time.monotonic() < deadline:
                    time.sleep(0.02)
                self.io.write(override, "\n")
                back = self.driver_of(a) == original
                notes.append(
                    f"{a}: rolled back to {original or 'no driver'}"
                    if back
                    else f"{a}: rollback to {original or 'no driver'} did not take"
                )
            except OSError as e:
                notes.append(f"{a}: rollback failed: {_errname(e.errno)} {e.strerror}")
        seen: dict[PciAddress, None] = {}
        for s in steps:
            if s.kind not in {"remember", "forget"}:
                seen.setdefault(s.address, None)
        notes += [self.state_line(x) for x in seen]
        return tuple(notes)

    # ---- kernel errors, in words ------------------------------------------------------------
    def _no_sriov(self, a: PciAddress) -> str:
        """ENOENT from sriov_numvfs: the PF's current driver has no SR-IOV enable. Which one it
        is decides what to do."""
        drv = self.driver_of(a)
        if drv is None:
            return f"{a}: PF has no driver: bind it to its host driver first (ENOENT)"
        if is_vfio_driver(drv):
            original = self.memory.originals.get(a)
            back = f" ({original})" if original else ""
            return (
                f"{a}: the PF is bound to {drv}, which makes no VFs for the host (vfio-pci's "
                f"SR-IOV enable is off: module option enable_sriov) (ENOENT): give the PF back "
                f"to its host driver{back} first"
            )
        return f"{a}: the PF's driver {drv} cannot change its VFs through sysfs (ENOENT)"

    def explain(self, step: Step, e: OSError, path: str) -> str:
        a, code = step.address, e.errno
        name = _errname(code)
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{a}: cannot write {path}: {name} (run as root with a writable /sys)"
        if step.kind == "set-numvfs":
            total = bounded.read_attr(self._dev(a, "sriov_totalvfs"))
            try:
                cur = self.numvfs_of(a)
            except BusyError:
                return f"{a}: {step.describe()} failed ({name}) and the PF is {bounded.BUSY}"
            if code == errno.EBUSY:
                return (
                    f"{a}: VFs in use / already enabled ({cur} VFs): set sriov_numvfs to 0 "
                    f"first, and make sure no VF is in use (EBUSY)"
                )
            if code == errno.ERANGE:
                return f"{a}: {step.value} VFs is above sriov_totalvfs ({total}) (ERANGE)"
            if code == errno.ENOENT:
                if not os.path.exists(path):
                    return f"{a}: no sriov_numvfs: not an SR-IOV PF, or the device is gone (ENOENT)"
                return self._no_sriov(a)
            if code == errno.EINVAL:
                return f"{a}: the PF driver rejected {step.value} VFs (EINVAL)"
            if code == errno.ENODEV:
                return f"{a}: the PF disappeared (ENODEV)"
            if code in (errno.EOPNOTSUPP, errno.ENOSYS):
                return f"{a}: the PF's driver cannot configure VFs ({name})"
            if code == errno.ENOMEM:
                return f"{a}: the kernel ran out of resources for {step.value} VFs (ENOMEM)"
        if step.kind == "unbind" and code == errno.ENODEV:
            return f"{a}: not bound to {step.value} any more (ENODEV): someone moved it meanwhile"
        if code == errno.ENODEV:
            return f"{a}: no such device (ENODEV): it was removed"
        if code == errno.ENOENT:
            return f"{a}: {path} does not exist (ENOENT): device or driver gone"
        if code == errno.EINVAL:
            return f"{a}: the kernel rejected {step.describe()} (EINVAL)"
        if code == errno.EBUSY:
            return f"{a}: device busy (EBUSY) during {step.describe()}"
        return f"{a}: {step.describe()} failed: {name} {e.strerror or ''}".rstrip()
