"""NodePrepareResources / NodeUnprepareResources, without gRPC: claims in, results out.

Prepare of one claim: read it from the API server; take this driver's devices on this node's
pool (anything else refuses the claim); check each device is a unit this node serves through
DRA, free (no pod holds it through the device plugin, no other claim holds it) and re-read
from sysfs (:func:`~hostdev.deviceplugin.units.recheck_unit`); only then checkpoint, write the
claim's CDI spec and the KEP-5304 metadata files, and checkpoint again. A refusal writes
nothing. Repeated prepares answer from the checkpoint. Unprepare removes every file the claim
may have written (from its checkpoint, and by name for a claim without one) and then the
checkpoint; a claim never prepared unprepares fine.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hostdev.deviceplugin.atomicfile import atomic_write
from hostdev.deviceplugin.dra.checkpoint import (
    PREPARED,
    PREPARING,
    Checkpoints,
    ClaimRecord,
    PreparedDevice,
)
from hostdev.deviceplugin.mdev import MdevUnits
from hostdev.deviceplugin.units import UnitRefusedError, recheck_for_handout
from hostdev.host.address import PciAddress
from hostdev.host.sysfs import Sysfs
from hostdev.policy.dra import (
    DRIVER,
    ClaimDevice,
    ClaimError,
    ClaimRef,
    DraDevice,
    MetadataDevice,
    PreparedUnit,
    cdi_bytes,
    claim_devices,
    metadata_cdi_file,
    metadata_cdi_glob,
    metadata_cdi_spec,
    metadata_claim_dir,
    metadata_host_path,
    metadata_stream,
    qualified,
    vfio_cdi_file,
    vfio_cdi_spec,
)

log = logging.getLogger(__name__)

FILE_MODE = 0o644  # containers (any user) read the metadata; runtimes read the CDI specs
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


def _check_key(key: ClaimKey) -> None:
    """Names end up in file paths: only what Kubernetes allows for them passes."""
    if not (_NAME.match(key.namespace) and _NAME.match(key.name) and _UID.match(key.uid)):
        raise ClaimError(
            f"claim {key.namespace!r}/{key.name!r} (UID {key.uid!r}): not a valid "
            "namespace, name and UID"
        )


@dataclass(frozen=True, slots=True)
class ClaimKey:
    """A claim as the kubelet names it."""

    namespace: str
    uid: str
    name: str


@dataclass(frozen=True, slots=True)
class Offer:
    """A unit this node serves through DRA now, as prepare sees it."""

    device: DraDevice
    # why it must not be prepared whatever the host says: a pod holds it through the device
    # plugin, or its IOMMU group is split across resources
    blocked: str | None = None
    advertised: tuple[PciAddress, ...] | None = None  # its group's members when last judged
    mdev: MdevUnits | None = None  # set for an mdev instance: re-read through its resource


@dataclass(frozen=True, slots=True)
class Answer:
    """One claim's result: its devices, or why it failed (then nothing was written)."""

    devices: tuple[PreparedDevice, ...] = ()
    error: str = ""


