"""Names derived from a resource name: the KubeVirt env var, the plugin socket, CDI names. Pure."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

PCI_PREFIX = "PCI_RESOURCE"
MDEV_PREFIX = "MDEV_PCI_RESOURCE"

# An extended resource name as the kubelet accepts it: `<DNS-1123 subdomain>/<name>`, the name
# being a qualified-name part (alphanumerics, '-', '_', '.', starting and ending alphanumeric).
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_NAME = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_SOCKET_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class ResourceNameError(ValueError):
    """Not a name the kubelet would accept as an extended resource."""


def validate_resource_name(name: str) -> str:
    """Return ``name`` if it is a domain-qualified extended resource name, else raise."""
    domain, sep, rest = name.partition("/")
    if not sep or not _DOMAIN.match(domain) or not _NAME.match(rest):
        raise ResourceNameError(
            f"invalid resource name {name!r}: expected <dns-subdomain>/<name>, "
            "e.g. example.com/e810_vf (lower-case domain; name of letters, digits, '-', '_', '.')"
        )
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
        raise ResourceNameError(f"invalid resource name {name!r}: kubernetes.io is reserved")
    return name


def resource_env_var(resource_name: str, prefix: str = PCI_PREFIX) -> str:
    """KubeVirt's ResourceNameToEnvVar: upper-case; only '/' and '.' become '_' ('-' stays)."""
    return f"{prefix}_" + resource_name.upper().replace("/", "_").replace(".", "_")


@dataclass(frozen=True, slots=True)
class EnvCollision:
    """Two different resource names that KubeVirt reads from one environment variable: inside
    a pod holding both, the kubelet keeps one value and the VM gets the wrong devices (or
    none). ``first`` keeps the name (it came first: precedence, or file order); ``second`` is
    refused."""

    first: str
    second: str

    @property
    def env_var(self) -> str:
        return resource_env_var(self.first)

    @property
    def message(self) -> str:
        suffix = self.env_var.removeprefix(PCI_PREFIX)
        return (
            f"resource names {self.first} and {self.second} both become {self.env_var} "
            f"({MDEV_PREFIX}{suffix} for mediated devices), the variable KubeVirt reads the "
            "addresses from ('.' and '/' become '_', letters upper-case), so a pod holding both "
            f"would see one value: {self.second} is refused, rename it"
        )


def env_collisions(names: Iterable[str]) -> list[EnvCollision]:
    """Each name whose KubeVirt env var an earlier, different name already has (in ``names``
    order, so callers pass names in precedence order). The same name twice is no collision.
    ``MDEV_PCI_RESOURCE_`` follows the same rule as ``PCI_RESOURCE_``: one check covers both."""
    owner: dict[str, str] = {}
    out: list[EnvCollision] = []
    for name in names:
        first = owner.setdefault(resource_env_var(name), name)
        if first != name:
            out.append(EnvCollision(first, name))
    return out


# Between the resource part and the generation of a later socket: never in the resource part
# (it keeps only [A-Za-z0-9_.-]), so one resource's later socket is never another's first.
_GENERATION_SEP = "~"


def socket_name(resource_name: str, generation: int = 1) -> str:
    """The plugin's socket file in the kubelet's device-plugin directory. Generation 1 is the
    plain name; a later one (``hostdev-<name>~2.sock``, ...) is used when the kubelet still
    holds a stale endpoint at the earlier path and refuses to register it again."""
    if generation < 1:
        raise ValueError(f"socket generation {generation} < 1")
    suffix = f"{_GENERATION_SEP}{generation}" if generation > 1 else ""
    return "hostdev-" + _SOCKET_UNSAFE.sub("_", resource_name) + suffix + ".sock"


def socket_generation(resource_name: str, file_name: str) -> int | None:
    """Which generation of ``resource_name``'s socket ``file_name`` is (see :func:`socket_name`),
    or None if it is not one of them."""
    stem = socket_name(resource_name).removesuffix(".sock")
    if file_name == stem + ".sock":
        return 1
    rest = file_name.removeprefix(stem + _GENERATION_SEP)
    if rest == file_name or not rest.endswith(".sock"):
        return None
    digits = rest.removesuffix(".sock")
    if not digits.isascii() or not digits.isdigit() or digits.startswith("0"):
        return None
    generation = int(digits)
    return generation if generation > 1 else None
