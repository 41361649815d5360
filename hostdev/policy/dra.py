"""DRA (``resource.k8s.io/v1``) shapes of hostdev's allocation units. Pure.

- **Devices**: one DRA device per allocation unit (an IOMMU group of one resource), named after
  the unit's first PCI address as a DNS label (``0000:3b:02.1`` -> ``pci-0000-3b-02-1``), with
  the standard attributes of ``k8s.io/dynamic-resource-allocation/deviceattribute`` (pciBusID,
  pcieRoot, numaNode) and hostdev's own in the driver's domain (resourceName, ids, pci.ids
  vendor and model, IOMMU group, function count, and for VFs the PF's address and netdev and
  the VF index).
- **Slices**: one pool per node (pool name = node name); devices in name order, cut into slices
  of at most 128 by their place among *all* units, so a unit turning unhealthy (withdrawn from
  its slice) changes one slice only.
- **DeviceClass** per DRA policy: a CEL selector on the driver and the resourceName attribute.
- **Claims**: which allocation results of a ResourceClaim are this driver's on this node.
- **CDI**: the per-claim spec handing the VFIO nodes and a ``PCI_RESOURCE_*`` variable to the
  container, and the KEP-5304 device metadata (stream + bind-mount spec) exactly as the upstream
  Go helper (``kubeletplugin.EnableDeviceMetadata``, v0.37) writes it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hostdev.host.address import PciAddress, PciAddressError
from hostdev.host.mdev import MdevInstance, MdevParent
from hostdev.host.mdevuuid import UUID_RE
from hostdev.host.model import Inventory
from hostdev.host.pciids import PciIds
from hostdev.policy.allocation import AllocUnit, kubevirt_addresses
from hostdev.policy.gojson import marshal_indent, sorted_map
from hostdev.policy.naming import MDEV_PREFIX, resource_env_var

DRIVER = "pci.hostdev.io"
API_VERSION = "resource.k8s.io/v1"
STANDARD_DOMAIN = "resource.kubernetes.io"
ATTR_PCI_BUS_ID = f"{STANDARD_DOMAIN}/pciBusID"
ATTR_PCIE_ROOT = f"{STANDARD_DOMAIN}/pcieRoot"
ATTR_NUMA_NODE = f"{STANDARD_DOMAIN}/numaNode"
ATTR_RESOURCE = "resourceName"
# KubeVirt v1.9.0 (pkg/dra/metadata MDevUUIDAttribute) reads this key, unqualified, from the
# metadata file; it takes a device with it as a mediated device (before any pciBusID).
ATTR_MDEV_UUID = "mdevUUID"
MDEV_NAME_PREFIX = "mdev-"
MAX_DEVICES_PER_SLICE = 128  # resourceapi.ResourceSliceMaxDevices
MAX_ATTRIBUTE_VALUE = 64  # resourceapi.DeviceAttributeMaxValueLength (bytes)
POD_CLAIM_ANNOTATION = "resource.kubernetes.io/pod-claim-name"

# KEP-5304 in-container layout (k8s.io/dynamic-resource-allocation/api/metadata).
METADATA_CONTAINER_DIR = "/var/run/kubernetes.io/dra-device-attributes"
METADATA_VERSIONS = ("metadata.resource.k8s.io/v1beta1", "metadata.resource.k8s.io/v1alpha1")
METADATA_SUBDIR = "dra-device-metadata"  # under the plugin's data directory
CDI_VFIO_CLASS = "vfio"
CDI_METADATA_CLASS = "metadata"
PERMISSIONS = "rwm"
VFIO_CONTAINER = "/dev/vfio/vfio"
IOMMUFD = "/dev/iommu"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DEVICE_NAME = re.compile(r"^pci-([0-9a-f]{4})-([0-9a-f]{2})-([0-9a-f]{2})-([0-7])$")


class ClaimError(ValueError):
    """A ResourceClaim this driver must not prepare; the message says why."""


# ---- devices ----------------------------------------------------------------------------
def device_name(addr: PciAddress) -> str:
    """A DNS label, stable for the address: ``0000:3b:02.1`` -> ``pci-0000-3b-02-1``."""
    return f"pci-{addr.domain:04x}-{addr.bus:02x}-{addr.device:02x}-{addr.function:x}"


def address_of(name: str) -> PciAddress | None:
    """The PCI address a device name stands for (None: not one of ours)."""
    m = _DEVICE_NAME.match(name)
    if m is None:
        return None
    try:
        return PciAddress.parse(f"{m[1]}:{m[2]}:{m[3]}.{m[4]}")
    except PciAddressError:
        return None


def mdev_device_name(uuid: str) -> str:
    """A DNS label, stable for the instance: ``mdev-<uuid>`` (41 characters, lower case)."""
    return MDEV_NAME_PREFIX + uuid.lower()


def mdev_uuid_of(name: str) -> str | None:
    """The instance UUID a device name stands for (None: not an mdev device name)."""
    if not name.startswith(MDEV_NAME_PREFIX):
        return None
    uuid = name[len(MDEV_NAME_PREFIX) :]
    return uuid if UUID_RE.match(uuid) else None


def clip(text: str, limit: int = MAX_ATTRIBUTE_VALUE) -> str:
    """At most ``limit`` UTF-8 bytes (attribute values are measured in bytes), cut on a
    character boundary."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[:limit].decode(errors="ignore")


