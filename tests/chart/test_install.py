"""`helm install` of the chart into the real test API server (etcd + kube-apiserver; no
kubelet or controllers, so no pod runs), then the API server's own authorization and admission
decide what the two ServiceAccounts may do:

- every object of the release exists and the CRDs are Established;
- the operator's ServiceAccount cannot read Secrets (SubjectAccessReview and a real request);
- the agent's ServiceAccount can write the status of its own node's PassthroughNodeState only
  (RBAC allows status writes; the chart's ValidatingAdmissionPolicy pins the node), checked both
  by impersonation with the node-name extra and with a real pod-bound token from TokenRequest.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from hostdev.deviceplugin.dra.kube import DraApi
from hostdev.deviceplugin.dra.publisher import SlicePublisher
from hostdev.host import PciAddress
from hostdev.policy.allocation import AllocUnit
from hostdev.policy.dra import PoolEntry, dra_device, plan_slices
from tests.chart.helmtool import CHART, helm
from tests.fixtures.kube import Cluster, light_client

pytestmark = pytest.mark.kube

NODE_NAME_KEY = "authentication.kubernetes.io/node-name"
GROUP, VERSION, NODESTATES = "hostdev.io", "v1alpha1", "passthroughnodestates"


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str
    fullname: str
    manifest: list[dict[str, Any]]

    @property
    def operator_sa(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.fullname}-operator"

    @property
    def agent_sa(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.fullname}-agent"


def install(cluster: Cluster, namespace: str, *extra: str) -> Release:
    name = f"hd{uuid.uuid4().hex[:6]}"
    helm(
        "install", name, CHART, "--namespace", namespace,
        *extra,
        kubeconfig=cluster.kubeconfig,
    )  # fmt: skip
    manifest = helm(
        "get", "manifest", name, "--namespace", namespace, kubeconfig=cluster.kubeconfig
    )
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    return Release(name, namespace, f"{name}-hostdev", docs)


@pytest.fixture(scope="module")
def release(kube_apiserver: Cluster) -> Iterator[Release]:
    ns = kube_apiserver.create_namespace("hostdev-chart")
    rel = install(kube_apiserver, ns, "--set", "operator.replicas=2")
    try:
        yield rel
    finally:
        helm(
            "uninstall",
            rel.name,
            "--namespace",
            ns,
            kubeconfig=kube_apiserver.kubeconfig,
            check=False,
        )
        kube_apiserver.delete_namespace(ns)


def impersonating(
    cluster: Cluster, user: str, extra: dict[str, str] | None = None
) -> k8s.ApiClient:
    """An admin client that acts as ``user`` (with optional user extras), as kubectl --as does."""
    api = cluster.api_client()
    api.set_default_header("Impersonate-User", user)
    for key, value in (extra or {}).items():
        api.set_default_header(f"Impersonate-Extra-{key.replace('/', '%2F')}", value)
    return api


def can(
    cluster: Cluster, user: str, verb: str, resource: str, group: str = "", **attrs: str
) -> bool:
    ns_name = user.split(":")[2]
    sar = k8s.V1SubjectAccessReview(
        spec=k8s.V1SubjectAccessReviewSpec(
            user=user,
            groups=[
                "system:serviceaccounts",
                f"system:serviceaccounts:{ns_name}",
                "system:authenticated",
            ],
            resource_attributes=k8s.V1ResourceAttributes(
                verb=verb, resource=resource, group=group, **attrs
            ),
        )
    )
    result = k8s.AuthorizationV1Api(cluster.admin).create_subject_access_review(sar)
    return bool(result.status.allowed)


def wait_can(
    cluster: Cluster, user: str, verb: str, resource: str, group: str = "", **attrs: str
) -> None:
    """Until ``user`` may do it: RBAC objects reach the authorizer a moment after creation."""
    deadline = time.monotonic() + 30
    while not can(cluster, user, verb, resource, group, **attrs):
        assert time.monotonic() < deadline, f"{user} never allowed to {verb} {resource} {attrs}"
        time.sleep(0.1)


@pytest.fixture
def nodestates(kube_apiserver: Cluster) -> Iterator[Callable[[str], str]]:
    """Creates PassthroughNodeStates with unique names (the API server is shared by the
    session) and deletes them afterwards."""
    objs = k8s.CustomObjectsApi(kube_apiserver.admin)
    made: list[str] = []
    suffix = uuid.uuid4().hex[:6]

    def make(node: str) -> str:
        name = f"{node}-{suffix}"
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "PassthroughNodeState",
            "metadata": {"name": name},
            "spec": {},
        }
        objs.create_cluster_custom_object(GROUP, VERSION, NODESTATES, body)
        made.append(name)
        return name

    yield make
    for name in made:
        objs.delete_cluster_custom_object(GROUP, VERSION, NODESTATES, name)


def patch_status(api: k8s.ApiClient, node: str, sync: str = "InProgress") -> None:
    k8s.CustomObjectsApi(api).patch_cluster_custom_object_status(
        GROUP, VERSION, NODESTATES, node, {"status": {"syncStatus": sync}}
    )


def denied(api: k8s.ApiClient, node: str) -> k8s.ApiException:
    """The status patch is refused; waits (bounded) for the policy to be loaded by admission."""
    deadline = time.monotonic() + 30
    while True:
        try:
            patch_status(api, node)
        except k8s.ApiException as e:
            return e
        if time.monotonic() > deadline:
            pytest.fail(f"patching PassthroughNodeState {node} was allowed for 30 s")
        time.sleep(0.5)


# ---- the release's objects ------------------------------------------------------------------


def test_every_object_of_the_release_exists(kube_apiserver: Cluster, release: Release) -> None:
    kinds = sorted(d["kind"] for d in release.manifest)
    assert kinds == sorted(
        [
            "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding",
            "Role", "RoleBinding",
            "DaemonSet", "Deployment", "PodDisruptionBudget", "Service", "Service",
            "ServiceAccount", "ServiceAccount",
            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",  # own NodeState
            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",  # own slices (DRA)
        ]
    )  # fmt: skip
    for doc in release.manifest:
        res = kube_apiserver.resource(doc["apiVersion"], doc["kind"])
        ns = release.namespace if res.namespaced else None
        live = res.get(name=doc["metadata"]["name"], namespace=ns)
        assert live.metadata.labels["app.kubernetes.io/instance"] == release.name
    apps = k8s.AppsV1Api(kube_apiserver.admin)
    dep = apps.read_namespaced_deployment(f"{release.fullname}-operator", release.namespace)
    assert dep.spec.replicas == 2
    ds = apps.read_namespaced_daemon_set(f"{release.fullname}-agent", release.namespace)
    assert ds.spec.template.spec.node_selector == {"hostdev.io/enabled": "true"}


def test_crds_are_established(kube_apiserver: Cluster, release: Release) -> None:
    ext = k8s.ApiextensionsV1Api(kube_apiserver.admin)
    files = sorted((CHART / "crds").glob("*.yaml"))
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in files]
    assert len(names) == 3 and all(n.endswith(".hostdev.io") for n in names)
    for name in names:
        crd = ext.read_custom_resource_definition(name)
        conditions = {c.type: c.status for c in crd.status.conditions}
        assert conditions.get("Established") == "True", name


# ---- RBAC -------------------------------------------------------------------------------------


def test_operator_cannot_read_secrets(kube_apiserver: Cluster, release: Release) -> None:
    sa = release.operator_sa
    # positive controls first (the release's bindings reach the authorizer a moment after the
    # install): the review does see the operator's grants ...
    wait_can(kube_apiserver, sa, "patch", "virtualmachines", "kubevirt.io", namespace="default")
    lease = {"namespace": release.namespace, "name": "hostdev-operator"}
    for verb in ("get", "update", "watch"):
        wait_can(kube_apiserver, sa, verb, "leases", "coordination.k8s.io", **lease)
    wait_can(kube_apiserver, sa, "create", "leases", "coordination.k8s.io",
             namespace=release.namespace)  # fmt: skip
    wait_can(kube_apiserver, sa, "create", "pods", subresource="eviction", namespace="default")
    # ... only its own Lease, only in its own namespace, no pod deletes ...
    assert not can(kube_apiserver, sa, "update", "leases", "coordination.k8s.io",
                   namespace=release.namespace, name="kube-scheduler")  # fmt: skip
    assert not can(kube_apiserver, sa, "create", "leases", "coordination.k8s.io",
                   namespace="kube-system")  # fmt: skip
    assert not can(kube_apiserver, sa, "delete", "pods", namespace="default")
    # ... and none to secrets
    for verb in ("get", "list", "watch"):
        assert not can(kube_apiserver, sa, verb, "secrets")
        assert not can(kube_apiserver, sa, verb, "secrets", namespace=release.namespace)
    # and a real request as that ServiceAccount is refused by the API server
    api = impersonating(kube_apiserver, sa)
    with pytest.raises(k8s.ApiException) as e:
        k8s.CoreV1Api(api).list_namespaced_secret(release.namespace)
    assert e.value.status == 403
    with pytest.raises(k8s.ApiException) as e:
        k8s.CoreV1Api(api).list_secret_for_all_namespaces()
    assert e.value.status == 403


def test_agent_rbac_is_status_only(kube_apiserver: Cluster, release: Release) -> None:
    sa = release.agent_sa
    wait_can(kube_apiserver, sa, "patch", NODESTATES, GROUP, subresource="status")
    wait_can(kube_apiserver, sa, "watch", NODESTATES, GROUP)
    wait_can(kube_apiserver, sa, "list", "pods")
    assert not can(kube_apiserver, sa, "patch", NODESTATES, GROUP)  # the spec is the operator's
    assert not can(kube_apiserver, sa, "delete", NODESTATES, GROUP)
    assert not can(kube_apiserver, sa, "get", "secrets")
    assert not can(kube_apiserver, sa, "patch", "nodes")
    assert not can(kube_apiserver, sa, "patch", "passthroughpolicies", GROUP, subresource="status")


# ---- the own-node admission policy ------------------------------------------------------------


def test_agent_may_write_only_its_own_nodestate(
    kube_apiserver: Cluster, release: Release, nodestates: Callable[[str], str]
) -> None:
    node_a, node_b = nodestates("node-a"), nodestates("node-b")
    as_agent_on_a = impersonating(kube_apiserver, release.agent_sa, {NODE_NAME_KEY: node_a})

    err = denied(as_agent_on_a, node_b)
    assert err.status == 403
    assert f"may write only PassthroughNodeState {node_a}, not {node_b}" in err.body
    assert "ValidatingAdmissionPolicy" in err.body

    patch_status(as_agent_on_a, node_a, "Succeeded")
    got = k8s.CustomObjectsApi(kube_apiserver.admin).get_cluster_custom_object(
        GROUP, VERSION, NODESTATES, node_a
    )
    assert got["status"]["syncStatus"] == "Succeeded"

    # a token that is not bound to a pod (no node name) cannot write any NodeState
    as_agent_nowhere = impersonating(kube_apiserver, release.agent_sa)
    err = denied(as_agent_nowhere, node_a)
    assert err.status == 403
    assert "only with a pod-bound service account token" in err.body

    # other identities are not affected by the policy (the admin writes any node's status)
    patch_status(kube_apiserver.admin, node_b, "Failed")


def test_pod_bound_token_carries_the_node_and_is_pinned_to_it(
    kube_apiserver: Cluster, release: Release, nodestates: Callable[[str], str]
) -> None:
    """No impersonation: a real token of a pod scheduled on node-a (TokenRequest bound to the
    pod, as the kubelet gets it for the agent), used as the agent would use it."""
    core = k8s.CoreV1Api(kube_apiserver.admin)
    node = core.create_node(
        k8s.V1Node(metadata=k8s.V1ObjectMeta(name=f"node-{uuid.uuid4().hex[:6]}"))
    )
    own = node.metadata.name
    other = nodestates("other")
    k8s.CustomObjectsApi(kube_apiserver.admin).create_cluster_custom_object(
        GROUP,
        VERSION,
        NODESTATES,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "PassthroughNodeState",
            "metadata": {"name": own},
            "spec": {},
        },
    )
    try:
        sa_name = release.agent_sa.rsplit(":", 1)[1]
        pod = core.create_namespaced_pod(
            release.namespace,
            k8s.V1Pod(
                metadata=k8s.V1ObjectMeta(name="agent-probe"),
                spec=k8s.V1PodSpec(
                    node_name=node.metadata.name,
                    service_account_name=sa_name,
                    automount_service_account_token=False,
                    containers=[k8s.V1Container(name="c", image="hostdev:test")],
                ),
            ),
        )
        token = core.create_namespaced_service_account_token(
            sa_name,
            release.namespace,
            k8s.AuthenticationV1TokenRequest(
                spec=k8s.V1TokenRequestSpec(
                    audiences=[],
                    expiration_seconds=600,
                    bound_object_ref=k8s.V1BoundObjectReference(
                        kind="Pod", api_version="v1", name=pod.metadata.name, uid=pod.metadata.uid
                    ),
                )
            ),
        ).status.token
        as_pod = kube_apiserver.api_client(token=token)
        review = k8s.AuthenticationV1Api(as_pod).create_self_subject_review(
            k8s.V1SelfSubjectReview()
        )
        assert review.status.user_info.extra[NODE_NAME_KEY] == [node.metadata.name]

        err = denied(as_pod, other)
        assert f"may write only PassthroughNodeState {node.metadata.name}, not {other}" in err.body
        patch_status(as_pod, node.metadata.name, "Succeeded")
    finally:
        core.delete_node(own)
        k8s.CustomObjectsApi(kube_apiserver.admin).delete_cluster_custom_object(
            GROUP, VERSION, NODESTATES, own
        )


# ---- DRA: own-node ResourceSlices ---------------------------------------------------------------

SLICES = "resourceslices"


def _slice(name: str, node: str, driver: str = "pci.hostdev.io") -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {
            "driver": driver,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": "pci-0000-17-00-0"}],
        },
    }


def _refused(call: Callable[[], object]) -> k8s.ApiException:
    """The write is refused; waits (bounded) for the policy to be loaded by admission."""
    deadline = time.monotonic() + 30
    while True:
        try:
            call()
        except k8s.ApiException as e:
            return e
        if time.monotonic() > deadline:
            pytest.fail("the write was allowed for 30 s")
        time.sleep(0.5)


def test_agent_may_write_only_its_own_nodes_resourceslices(
    kube_apiserver: Cluster, release: Release
) -> None:
    sa = release.agent_sa
    assert can(kube_apiserver, sa, "create", SLICES, "resource.k8s.io")
    assert can(kube_apiserver, sa, "get", "resourceclaims", "resource.k8s.io")
    assert not can(kube_apiserver, sa, "update", "resourceclaims", "resource.k8s.io")
    assert not can(kube_apiserver, sa, "create", "deviceclasses", "resource.k8s.io")
    suffix = uuid.uuid4().hex[:6]
    node_a, node_b = f"node-a-{suffix}", f"node-b-{suffix}"
    admin = k8s.CustomObjectsApi(kube_apiserver.admin)
    as_a = k8s.CustomObjectsApi(impersonating(kube_apiserver, sa, {NODE_NAME_KEY: node_a}))
    rs = ("resource.k8s.io", "v1", SLICES)
    admin.create_cluster_custom_object(*rs, _slice(f"b-{suffix}", node_b))
    try:
        err = _refused(
            lambda: as_a.create_cluster_custom_object(*rs, _slice(f"x-{suffix}", node_b))
        )
        assert err.status == 403
        assert (
            f"may write only ResourceSlices of driver pci.hostdev.io with spec.nodeName {node_a}"
            in err.body
        )
        err = _refused(lambda: as_a.delete_cluster_custom_object(*rs, f"b-{suffix}"))
        assert err.status == 403
        foreign_driver = _slice(f"g-{suffix}", node_a, driver="gpu.example.com")
        assert (
            _refused(lambda: as_a.create_cluster_custom_object(*rs, foreign_driver)).status == 403
        )
        # Its own node's slice: create, update, delete.
        mine = as_a.create_cluster_custom_object(*rs, _slice(f"a-{suffix}", node_a))
        mine["spec"]["devices"].append({"name": "pci-0000-18-00-0"})
        mine = as_a.replace_cluster_custom_object(*rs, f"a-{suffix}", mine)
        moved = dict(
            mine,
            spec={
                **mine["spec"],
                "nodeName": node_b,
                "pool": {**mine["spec"]["pool"], "name": node_b},
            },
        )
        err = _refused(lambda: as_a.replace_cluster_custom_object(*rs, f"a-{suffix}", moved))
        assert err.status in (403, 422)  # the API may refuse the move itself (immutable)
        as_a.delete_cluster_custom_object(*rs, f"a-{suffix}")
        # The agent's own publisher under exactly these permissions.
        pub = SlicePublisher(
            DraApi(light_client(impersonating(kube_apiserver, sa, {NODE_NAME_KEY: node_a})), node_a)
        )
        pub.start()
        try:
            unit = AllocUnit("0000:17:00.0", (PciAddress.parse("0000:17:00.0"),), 40, 0, None)
            pub.submit(
                plan_slices(node_a, [PoolEntry(dra_device(unit, "example.com/gpu", None), True)])
            )
            assert pub.wait_synced(60), pub.last_error
        finally:
            pub.stop()
            pub.api.api.close()
        got = admin.list_cluster_custom_object(*rs, field_selector=f"spec.nodeName={node_a}")
        assert [o["spec"]["devices"][0]["name"] for o in got["items"]] == ["pci-0000-17-00-0"]
        for o in got["items"]:
            admin.delete_cluster_custom_object(*rs, o["metadata"]["name"])
        # Not bound to a pod: nothing.
        nowhere = k8s.CustomObjectsApi(impersonating(kube_apiserver, sa))
        err = _refused(
            lambda: nowhere.create_cluster_custom_object(*rs, _slice(f"n-{suffix}", node_a))
        )
        assert "only with a pod-bound service account token" in err.body
    finally:
        admin.delete_cluster_custom_object(*rs, f"b-{suffix}")


# ---- uninstall ------------------------------------------------------------------------------


def test_uninstall_removes_the_release_but_keeps_crds(
    kube_apiserver: Cluster, kube_namespace: str
) -> None:
    rel = install(kube_apiserver, kube_namespace)
    helm("uninstall", rel.name, "--namespace", kube_namespace, kubeconfig=kube_apiserver.kubeconfig)
    for doc in rel.manifest:
        res = kube_apiserver.resource(doc["apiVersion"], doc["kind"])
        ns = kube_namespace if res.namespaced else None
        with pytest.raises(Exception) as e:
            res.get(name=doc["metadata"]["name"], namespace=ns)
        assert getattr(e.value, "status", None) == 404, doc["kind"]
    # Helm never deletes CRDs (or the objects of them): policies and NodeStates survive
    k8s.ApiextensionsV1Api(kube_apiserver.admin).read_custom_resource_definition(
        "passthroughpolicies.hostdev.io"
    )
