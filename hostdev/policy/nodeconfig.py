"""A node's desired passthrough configuration. Pure: parsing, validation, selector resolution.

The same shape is the ``spec`` of a ``PassthroughNodeState`` (rendered by the operator) and the
body of a local ``node.yaml`` for clusterless use (``hostdev apply --config node.yaml``)::

    spec:                          # or these keys at the top level
      pfs:                         # SR-IOV: how many VFs each PF should have
        - pciAddress: 0000:3b:00.0 # or pfName: ens1f0 (the PF's netdev)
          numVfs: 4
      devices:                     # which function goes on which driver, for which resource
        - pciAddress: 0000:3b:00.2
          driver: vfio-pci         # the default
          resourceName: example.com/nic-vf
        - selector: {vendors: ["1b36"], pfNames: ["0000:3b:00.0#0-3"]}
          resourceName: example.com/nvme-vf
        - pciAddress: 0000:00:1f.6
          driver: e1000e           # pinned to a host driver: never moved, and its group
                                   # companions are never moved to vfio-pci either
        - selector: {classes: ["0302"]}
          resourceName: example.com/gpu
          allocation: DRA          # served as DRA devices (ResourceSlices), not a device plugin
      # allowUnsafe: true on a pf/device entry overrides the safety guards for it (off by default)
      mdevs:                       # mediated devices: instances the agent creates and serves
        - resourceName: example.com/mtty
          type: mtty-2             # type id, or the type's name
          count: 4
          parents: ["mtty"]        # optional: parent names or shell patterns
          placement: spread        # or pack
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hostdev.host.address import PciAddress, PciAddressError
from hostdev.host.model import Inventory, is_vfio_driver
from hostdev.policy.frontends import ALLOCATIONS, DEVICE_PLUGIN, DRA, Allocation
from hostdev.policy.naming import env_collisions
from hostdev.policy.selector import DeviceSelector, SelectorError

if TYPE_CHECKING:
    from hostdev.policy.mdev import MdevSpec

DEFAULT_DRIVER = "vfio-pci"
# Kernel driver names: what /sys/bus/pci/drivers/<name> can be (no '/', no spaces).
_DRIVER = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_RESOURCE = re.compile(
    r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_PF_KEYS = {"pciAddress", "pfName", "numVfs", "allowUnsafe"}
_DEV_KEYS = {"pciAddress", "selector", "driver", "resourceName", "allowUnsafe", "allocation"}


class NodeConfigError(ValueError):
    """A desired state that cannot be applied as written; the message names the field."""


@dataclass(frozen=True, slots=True)
class PfConfig:
    """``numVfs`` for one PF, named by PCI address or by its netdev name."""

    num_vfs: int
    address: PciAddress | None = None
    name: str | None = None
    allow_unsafe: bool = False

    @property
    def label(self) -> str:
        return str(self.address) if self.address is not None else f"pf {self.name}"


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """One function: the driver it must be on and the resource it belongs to."""

    address: PciAddress
    driver: str = DEFAULT_DRIVER
    resource_name: str | None = None
    allow_unsafe: bool = False
    allocation: Allocation = DEVICE_PLUGIN

    @property
    def wants_vfio(self) -> bool:
        return is_vfio_driver(self.driver)


@dataclass(frozen=True, slots=True)
class DeviceRule:
    """Selector form of :class:`DeviceConfig`, resolved against the inventory at plan time
    (VFs that do not exist yet match once they do)."""

    selector: DeviceSelector
    driver: str = DEFAULT_DRIVER
    resource_name: str | None = None
    allow_unsafe: bool = False
    allocation: Allocation = DEVICE_PLUGIN


@dataclass(frozen=True, slots=True)
class NodeConfig:
    pfs: tuple[PfConfig, ...] = ()
    devices: tuple[DeviceConfig, ...] = ()
    rules: tuple[DeviceRule, ...] = ()
    mdevs: tuple[tuple[str, MdevSpec], ...] = ()  # (resourceName, what to keep of it)
    mdev_dra: frozenset[str] = frozenset()  # the mdev resources served through DRA

    @staticmethod
    def from_dict(data: Any) -> NodeConfig:
        """From a ``PassthroughNodeState`` object, its ``spec``, or a node.yaml document."""
        return parse_node_config(data)

    def allocations(self) -> dict[str, Allocation]:
        """resource -> how it is served (parsing made sure each resource has one way)."""
        out: dict[str, Allocation] = {}
        for e in self.devices:
            if e.resource_name is not None:
                out[e.resource_name] = e.allocation
        for r in self.rules:
            if r.resource_name is not None:
                out[r.resource_name] = r.allocation
        for name, _ in self.mdevs:
            out[name] = DRA if name in self.mdev_dra else DEVICE_PLUGIN
        return out

    def dra_resources(self) -> frozenset[str]:
        return frozenset(r for r, a in self.allocations().items() if a == DRA)


@dataclass(frozen=True, slots=True)
class Resolved:
    """The concrete per-device wishes for one inventory, and the contradictions found."""

    devices: Mapping[PciAddress, DeviceConfig]
    conflicts: tuple[tuple[PciAddress, str], ...]


def _bool(value: Any, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise NodeConfigError(f"{where}: must be true or false, got {value!r}")
    return value


def _addr(value: Any, where: str) -> PciAddress:
    if not isinstance(value, str):
        raise NodeConfigError(
            f"{where}: must be a string like 0000:3b:00.0, got {value!r} (quote it in YAML)"
        )
    try:
        return PciAddress.parse(value.strip())
    except PciAddressError as e:
        raise NodeConfigError(f"{where}: {e}") from None


def _driver(value: Any, where: str) -> str:
    if value is None:
        return DEFAULT_DRIVER
    if not isinstance(value, str) or not _DRIVER.match(value):
        raise NodeConfigError(f"{where}: not a kernel driver name: {value!r}")
    return value


def _resource(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _RESOURCE.match(value):
        raise NodeConfigError(
            f"{where}: resourceName must look like vendor.example/name, got {value!r}"
        )
    return value


def _allocation(value: Any, resource: str | None, where: str) -> Allocation:
    if value is None:
        return DEVICE_PLUGIN
    if value not in ALLOCATIONS:
        raise NodeConfigError(f"{where}: allocation must be DevicePlugin or DRA, got {value!r}")
    if resource is None and value == DRA:
        raise NodeConfigError(f"{where}: allocation DRA needs a resourceName to serve")
    return DRA if value == DRA else DEVICE_PLUGIN


def _list(spec: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = spec.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise NodeConfigError(f"{key}: must be a list")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise NodeConfigError(f"{key}[{i}]: must be a mapping")
    return value


def _unknown(item: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = set(item) - allowed
    if extra:
        raise NodeConfigError(
            f"{where}: unknown field(s) {sorted(extra)}; allowed: {sorted(allowed)}"
        )


def parse_node_config(data: Any) -> NodeConfig:
    if data is None:
        return NodeConfig()
    if not isinstance(data, Mapping):
        raise NodeConfigError("the desired state must be a mapping (a node.yaml document)")
    kind = data.get("kind")
    if kind is not None and kind != "PassthroughNodeState":
        raise NodeConfigError(f"kind {kind!r}: expected PassthroughNodeState or a bare spec")
    spec = data.get("spec", data) if ("spec" in data or kind is not None) else data
    if spec is None:
        return NodeConfig()
    if not isinstance(spec, Mapping):
        raise NodeConfigError("spec: must be a mapping")
    _unknown(
        {k: v for k, v in spec.items() if k not in {"apiVersion", "kind", "metadata"}},
        {"pfs", "devices", "mdevs"},
        "spec",
    )

    pfs: list[PfConfig] = []
    seen_pf: set[str] = set()
    for i, item in enumerate(_list(spec, "pfs")):
        where = f"pfs[{i}]"
        _unknown(item, _PF_KEYS, where)
        n = item.get("numVfs")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise NodeConfigError(f"{where}.numVfs: must be a non-negative integer, got {n!r}")
        has_addr, has_name = item.get("pciAddress") is not None, item.get("pfName") is not None
        if has_addr == has_name:
            raise NodeConfigError(f"{where}: give exactly one of pciAddress or pfName")
        address = _addr(item["pciAddress"], f"{where}.pciAddress") if has_addr else None
        name = item.get("pfName")
        if has_name and (not isinstance(name, str) or not name.strip()):
            raise NodeConfigError(f"{where}.pfName: must be a netdev name, got {name!r}")
        key = str(address) if address is not None else str(name)
        if key in seen_pf:
            raise NodeConfigError(f"{where}: PF {key} is listed twice")
        seen_pf.add(key)
        pfs.append(
            PfConfig(n, address, name, _bool(item.get("allowUnsafe"), f"{where}.allowUnsafe"))
        )

    devices: list[DeviceConfig] = []
    rules: list[DeviceRule] = []
    seen_dev: set[PciAddress] = set()
    modes: dict[str, tuple[Allocation, str]] = {}  # resource -> (allocation, first entry)
    named: list[tuple[int, str]] = []  # (entry index, resourceName)
    for i, item in enumerate(_list(spec, "devices")):
        where = f"devices[{i}]"
        _unknown(item, _DEV_KEYS, where)
        driver = _driver(item.get("driver"), f"{where}.driver")
        resource = _resource(item.get("resourceName"), f"{where}.resourceName")
        if resource is not None:
            named.append((i, resource))
        unsafe = _bool(item.get("allowUnsafe"), f"{where}.allowUnsafe")
        mode = _allocation(item.get("allocation"), resource, f"{where}.allocation")
        if resource is not None:
            first = modes.setdefault(resource, (mode, where))
            if first[0] != mode:
                raise NodeConfigError(
                    f"{where}: resource {resource} is allocated by {mode} here but by "
                    f"{first[0]} in {first[1]}; a resource is served one way on a node"
                )
        has_addr, has_sel = item.get("pciAddress") is not None, item.get("selector") is not None
        if has_addr == has_sel:
            raise NodeConfigError(f"{where}: give exactly one of pciAddress or selector")
        if has_addr:
            address = _addr(item["pciAddress"], f"{where}.pciAddress")
            if address in seen_dev:
                raise NodeConfigError(f"{where}: device {address} is listed twice")
            seen_dev.add(address)
            devices.append(DeviceConfig(address, driver, resource, unsafe, mode))
        else:
            sel = item["selector"]
            if not isinstance(sel, Mapping):
                raise NodeConfigError(f"{where}.selector: must be a mapping")
            try:
                selector = DeviceSelector.from_dict(sel)
            except SelectorError as e:
                raise NodeConfigError(f"{where}.selector: {e}") from None
            if selector.empty:
                raise NodeConfigError(f"{where}.selector: empty selector matches nothing")
            rules.append(DeviceRule(selector, driver, resource, unsafe, mode))
    mdevs, mdev_dra = _mdevs(spec, {name for _, name in named})
    for c in env_collisions([*(name for _, name in named), *(name for name, _ in mdevs)]):
        at = next((f"devices[{i}]" for i, name in named if name == c.second), None)
        if at is None:
            at = next(f"mdevs[{i}]" for i, (name, _) in enumerate(mdevs) if name == c.second)
        raise NodeConfigError(f"{at}.resourceName: {c.message}")
    by_address = {d.address: (i, d) for i, d in enumerate(devices)}
    for i, pf in enumerate(pfs):
        hit = by_address.get(pf.address) if pf.address is not None else None
        why = contradiction(pf, hit[1]) if hit is not None else None
        if hit is not None and why is not None:
            raise NodeConfigError(f"pfs[{i}] and devices[{hit[0]}] ({pf.address}): {why}")
    return NodeConfig(tuple(pfs), tuple(devices), tuple(rules), mdevs, mdev_dra)


def _mdevs(
    spec: Mapping[str, Any], pci_resources: set[str]
) -> tuple[tuple[tuple[str, MdevSpec], ...], frozenset[str]]:
    out: list[tuple[str, MdevSpec]] = []
    dra: set[str] = set()
    items = _list(spec, "mdevs")
    if not items:
        return (), frozenset()
    # Imported here: the node agent parses this at start, and most nodes have no mdevs.
    from hostdev.policy.mdev import MdevSpec, MdevSpecError

    for i, item in enumerate(items):
        where = f"mdevs[{i}]"
        resource = _resource(item.get("resourceName"), f"{where}.resourceName")
        if resource is None:
            raise NodeConfigError(f"{where}.resourceName: required")
        if resource in pci_resources:
            raise NodeConfigError(
                f"{where}: resource {resource} also serves PCI functions (devices); a resource "
                "is either PCI functions or mediated-device instances"
            )
        if any(resource == name for name, _ in out):
            raise NodeConfigError(f"{where}: resource {resource} is listed twice")
        if _allocation(item.get("allocation"), resource, f"{where}.allocation") == DRA:
            dra.add(resource)
        try:
            out.append(
                (
                    resource,
                    MdevSpec.from_dict(
                        {k: v for k, v in item.items() if k not in ("resourceName", "allocation")}
                    ),
                )
            )
        except MdevSpecError as e:
            raise NodeConfigError(f"{where}: {e}") from None
    return tuple(out), frozenset(dra)


def contradiction(pf: PfConfig, wish: DeviceConfig) -> str | None:
    """Why a PF cannot be both on ``wish.driver`` and have ``pf.num_vfs`` VFs (None: it can)."""
    if not pf.num_vfs or not wish.wants_vfio:
        return None
    return (
        f"contradiction: the PF is wanted on {wish.driver} and with numVfs {pf.num_vfs}; a PF on "
        f"{wish.driver} has no host driver to make VFs, and moving it there destroys the VFs it "
        "has. Assign its VFs instead (drop the PF from devices), or set numVfs: 0"
    )


def resolve_devices(config: NodeConfig, inventory: Inventory) -> Resolved:
    """Concrete wishes per address: explicit entries win over selector rules; two rules that
    claim one device with different wishes are a conflict for that device."""
    out: dict[PciAddress, DeviceConfig] = {d.address: d for d in config.devices}
    conflicts: list[tuple[PciAddress, str]] = []
    by_rule: dict[PciAddress, DeviceConfig] = {}
    bad: set[PciAddress] = set()
    for rule in config.rules:
        for addr, dev in inventory.devices.items():
            if addr in out or dev.is_bridge or not rule.selector.matches(dev, inventory):
                continue
            want = DeviceConfig(
                addr, rule.driver, rule.resource_name, rule.allow_unsafe, rule.allocation
            )
            prev = by_rule.get(addr)
            if prev is not None and prev != want:
                if addr not in bad:
                    conflicts.append(
                        (
                            addr,
                            f"selected by two rules with different wishes (driver "
                            f"{prev.driver}/{want.driver}, resource {prev.resource_name}/"
                            f"{want.resource_name}); list it explicitly by pciAddress",
                        )
                    )
                bad.add(addr)
                continue
            by_rule[addr] = want
    for addr, want in by_rule.items():
        if addr not in bad:
            out[addr] = want
    return Resolved(dict(sorted(out.items())), tuple(conflicts))


def served_now(config: NodeConfig, inventory: Inventory) -> dict[str, tuple[PciAddress, ...]]:
    """resource -> the present, unconflicted devices the config gives it (sorted): what the
    device plugins can serve from the host as it is, before anything is applied."""
    resolved = resolve_devices(config, inventory)
    conflicted = {a for a, _ in resolved.conflicts}
    out: dict[str, list[PciAddress]] = {}
    for addr, want in resolved.devices.items():
        if want.resource_name and addr not in conflicted and addr in inventory.devices:
            out.setdefault(want.resource_name, []).append(addr)
    return {name: tuple(sorted(addrs)) for name, addrs in sorted(out.items())}