def string(value: str) -> dict[str, Any]:
    return {"string": clip(value)}


def integer(value: int) -> dict[str, Any]:
    return {"int": value}


@dataclass(frozen=True, slots=True)
class DraDevice:
    """One unit as a DRA device: its name and attributes (qualified name -> typed value)."""

    name: str
    resource: str
    unit: AllocUnit
    attributes: Mapping[str, Mapping[str, Any]]

    def to_api(self) -> dict[str, Any]:
        """The ``spec.devices[]`` entry of a ResourceSlice."""
        return {"name": self.name, "attributes": {k: dict(v) for k, v in self.attributes.items()}}


def unit_attributes(
    unit: AllocUnit,
    resource: str | None,
    inventory: Inventory | None,
    ids: PciIds | None = None,
) -> dict[str, dict[str, Any]]:
    """What a unit publishes (see the module docstring). ``inventory`` supplies the facts of
    the unit's first function and its PF; ``ids`` its pci.ids vendor and model names;
    ``resource`` None (no policy yet, as in ``hostdev scan``) leaves resourceName out."""
    first = unit.addresses[0]
    attrs: dict[str, dict[str, Any]] = {ATTR_PCI_BUS_ID: string(str(first))}
    if resource is not None:
        attrs[ATTR_RESOURCE] = string(resource)
    attrs["functions"] = integer(len(unit.addresses))
    if unit.group is not None:
        attrs["iommuGroup"] = integer(unit.group)
    if unit.pf is not None:
        attrs["pfPciBusID"] = string(str(unit.pf))
    if unit.numa_node is not None:
        # deviceattribute: devices without NUMA affinity must not publish numaNode.
        attrs[ATTR_NUMA_NODE] = integer(unit.numa_node)
    dev = inventory.devices.get(first) if inventory is not None else None
    if dev is not None:
        if dev.pcie_root:
            attrs[ATTR_PCIE_ROOT] = string(dev.pcie_root)
        for key, value in (
            ("vendorID", dev.vendor),
            ("deviceID", dev.device),
            ("subsystemVendorID", dev.subsystem_vendor),
            ("subsystemDeviceID", dev.subsystem_device),
            ("classCode", dev.class_code),
        ):
            if value:
                attrs[key] = string(value)
        if dev.physfn is not None:
            pf = inventory.devices.get(dev.physfn) if inventory is not None else None
            if pf is not None and pf.netdevs:
                attrs["pfNetdev"] = string(pf.netdevs[0])
            if dev.vf_index is not None:
                attrs["vfIndex"] = integer(dev.vf_index)
        if ids is not None and dev.vendor:
            vendor = ids.vendors.get(dev.vendor)
            model = ids.devices.get((dev.vendor, dev.device or ""))
            if vendor:
                attrs["vendor"] = string(vendor)
            if model:
                attrs["model"] = string(model)
    return attrs


def dra_device(
    unit: AllocUnit, resource: str, inventory: Inventory | None, ids: PciIds | None = None
) -> DraDevice:
    return DraDevice(
        device_name(unit.addresses[0]),
        resource,
        unit,
        unit_attributes(unit, resource, inventory, ids),
    )


