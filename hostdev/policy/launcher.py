"""KubeVirt's virt-launcher pods: which VirtualMachineInstance a pod runs. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# KubeVirt's virt-launcher pods: label kubevirt.io=virt-launcher, controller ownerReference to
# the VirtualMachineInstance, annotation kubevirt.io/domain=<vmi name>. vm.kubevirt.io/name is
# only a convention of VM templates (not set by KubeVirt itself): last resort.
LAUNCHER_LABEL = ("kubevirt.io", "virt-launcher")
DOMAIN_ANNOTATION = "kubevirt.io/domain"
TEMPLATE_VM_LABEL = "vm.kubevirt.io/name"


def vmi_of_pod(meta: Mapping[str, Any]) -> str | None:
    """The VirtualMachineInstance a pod runs, from its metadata (None: not a VM's pod)."""
    for ref in meta.get("ownerReferences") or meta.get("owner_references") or ():
        if not isinstance(ref, Mapping):
            continue
        api = str(ref.get("apiVersion") or ref.get("api_version") or "")
        if ref.get("kind") == "VirtualMachineInstance" and api.startswith("kubevirt.io/"):
            name = ref.get("name")
            if isinstance(name, str) and name:
                return name
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    if labels.get(LAUNCHER_LABEL[0]) == LAUNCHER_LABEL[1]:
        domain = annotations.get(DOMAIN_ANNOTATION)
        if isinstance(domain, str) and domain:
            return domain
    name = labels.get(TEMPLATE_VM_LABEL)
    return name if isinstance(name, str) and name else None
