"""What the node agent serves: resource names and the selectors choosing their devices.

For now from a YAML file (``--config``); the NodeState-driven mode hands the same
:class:`ResourceConfig` values to :meth:`PluginManager.apply`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hostdev.policy.allocation import Strategy
from hostdev.policy.frontends import DEVICE_PLUGIN, DRA, Allocation
from hostdev.policy.naming import ResourceNameError, env_collisions, validate_resource_name
from hostdev.policy.selector import DeviceSelector, SelectorError

if TYPE_CHECKING:
    from hostdev.policy.mdev import MdevSpec

_STRATEGIES = ("spread", "pack")


class ConfigError(ValueError):
    """A config file the agent cannot use; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class ResourceConfig:
    resource_name: str
    selector: DeviceSelector
    strategy: Strategy = "spread"
    # Which kubelet front end serves it (DRA only in cluster mode, from the NodeState spec).
    allocation: Allocation = DEVICE_PLUGIN
    # Mediated devices: instances the agent creates and serves (the selector is then unused).
    mdev: MdevSpec | None = None

    @property
    def dra(self) -> bool:
        return self.allocation == DRA


def parse_resources(data: Any, source: str = "config") -> tuple[ResourceConfig, ...]:
    """``[{resourceName, selector: {...}, strategy?}]`` (or ``{resources: [...]}``); a
    mediated-device resource has ``mdev: {type, count, parents?, placement?}`` instead of a
    selector."""
    if isinstance(data, dict) and "resources" in data:
        data = data["resources"]
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(f"{source}: expected a list of resources (or {{resources: [...]}})")
    out: list[ResourceConfig] = []
    seen: set[str] = set()
    for i, entry in enumerate(data):
        where = f"{source}: resources[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with resourceName and selector")
        unknown = set(entry) - {"resourceName", "selector", "strategy", "mdev"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        name = entry.get("resourceName")
        if not isinstance(name, str):
            raise ConfigError(f"{where}: resourceName (string) is required")
        mdev = None
        try:
            validate_resource_name(name)
            selector = DeviceSelector.from_dict(entry.get("selector") or {})
        except (ResourceNameError, SelectorError) as e:
            raise ConfigError(f"{where} ({name}): {e}") from None
        if "mdev" in entry:
            mdev = _mdev_spec(entry["mdev"], f"{where} ({name})")
        if mdev is not None and not selector.empty:
            raise ConfigError(
                f"{where} ({name}): give either selector (PCI functions) or mdev (mediated "
                "devices), not both"
            )
        if mdev is None and selector.empty:
            raise ConfigError(f"{where} ({name}): the selector is empty and would match nothing")
        strategy = entry.get("strategy", "spread")
        if strategy not in _STRATEGIES:
            raise ConfigError(f"{where} ({name}): strategy must be one of {_STRATEGIES}")
        if name in seen:
            raise ConfigError(f"{where}: resource {name} is listed twice")
        seen.add(name)
        out.append(
            ResourceConfig(name, selector, "pack" if strategy == "pack" else "spread", mdev=mdev)
        )
    for c in env_collisions(r.resource_name for r in out):
        i = next(i for i, r in enumerate(out) if r.resource_name == c.second)
        raise ConfigError(f"{source}: resources[{i}]: {c.message}")
    return tuple(out)


def _mdev_spec(raw: Any, where: str) -> MdevSpec:
    # Imported here: the mdev model is not needed to serve PCI functions (the agent's start).
    from hostdev.policy.mdev import MdevSpec, MdevSpecError

    try:
        return MdevSpec.from_dict(raw)
    except MdevSpecError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_resources_file(path: str | os.PathLike[str]) -> tuple[ResourceConfig, ...]:
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    import yaml  # only here: the cluster mode never reads a resource file

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return parse_resources(data, p)


def by_name(resources: Sequence[ResourceConfig]) -> dict[str, ResourceConfig]:
    return {r.resource_name: r for r in resources}