def mdev_attributes(
    uuid: str,
    resource: str | None,
    instance: MdevInstance | None,
    parent: MdevParent | None,
) -> dict[str, dict[str, Any]]:
    """What an mdev instance publishes: resourceName, mdevUUID, its type (id and name), parent
    (name and, for a PCI parent, its address as parentPciBusID), IOMMU group and the parent's
    NUMA node. No pciBusID: the instance is no PCI function (KubeVirt would take the parent)."""
    attrs: dict[str, dict[str, Any]] = {}
    if resource is not None:
        attrs[ATTR_RESOURCE] = string(resource)
    attrs[ATTR_MDEV_UUID] = string(uuid)
    if instance is not None:
        if instance.type_id:
            attrs["mdevType"] = string(instance.type_id)
        if instance.parent:
            attrs["mdevParent"] = string(instance.parent)
        if instance.iommu_group is not None:
            attrs["iommuGroup"] = integer(instance.iommu_group)
    if parent is not None:
        t = parent.type(instance.type_id) if instance and instance.type_id else None
        if t is not None and t.name:
            attrs["mdevTypeName"] = string(t.name)
        if parent.pci is not None:
            attrs["parentPciBusID"] = string(str(parent.pci))
        if parent.numa_node is not None:
            attrs[ATTR_NUMA_NODE] = integer(parent.numa_node)
    return attrs


def mdev_dra_device(
    unit: AllocUnit,
    resource: str,
    instance: MdevInstance | None,
    parent: MdevParent | None,
) -> DraDevice:
    """An mdev instance (``unit.id`` is its UUID) as a DRA device."""
    return DraDevice(
        mdev_device_name(unit.id),
        resource,
        unit,
        mdev_attributes(unit.id, resource, instance, parent),
    )


# ---- slices -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PoolEntry:
    """A unit of the pool and whether it is offered now (healthy, not held elsewhere)."""

    device: DraDevice
    offered: bool


@dataclass(frozen=True, slots=True)
class SliceContent:
    """What one ResourceSlice of the pool lists (without pool generation and count)."""

    name: str
    devices: tuple[DraDevice, ...]

    def spec(self, node: str, generation: int, count: int) -> dict[str, Any]:
        return {
            "driver": DRIVER,
            "pool": {"name": node, "generation": generation, "resourceSliceCount": count},
            "nodeName": node,
            "devices": [d.to_api() for d in self.devices],
        }


def slice_name(node: str, index: int) -> str:
    """``<node>-pci.hostdev.io-<index>``, a DNS subdomain of at most 253 characters (a long
    node name is shortened and made unique again with a hash of it)."""
    suffix = f"-{DRIVER}-{index}"
    if len(node) + len(suffix) <= 253:
        return node + suffix
    digest = hashlib.sha256(node.encode()).hexdigest()[:10]
    keep = 253 - len(suffix) - len(digest) - 1
    return f"{node[:keep].rstrip('-.')}-{digest}{suffix}"


def plan_slices(node: str, entries: Sequence[PoolEntry]) -> tuple[SliceContent, ...]:
    """The pool's slices: entries in device-name order, cut by position among all entries
    (offered or not) into slices of at most 128, then the entries not offered left out. No
    units, no slices."""
    ordered = sorted(entries, key=lambda e: e.device.name)
    out = []
    for i in range(0, len(ordered), MAX_DEVICES_PER_SLICE):
        chunk = ordered[i : i + MAX_DEVICES_PER_SLICE]
        out.append(
            SliceContent(
                slice_name(node, i // MAX_DEVICES_PER_SLICE),
                tuple(e.device for e in chunk if e.offered),
            )
        )
    return tuple(out)


# ---- DeviceClass ------------------------------------------------------------------------
def _cel_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def device_class_selector(resource: str) -> str:
    """The CEL expression selecting the devices of ``resource``."""
    return (
        f"device.driver == {_cel_string(DRIVER)} && "
        f"device.attributes[{_cel_string(DRIVER)}].{ATTR_RESOURCE} == {_cel_string(resource)}"
    )


def device_class(
    policy: str,
    resource: str,
    *,
    labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
    owner_uid: str | None = None,
) -> dict[str, Any]:
    """The DeviceClass of a DRA policy: named after the policy, selecting its resource."""
    meta: dict[str, Any] = {"name": policy, "labels": dict(labels)}
    if annotations:
        meta["annotations"] = dict(annotations)
    if owner_uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": "hostdev.io/v1alpha1",
                "kind": "PassthroughPolicy",
                "name": policy,
                "uid": owner_uid,
            }
        ]
    return {
        "apiVersion": API_VERSION,
        "kind": "DeviceClass",
        "metadata": meta,
        "spec": {"selectors": [{"cel": {"expression": device_class_selector(resource)}}]},
    }


