"""Names derived from a resource name: the KubeVirt env var, the plugin socket, CDI names. Pure."""

from __future__ import annotations

import re

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


def socket_name(resource_name: str) -> str:
    """The plugin's socket file in the kubelet's device-plugin directory."""
    return "hostdev-" + _SOCKET_UNSAFE.sub("_", resource_name) + ".sock"