class Preparer:
    def __init__(
        self,
        sysfs: Sysfs,
        checkpoints: Checkpoints,
        *,
        pool: str,
        plugin_data_dir: str,
        cdi_dir: str,
        get_claim: Callable[[str, str], Mapping[str, Any]],
    ) -> None:
        self.sysfs = sysfs
        self.checkpoints = checkpoints
        self.pool = pool
        self.plugin_data_dir = plugin_data_dir
        self.cdi_dir = cdi_dir
        self.get_claim = get_claim

    # ---- prepare ------------------------------------------------------------------------
    def prepare(self, claims: Sequence[ClaimKey], offers: Mapping[str, Offer]) -> dict[str, Answer]:
        out: dict[str, Answer] = {}
        for key in claims:
            try:
                out[key.uid] = self._prepare_one(key, offers)
            except (ClaimError, UnitRefusedError) as e:
                log.error("DRA: refused to prepare claim %s/%s: %s", key.namespace, key.name, e)
                out[key.uid] = Answer(error=str(e))
            except OSError as e:
                log.error("DRA: preparing claim %s/%s failed: %s", key.namespace, key.name, e)
                out[key.uid] = Answer(error=f"claim {key.namespace}/{key.name}: {e}")
        return out

    def _prepare_one(self, key: ClaimKey, offers: Mapping[str, Offer]) -> Answer:
        _check_key(key)
        where = f"claim {key.namespace}/{key.name}"
        done = self.checkpoints.records.get(key.uid)
        if done is not None and done.state == PREPARED and all(map(os.path.exists, done.files)):
            log.info("DRA: %s is prepared already (%d devices)", where, len(done.devices))
            return Answer(done.devices)
        try:
            claim = self.get_claim(key.namespace, key.name)
        except Exception as e:  # the API client raises many kinds; the kubelet retries
            raise ClaimError(f"{where}: cannot read it from the API server: {e}") from e
        ref, devices = claim_devices(claim, uid=key.uid, pool=self.pool)
        holders = self.checkpoints.by_device()
        units: list[tuple[ClaimDevice, Offer, PreparedUnit]] = []
        for cd in devices:
            offer = offers.get(cd.device)
            if offer is None:
                raise ClaimError(
                    f"{where}: device {cd.device} ({cd.address or cd.mdev_uuid}) is not served "
                    "through DRA on this node (its resource moved to the device plugin, or it is "
                    "gone)"
                )
            if offer.blocked:
                raise ClaimError(f"{where}: device {cd.device} is not handed out: {offer.blocked}")
            other = holders.get(cd.device)
            if other is not None and other.uid != key.uid:
                raise ClaimError(
                    f"{where}: device {cd.device} is prepared for claim "
                    f"{other.namespace}/{other.name} already"
                )
            units.append((cd, offer, self._recheck(offer)))
        for cd, _, _ in units:
            if not _NAME.match(cd.base_request):
                raise ClaimError(f"{where}: request name {cd.base_request!r} is not a DNS label")
        return self._write(key, ref, units)

    def _recheck(self, offer: Offer) -> PreparedUnit:
        """The shared re-checks (raise UnitRefusedError with the reason): an mdev instance
        re-read (there, parent there, group node there), else the unit's IOMMU group."""
        d = offer.device
        if offer.mdev is not None:
            inst, _ = offer.mdev.recheck_instance(d.unit.id)
            unit = replace(d.unit, group=inst.iommu_group)  # as it is now
            return PreparedUnit(d.name, d.resource, unit, mdev=True)
        checked = recheck_for_handout(self.sysfs, d.unit, offer.advertised)
        return PreparedUnit(d.name, d.resource, checked.unit, checked.cdevs)

    def _write(
        self,
        key: ClaimKey,
        ref: ClaimRef,
        units: Sequence[tuple[ClaimDevice, Offer, PreparedUnit]],
    ) -> Answer:
        iommufd = os.path.exists(self.sysfs.path("dev/iommu"))
        spec, ids = vfio_cdi_spec(key.uid, [u for _, _, u in units], iommufd)
        files: dict[str, bytes] = {vfio_cdi_file(self.cdi_dir, key.uid): cdi_bytes(spec)}
        # Metadata per request (the request as allocated, e.g. "gpu" or "gpu/large", is
        # recorded; the file is named after the base request), as the upstream helper does.
        by_request: dict[str, list[tuple[ClaimDevice, Offer]]] = {}
        for cd, offer, _ in units:
            by_request.setdefault(cd.request, []).append((cd, offer))
        meta_ids: dict[str, str] = {}
        for request, members in by_request.items():
            base = members[0][0].base_request
            host = metadata_host_path(self.plugin_data_dir, ref, base)
            files[host] = metadata_stream(
                ref,
                request,
                [
                    MetadataDevice(self.pool, cd.device, qualified(o.device.attributes))
                    for cd, o in members
                ],
            )
            mspec, mid = metadata_cdi_spec(ref, base, host)
            files[metadata_cdi_file(self.cdi_dir, key.uid, base)] = cdi_bytes(mspec)
            meta_ids[base] = mid
        answer: list[PreparedDevice] = []
        injected: set[str] = set()
        for cd, _, u in units:
            cdi = [ids[cd.device]]
            if cd.base_request not in injected:
                # The metadata mount rides on the first device of each request.
                cdi.append(meta_ids[cd.base_request])
                injected.add(cd.base_request)
            answer.append(
                PreparedDevice(
                    (cd.base_request,),
                    cd.device,
                    u.resource,
                    tuple(str(a) for a in u.unit.addresses),
                    tuple(cdi),
                )
            )
        claim_dir = metadata_claim_dir(self.plugin_data_dir, key.namespace, key.name)
        record = ClaimRecord(
            key.uid,
            key.namespace,
            key.name,
            PREPARING,
            self.pool,
            tuple(answer),
            tuple(files),
            (claim_dir,),
        )
        # Only this first record must survive a power loss (it lists what to clean up); the
        # files and the final record need not: a node that loses power reboots, its pods start
        # again and the kubelet prepares again (the files are rewritten, the claim re-checked).
        self.checkpoints.put(record)
        try:
            for path, data in files.items():
                atomic_write(path, data, mode=FILE_MODE, durable=False)
        except OSError:
            self._remove_files(record)  # best effort; the PREPARING checkpoint remembers them
            raise
        self.checkpoints.put(
            ClaimRecord(
                key.uid,
                key.namespace,
                key.name,
                PREPARED,
                self.pool,
                tuple(answer),
                tuple(files),
                (claim_dir,),
            ),
            durable=False,
        )
        log.info(
            "DRA: prepared claim %s/%s: %s",
            key.namespace,
            key.name,
            ", ".join(f"{d.device} ({','.join(d.addresses)})" for d in answer),
        )
        return Answer(tuple(answer))

    # ---- unprepare ----------------------------------------------------------------------
    def unprepare(self, claims: Sequence[ClaimKey]) -> dict[str, str]:
        """claim UID -> error ("" when done)."""
        out: dict[str, str] = {}
        for key in claims:
            try:
                self._unprepare_one(key)
                out[key.uid] = ""
            except (OSError, ClaimError) as e:
                log.error("DRA: unpreparing claim %s/%s failed: %s", key.namespace, key.name, e)
                out[key.uid] = f"claim {key.namespace}/{key.name}: {e}"
        return out

    def _unprepare_one(self, key: ClaimKey) -> None:
        _check_key(key)
        record = self.checkpoints.records.get(key.uid)
        if record is not None:
            self._remove_files(record)
        # By name too: a claim whose checkpoint was lost (or never finished) leaves nothing.
        by_name = ClaimRecord(
            key.uid,
            key.namespace,
            key.name,
            PREPARING,
            self.pool,
            files=(
                vfio_cdi_file(self.cdi_dir, key.uid),
                *glob.glob(metadata_cdi_glob(self.cdi_dir, key.uid)),
            ),
            dirs=(metadata_claim_dir(self.plugin_data_dir, key.namespace, key.name),),
        )
        self._remove_files(by_name)
        self.checkpoints.remove(key.uid)
        if record is not None:
            log.info(
                "DRA: unprepared claim %s/%s (%s)",
                key.namespace,
                key.name,
                ", ".join(d.device for d in record.devices) or "no devices",
            )

    @staticmethod
    def _remove_files(record: ClaimRecord) -> None:
        for path in record.files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for d in record.dirs:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(d)


__all__ = ["DRIVER", "Answer", "ClaimKey", "Offer", "Preparer"]