# ---- claims -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClaimRef:
    namespace: str
    name: str
    uid: str
    pod_claim_name: str | None = None  # set on claims made from a ResourceClaimTemplate


@dataclass(frozen=True, slots=True)
class ClaimDevice:
    """One allocation result of this driver: the request it serves and the device."""

    request: str  # as allocated: "<request>" or "<request>/<subrequest>"
    device: str
    address: PciAddress | None  # None: an mdev instance (see mdev_uuid)
    mdev_uuid: str | None = None

    @property
    def base_request(self) -> str:
        return self.request.split("/", 1)[0]


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def claim_devices(
    claim: Mapping[str, Any], *, uid: str, pool: str, driver: str = DRIVER
) -> tuple[ClaimRef, tuple[ClaimDevice, ...]]:
    """This driver's devices of an allocated claim, on this node's ``pool``.

    Refused (:class:`ClaimError`): a claim replaced since the kubelet asked (other UID), one
    not allocated, with no device of this driver, with one on another node's pool, a device
    name that is not a unit's, admin access (a VFIO group opens for one user only), or opaque
    configuration for this driver (it takes none)."""
    meta = claim.get("metadata") if isinstance(claim, Mapping) else None
    if not isinstance(meta, Mapping):
        raise ClaimError("the claim has no metadata")
    ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    where = f"claim {ns}/{name}"
    if str(meta.get("uid") or "") != uid:
        raise ClaimError(f"{where} has UID {meta.get('uid')}, not {uid}: it was replaced")
    annotations = meta.get("annotations") if isinstance(meta.get("annotations"), Mapping) else {}
    pod_claim = annotations.get(POD_CLAIM_ANNOTATION) if annotations else None
    # Present (even empty) means the upstream helper records it; only a non-empty one moves
    # the file to resourceclaimtemplates/.
    ref = ClaimRef(ns, name, uid, pod_claim if isinstance(pod_claim, str) else None)
    allocation = _get(claim, "status", "allocation")
    if not isinstance(allocation, Mapping):
        raise ClaimError(f"{where} is not allocated")
    results = _get(allocation, "devices", "results")
    if not isinstance(results, list):
        raise ClaimError(f"{where}: status.allocation.devices.results is missing or not a list")
    out: list[ClaimDevice] = []
    seen: set[str] = set()
    for i, r in enumerate(results):
        if not isinstance(r, Mapping):
            raise ClaimError(f"{where}: allocation result {i} is not an object")
        if r.get("driver") != driver:
            continue
        request, rpool, dev = r.get("request"), r.get("pool"), r.get("device")
        if not (isinstance(request, str) and isinstance(rpool, str) and isinstance(dev, str)):
            raise ClaimError(f"{where}: allocation result {i} lacks request, pool or device")
        if rpool != pool:
            raise ClaimError(
                f"{where}: device {dev} is in pool {rpool}, not this node's pool {pool}"
            )
        addr, uuid = address_of(dev), mdev_uuid_of(dev)
        if addr is None and uuid is None:
            raise ClaimError(f"{where}: {dev} is not a {driver} device name")
        if r.get("adminAccess"):
            raise ClaimError(
                f"{where}: admin access to {dev} is not supported (a VFIO group opens for one "
                "user only)"
            )
        if dev in seen:
            raise ClaimError(f"{where}: device {dev} is allocated twice")
        seen.add(dev)
        out.append(ClaimDevice(request, dev, addr, uuid))
    if not out:
        raise ClaimError(f"{where} has no {driver} device")
    for c in _get(allocation, "devices", "config") or ():
        if isinstance(c, Mapping) and _get(c, "opaque", "driver") == driver:
            raise ClaimError(f"{where}: {driver} takes no opaque configuration")
    return ref, tuple(out)


# ---- CDI --------------------------------------------------------------------------------
def cdi_kind(cls: str) -> str:
    return f"{DRIVER}/{cls}"


def cdi_id(cls: str, name: str) -> str:
    return f"{cdi_kind(cls)}={name}"


