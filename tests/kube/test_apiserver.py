"""The real-API-server tier itself: control plane up, KubeVirt's real schemas enforced, identities.

The schema assertions double as a record of what KubeVirt v1.9.0 accepts for host devices, which
the operator's VM and KubeVirt CR patches must satisfy.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client import ApiException
from kubernetes.dynamic.exceptions import InternalServerError, UnprocessibleEntityError

from tests.fixtures.kube import Cluster, kubevirt_crds, project_crds, wait_allowed

pytestmark = pytest.mark.kube


def _vm(name: str, host_devices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {
            "runStrategy": "Halted",
            "template": {
                "spec": {
                    "domain": {
                        "devices": {"hostDevices": host_devices},
                        "resources": {"requests": {"memory": "1Gi"}},
                    }
                }
            },
        },
    }


def _status_message(err: ApiException) -> str:
    message: str = json.loads(err.body or "{}")["message"]
    return message


def test_apiserver_ready_and_kubevirt_crds_established(kube_apiserver: Cluster) -> None:
    version = k8s.VersionApi(kube_apiserver.admin).get_code()
    assert version.major == "1"
    ext = k8s.ApiextensionsV1Api(kube_apiserver.admin)
    expected = {c["metadata"]["name"] for c in [*kubevirt_crds(), *project_crds()]}
    assert {
        "kubevirts.kubevirt.io",
        "virtualmachines.kubevirt.io",
        "virtualmachineinstances.kubevirt.io",
    } <= expected
    for name in sorted(expected):
        crd = ext.read_custom_resource_definition(name)
        assert crd.status is not None
        conditions = {c.type: c.status for c in crd.status.conditions or []}
        assert conditions.get("Established") == "True", name
    vm = ext.read_custom_resource_definition("virtualmachines.kubevirt.io")
    assert vm.spec.scope == "Namespaced"
    assert vm.spec.names.short_names == ["vm", "vms"]
    assert [v.name for v in vm.spec.versions if v.storage] == ["v1"]


def test_vm_with_host_devices_accepted(kube_apiserver: Cluster, kube_namespace: str) -> None:
    devices = [
        {"name": "nic1", "deviceName": "hostdev.io/intel-x710-vf"},
        {"name": "gpu1", "deviceName": "hostdev.io/nvidia-a100", "tag": "gpu"},
    ]
    [vm] = kube_apiserver.apply(_vm("good-vm", devices), kube_namespace)
    stored = vm["spec"]["template"]["spec"]["domain"]["devices"]["hostDevices"]
    assert stored == devices


# KubeVirt's schema also has CEL rules (x-kubernetes-validations); on an object that fails the
# structural schema the server skips them and says so in a second cause.
_CEL_SKIPPED = (
    "<nil>: Invalid value: null: some validation rules were not checked because the object "
    "was invalid; correct the existing errors to complete validation"
)
_HOSTDEV0 = "spec.template.spec.domain.devices.hostDevices[0]"


@pytest.mark.parametrize(
    ("entry", "cause"),
    [
        pytest.param(
            {"deviceName": "hostdev.io/intel-x710-vf"},
            f"{_HOSTDEV0}.name: Required value",
            id="missing-name",
        ),
        pytest.param(
            {"name": "nic1", "deviceName": 710},
            f'{_HOSTDEV0}.deviceName: Invalid value: "integer": '
            f'{_HOSTDEV0}.deviceName in body must be of type string: "integer"',
            id="deviceName-not-a-string",
        ),
    ],
)
def test_vm_with_invalid_host_device_refused(
    kube_apiserver: Cluster, kube_namespace: str, entry: dict[str, Any], cause: str
) -> None:
    vms = kube_apiserver.resource("kubevirt.io/v1", "VirtualMachine")
    with pytest.raises(UnprocessibleEntityError) as err:
        vms.create(body=_vm("bad-vm", [entry]), namespace=kube_namespace)
    assert _status_message(err.value) == (
        f'VirtualMachine.kubevirt.io "bad-vm" is invalid: [{cause}, {_CEL_SKIPPED}]'
    )


def test_server_side_apply_of_wrong_type_fails_before_validation(
    kube_apiserver: Cluster, kube_namespace: str
) -> None:
    """Server-side apply (what the operator's patches use) turns a type error into a 500 from
    building the typed patch, not a 422 from schema validation: callers must not rely on
    "422 means invalid" for apply patches."""
    with pytest.raises(InternalServerError) as err:
        kube_apiserver.apply(_vm("bad-vm", [{"name": "nic1", "deviceName": 710}]), kube_namespace)
    assert _status_message(err.value) == (
        "failed to create typed patch object (/bad-vm; kubevirt.io/v1, Kind=VirtualMachine): "
        ".spec.template.spec.domain.devices.hostDevices[0].deviceName: expected string, got "
        "&value.valueUnstructured{Value:710}"
    )


def test_kubevirt_cr_with_permitted_pci_host_devices(
    kube_apiserver: Cluster, kube_namespace: str
) -> None:
    pci = [
        {
            "pciVendorSelector": "8086:154c",
            "resourceName": "hostdev.io/intel-x710-vf",
            "externalResourceProvider": True,
        },
        {"pciVendorSelector": "10de:20b0", "resourceName": "hostdev.io/nvidia-a100"},
    ]
    kv = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "KubeVirt",
        "metadata": {"name": "kubevirt"},
        "spec": {
            "configuration": {
                "developerConfiguration": {"featureGates": ["HostDevices"]},
                "permittedHostDevices": {"pciHostDevices": pci},
            }
        },
    }
    [applied] = kube_apiserver.apply(kv, kube_namespace)
    assert applied["spec"]["configuration"]["permittedHostDevices"]["pciHostDevices"] == (pci)

    bad = json.loads(json.dumps(kv))
    del bad["spec"]["configuration"]["permittedHostDevices"]["pciHostDevices"][1]["resourceName"]
    with pytest.raises(UnprocessibleEntityError) as err:
        kube_apiserver.apply(bad, kube_namespace)
    assert _status_message(err.value) == (
        'KubeVirt.kubevirt.io "kubevirt" is invalid: '
        "spec.configuration.permittedHostDevices.pciHostDevices[1].resourceName: Required value"
    )


def test_identities_for_rbac_tests(kube_apiserver: Cluster, kube_namespace: str) -> None:
    """A minted client-cert user, a seeded token user and a ServiceAccount token are each
    authenticated as themselves and authorized by RBAC (forbidden until a role is bound)."""

    def whoami(api: k8s.ApiClient) -> tuple[str, list[str]]:
        review = k8s.AuthenticationV1Api(api).create_self_subject_review(k8s.V1SelfSubjectReview())
        assert review.status is not None and review.status.user_info is not None
        info = review.status.user_info
        return info.username or "", info.groups or []

    with kube_apiserver.api_client(user="carol", groups=["team-a", "team-b"]) as api:
        assert whoami(api) == ("carol", ["team-a", "team-b", "system:authenticated"])
        with pytest.raises(k8s.ApiException) as err:
            k8s.CoreV1Api(api).list_namespaced_config_map(kube_namespace)
        assert err.value.status == 403

        rbac = k8s.RbacAuthorizationV1Api(kube_apiserver.admin)
        rbac.create_namespaced_role(
            kube_namespace,
            k8s.V1Role(
                metadata=k8s.V1ObjectMeta(name="cm-reader"),
                rules=[k8s.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["list"])],
            ),
        )
        rbac.create_namespaced_role_binding(
            kube_namespace,
            k8s.V1RoleBinding(
                metadata=k8s.V1ObjectMeta(name="team-a-cm-reader"),
                role_ref=k8s.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="Role", name="cm-reader"
                ),
                subjects=[
                    k8s.RbacV1Subject(
                        kind="Group", name="team-a", api_group="rbac.authorization.k8s.io"
                    )
                ],
            ),
        )
        wait_allowed(api, "list", "configmaps", namespace=kube_namespace)
        assert k8s.CoreV1Api(api).list_namespaced_config_map(kube_namespace).items == []

    with kube_apiserver.api_client(token=kube_apiserver.user_tokens["alice"]) as api:
        assert whoami(api) == ("alice", ["system:authenticated"])

    token = kube_apiserver.service_account_token(kube_namespace, "hostdev-operator")
    with kube_apiserver.api_client(token=token) as api:
        user, groups = whoami(api)
        assert user == f"system:serviceaccount:{kube_namespace}:hostdev-operator"
        assert f"system:serviceaccounts:{kube_namespace}" in groups
