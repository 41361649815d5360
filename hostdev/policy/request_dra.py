"""PassthroughRequest entries served through DRA: the claim a VM gets for them. Pure.

A request with entries of DRA resources gets one ResourceClaimTemplate (named after the request,
in its namespace, owned by it) with one request per VM entry (``<entry>-<n>``, exactly one
device of the resource's DeviceClass: KubeVirt 1.9 takes one device per request, and no
``firstAvailable`` subrequests, whose metadata path KubeVirt does not find). The VM names the
template in ``spec.template.spec.resourceClaims`` under :func:`pod_claim_name`; each entry names
that claim and its request. A pinned entry selects its unit by the standard pciBusID attribute
(the unit's first function) and the VM is pinned to the node as for device-plugin entries.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hostdev.host.address import PciAddress, PciAddressError, parse_or_none
from hostdev.policy.allocation import build_units
from hostdev.policy.dra import API_VERSION, ATTR_PCI_BUS_ID, STANDARD_DOMAIN
from hostdev.policy.reported import ReportedNode

if TYPE_CHECKING:
    from hostdev.policy.request import VmDevice

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
OWNER_KIND = ("hostdev.io/v1alpha1", "PassthroughRequest")


def pod_claim_name(request: str) -> str:
    """The VM's resourceClaims[].name for the request (a DNS label): the request's name when
    it is one, else a stable hash of it."""
    if _DNS_LABEL.match(request):
        return request
    return "hostdev-" + hashlib.sha256(request.encode()).hexdigest()[:16]


def template_name(request: str) -> str:
    return request


def dra_request_name(entry: str, index: int) -> str:
    return f"{entry}-{index}"


def pinned_unit_address(rep: ReportedNode | None, resource: str, address: str | None) -> str | None:
    """The first function of the unit holding ``address`` on the reported node (the unit's
    pciBusID attribute), or ``address`` itself when the report does not tell."""
    if address is None or rep is None or rep.inventory is None:
        return address
    try:
        wanted = PciAddress.parse(address)
    except PciAddressError:
        return address
    inv = rep.inventory
    members = [
        inv.devices[a]
        for a in (parse_or_none(x) for x in rep.resources.get(resource, ()))
        if a is not None and a in inv.devices
    ]
    for u in build_units(members):
        if wanted in u.addresses:
            return str(u.addresses[0])
    return address


def claim_entry_conflict(
    claims: Iterable[Mapping[str, Any]] | None, name: str, ours: str | None
) -> str | None:
    """Why the VM cannot take our resourceClaims entry ``name`` (someone else's has it)."""
    for c in claims or ():
        if c.get("name") == name and ours != name:
            return (
                f"already has a resourceClaims entry named {name} that this request did not "
                "add; rename the request"
            )
    return None


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def claim_template(
    namespace: str,
    request: str,
    owner_uid: str | None,
    devices: Sequence[VmDevice],
    labels: Mapping[str, str],
) -> dict[str, Any]:
    """The ResourceClaimTemplate for the request's DRA entries."""
    requests = []
    for d in devices:
        if not d.dra:
            continue
        exactly: dict[str, Any] = {
            "deviceClassName": d.device_class,
            "allocationMode": "ExactCount",
            "count": 1,
        }
        if d.pci_address:
            exactly["selectors"] = [
                {
                    "cel": {
                        "expression": (
                            f"device.attributes[{_quote(STANDARD_DOMAIN)}]."
                            f"{ATTR_PCI_BUS_ID.split('/', 1)[1]} == {_quote(d.pci_address)}"
                        )
                    }
                }
            ]
        requests.append({"name": d.request_name, "exactly": exactly})
    meta: dict[str, Any] = {
        "name": template_name(request),
        "namespace": namespace,
        "labels": dict(labels),
    }
    if owner_uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": OWNER_KIND[0],
                "kind": OWNER_KIND[1],
                "name": request,
                "uid": owner_uid,
                "controller": True,
            }
        ]
    return {
        "apiVersion": API_VERSION,
        "kind": "ResourceClaimTemplate",
        "metadata": meta,
        "spec": {"spec": {"devices": {"requests": requests}}},
    }


def owned_by(obj: Mapping[str, Any], request: str, uid: str | None) -> bool:
    """Whether a template is this request's (its controller ownerReference)."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or ():
        if (
            ref.get("kind") == OWNER_KIND[1]
            and ref.get("name") == request
            and (not uid or ref.get("uid") == uid)
        ):
            return True
    return False