def cdi_min_version(spec: Mapping[str, Any]) -> str:
    """The lowest CDI spec version the spec's features need (the rules of specs-go v1.1.0
    ``MinimumRequiredVersion`` for the features these specs can use)."""
    devices = spec.get("devices") or []
    edits = [spec.get("containerEdits") or {}, *(d.get("containerEdits") or {} for d in devices)]
    if spec.get("annotations") or any(d.get("annotations") for d in devices):
        return "0.6.0"
    if "." in str(spec.get("kind", "")).partition("/")[2]:
        return "0.6.0"
    if any(str(d.get("name", ""))[:1].isdigit() for d in devices) or any(
        n.get("hostPath") for e in edits for n in e.get("deviceNodes") or ()
    ):
        return "0.5.0"
    if any(m.get("type") for e in edits for m in e.get("mounts") or ()):
        return "0.4.0"
    return "0.3.0"


def _with_version(
    kind: str, devices: list[dict[str, Any]], edits: dict[str, Any]
) -> dict[str, Any]:
    # Field order of specs-go Spec: cdiVersion, kind, (annotations), devices, containerEdits.
    spec: dict[str, Any] = {"cdiVersion": "", "kind": kind, "devices": devices}
    spec["containerEdits"] = edits
    spec["cdiVersion"] = cdi_min_version(spec)
    return spec


def _node(path: str) -> dict[str, Any]:
    return {"path": path, "permissions": PERMISSIONS}


@dataclass(frozen=True, slots=True)
class PreparedUnit:
    """A re-checked unit being handed to a claim."""

    device: str
    resource: str
    unit: AllocUnit
    cdevs: tuple[str, ...] = ()
    mdev: bool = False  # an mdev instance: unit.id is its UUID, unit.addresses is empty

    @property
    def group(self) -> int | None:
        return self.unit.group


def vfio_cdi_spec(
    claim_uid: str, units: Sequence[PreparedUnit], iommufd: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    """The claim's CDI spec (kind ``pci.hostdev.io/vfio``) and each device's CDI ID.

    Claim-wide edits: ``/dev/vfio/vfio`` (and ``/dev/iommu`` when present) and one
    ``PCI_RESOURCE_<NAME>`` per resource (``MDEV_PCI_RESOURCE_<NAME>`` = the UUIDs for mdev
    resources, as the device plugin's Allocate); per device: ``/dev/vfio/<group>`` and, with
    iommufd, the functions' ``/dev/vfio/devices/vfioN``."""
    devices: list[dict[str, Any]] = []
    ids: dict[str, str] = {}
    by_resource: dict[str, list[PreparedUnit]] = {}
    for u in units:
        nodes = [_node(f"/dev/vfio/{u.group}")]
        if iommufd:
            nodes += [_node(f"/dev/vfio/devices/{c}") for c in u.cdevs]
        name = f"{claim_uid}-{u.device}"
        devices.append({"name": name, "containerEdits": {"deviceNodes": nodes}})
        ids[u.device] = cdi_id(CDI_VFIO_CLASS, name)
        by_resource.setdefault(u.resource, []).append(u)
    # The device plugin's rule: every unit's primary first, then the companions.
    env = [
        f"{resource_env_var(r, MDEV_PREFIX)}=" + ",".join(u.unit.id for u in us)
        if us[0].mdev
        else f"{resource_env_var(r)}="
        + ",".join(map(str, kubevirt_addresses([u.unit for u in us])))
        for r, us in sorted(by_resource.items())
    ]
    claim_nodes = [_node(VFIO_CONTAINER)] + ([_node(IOMMUFD)] if iommufd else [])
    return _with_version(
        cdi_kind(CDI_VFIO_CLASS), devices, {"env": env, "deviceNodes": claim_nodes}
    ), ids


def vfio_cdi_file(cdi_dir: str, claim_uid: str) -> str:
    return f"{cdi_dir.rstrip('/')}/{DRIVER}_{claim_uid}.json"


# ---- KEP-5304 device metadata -----------------------------------------------------------
def metadata_host_path(plugin_data_dir: str, ref: ClaimRef, request: str) -> str:
    """``{plugin data dir}/dra-device-metadata/{ns}_{claim}/{request}/metadata.json``."""
    return (
        f"{plugin_data_dir.rstrip('/')}/{METADATA_SUBDIR}/{ref.namespace}_{ref.name}/"
        f"{request}/metadata.json"
    )


def metadata_claim_dir(plugin_data_dir: str, namespace: str, name: str) -> str:
    return f"{plugin_data_dir.rstrip('/')}/{METADATA_SUBDIR}/{namespace}_{name}"


def metadata_container_path(ref: ClaimRef, request: str) -> str:
    """Where containers read it: ``resourceclaimtemplates/<pod claim name>/...`` for claims
    made from a template, else ``resourceclaims/<claim name>/...``."""
    if ref.pod_claim_name:
        base = f"{METADATA_CONTAINER_DIR}/resourceclaimtemplates/{ref.pod_claim_name}"
    else:
        base = f"{METADATA_CONTAINER_DIR}/resourceclaims/{ref.name}"
    return f"{base}/{request}/{DRIVER}-metadata.json"


def metadata_cdi_file(cdi_dir: str, claim_uid: str, request: str) -> str:
    return f"{cdi_dir.rstrip('/')}/{DRIVER}_metadata_{claim_uid}_{request}.json"


def metadata_cdi_glob(cdi_dir: str, claim_uid: str) -> str:
    """A glob for every metadata spec of a claim (``claim_uid`` is a UID: no glob characters)."""
    return f"{cdi_dir.rstrip('/')}/{DRIVER}_metadata_{claim_uid}_*.json"


@dataclass(frozen=True, slots=True)
class MetadataDevice:
    pool: str
    name: str
    attributes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


_ATTRIBUTE_FIELDS = ("int", "bool", "string", "version", "ints", "bools", "strings", "versions")


def qualified(attributes: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Attribute names with their domain: in a slice an unqualified name is in the driver's
    domain, a metadata file read on its own should not need that context."""
    out = {(k if "/" in k else f"{DRIVER}/{k}"): v for k, v in attributes.items()}
    if ATTR_MDEV_UUID in attributes:
        out[ATTR_MDEV_UUID] = attributes[ATTR_MDEV_UUID]  # as KubeVirt reads it: unqualified
    return out


def metadata_object(
    ref: ClaimRef,
    request: str,
    devices: Sequence[MetadataDevice],
    api_version: str,
    generation: int = 1,
) -> dict[str, Any]:
    """One ``DeviceMetadata`` object, keys in the Go types' field order."""
    meta: dict[str, Any] = {"name": ref.name}
    if ref.namespace:
        meta["namespace"] = ref.namespace
    if ref.uid:
        meta["uid"] = ref.uid
    if generation:
        meta["generation"] = generation
    obj: dict[str, Any] = {"kind": "DeviceMetadata", "apiVersion": api_version, "metadata": meta}
    if ref.pod_claim_name is not None:
        obj["podClaimName"] = ref.pod_claim_name
    devs = []
    for d in devices:
        entry: dict[str, Any] = {"driver": DRIVER, "pool": d.pool, "name": d.name}
        if d.attributes:
            entry["attributes"] = sorted_map(
                {k: {f: v[f] for f in _ATTRIBUTE_FIELDS if f in v} for k, v in d.attributes.items()}
            )
        devs.append(entry)
    req: dict[str, Any] = {"name": request}
    if devs:
        req["devices"] = devs
    obj["requests"] = [req]
    return obj


def metadata_stream(
    ref: ClaimRef,
    request: str,
    devices: Sequence[MetadataDevice],
    versions: Sequence[str] = METADATA_VERSIONS,
) -> bytes:
    """The metadata file: the object once per API version, newest first, each followed by a
    newline. KubeVirt v1.9.0 decodes only v1alpha1 and the v0.37 helper needs v1beta1, so both
    are written."""
    return "".join(
        marshal_indent(metadata_object(ref, request, devices, v)) + "\n" for v in versions
    ).encode()


def metadata_cdi_spec(ref: ClaimRef, request: str, host_path: str) -> tuple[dict[str, Any], str]:
    """The spec bind-mounting one request's metadata file read-only, and its CDI ID."""
    name = f"{ref.uid}_{request}"
    device = {
        "name": name,
        "containerEdits": {
            "mounts": [
                {
                    "hostPath": host_path,
                    "containerPath": metadata_container_path(ref, request),
                    "options": ["ro", "bind"],
                }
            ]
        },
    }
    return _with_version(cdi_kind(CDI_METADATA_CLASS), [device], {}), cdi_id(
        CDI_METADATA_CLASS, name
    )


def cdi_bytes(spec: Mapping[str, Any]) -> bytes:
    """A CDI spec file as the Go helper writes it (``json.MarshalIndent``, no newline)."""
    return marshal_indent(spec).encode()


def valid_dns_label(text: str) -> bool:
    return bool(_DNS_LABEL.match(text))
