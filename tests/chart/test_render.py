"""What the chart renders with default and notable values: security contexts, host access of
the agent, RBAC rules (least privilege), the own-node admission policy. Needs only helm."""

from __future__ import annotations

from typing import Any

import pytest

from hostdev.deviceplugin.agent import parse_args as agent_args
from hostdev.operator.main import parse_args as operator_args
from tests.chart.helmtool import find, render

EXPECTED_HOST_PATHS = {
    "/sys": ("/host/sys", False),
    "/proc": ("/host/proc", True),
    "/dev/vfio": ("/host/dev/vfio", True),
    "/lib/modules": ("/host/lib/modules", True),
    "/var/lib/kubelet/device-plugins": ("/var/lib/kubelet/device-plugins", False),
    "/var/lib/kubelet/pod-resources": ("/var/lib/kubelet/pod-resources", False),
    "/var/lib/hostdev": ("/var/lib/hostdev", False),
}
# The DRA front end's (agent.dra.enabled, the default): only its own plugin directory.
DRA_HOST_PATHS = {
    "/var/lib/kubelet/plugins_registry": ("/var/lib/kubelet/plugins_registry", False),
    "/var/lib/kubelet/plugins/pci.hostdev.io": ("/var/lib/kubelet/plugins/pci.hostdev.io", False),
    "/var/run/cdi": ("/var/run/cdi", False),
}


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render()


def rules(docs: list[dict[str, Any]], role_suffix: str) -> list[dict[str, Any]]:
    return list(find(docs, "ClusterRole", role_suffix)["rules"])


def test_operator_pod_is_locked_down(docs: list[dict[str, Any]]) -> None:
    pod = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any("hostPath" in v for v in pod.get("volumes", []))
    assert not pod.get("hostNetwork") and not pod.get("hostPID")


def test_operator_leader_election_flags(docs: list[dict[str, Any]]) -> None:
    c = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["hostdev-operator"]
    assert c["args"][:5] == [
        "--leader-elect", "--lease-name=hostdev-operator", "--lease-duration=15",
        "--renew-deadline=10", "--retry-period=2",
    ]  # fmt: skip
    for name, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
        assert {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}} in c["env"]
    standalone = render({"operator.leaderElection.enabled": False})
    c2 = find(standalone, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
    assert c2["command"] == ["hostdev-operator"] and "--standalone" in c2["args"]
    # a rolling update would briefly run two operators without leader election
    assert find(standalone, "Deployment", "-operator")["spec"]["strategy"] == {"type": "Recreate"}
    dep = find(docs, "Deployment", "-operator")
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert not any(d["kind"] in ("Role", "RoleBinding") for d in standalone)


def test_agent_daemonset_shape(docs: list[dict[str, Any]]) -> None:
    ds = find(docs, "DaemonSet", "-agent")
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"hostdev.io/enabled": "true"}
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["hostNetwork"] is False and "hostPID" not in pod
    assert any(t.get("key") == "node-role.kubernetes.io/control-plane" for t in pod["tolerations"])
    (c,) = pod["containers"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in c[
        "env"
    ]
    assert c["command"] == ["hostdev-node"]
    assert c["args"] == [
        "--host-root=/host",
        "--node-name=$(NODE_NAME)",
        "--plugin-dir=/var/lib/kubelet/device-plugins",
        "--pod-resources-socket=/var/lib/kubelet/pod-resources/kubelet.sock",
        "--state-dir=/var/lib/hostdev",
        "--kubelet-registry-dir=/var/lib/kubelet/plugins_registry",
        "--kubelet-plugins-dir=/var/lib/kubelet/plugins",
        "--cdi-dir=/var/run/cdi",
        "--metrics-port=9101",
        "--log-level=INFO",
    ]
    off = find(render({"agent.dra.enabled": False}), "DaemonSet", "-agent")
    args = off["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--no-dra" in args and not any(a.startswith("--cdi-dir") for a in args)


def test_rendered_command_lines_parse_with_the_real_entry_points(
    docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flags the chart passes exist (argparse exits on an unknown one)."""
    c = find(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]["containers"][0]
    parsed = agent_args([a.replace("$(NODE_NAME)", "node-a") for a in c["args"]])
    assert (parsed.host_root, parsed.node_name, parsed.metrics_port) == ("/host", "node-a", 9101)
    standalone = render({"operator.leaderElection.enabled": False, "operator.verbose": True})
    c = find(standalone, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
    parsed = operator_args(c["args"])
    assert parsed.standalone and parsed.verbose and parsed.metrics_port == 9090
    c = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
    monkeypatch.setenv("POD_NAMESPACE", "hostdev-system")  # the downward API's, in the pod
    monkeypatch.setenv("POD_NAME", "hostdev-operator-abc")
    parsed = operator_args(c["args"])
    assert parsed.leader_elect and parsed.liveness == "http://0.0.0.0:8080/healthz"
    assert (parsed.lease_namespace, parsed.lease_name) == ("hostdev-system", "hostdev-operator")
    assert (parsed.lease_duration, parsed.renew_deadline, parsed.retry_period) == (15, 10, 2)


def _host_mounts(docs: list[dict[str, Any]]) -> dict[str, tuple[str, bool]]:
    pod = find(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    return {
        path: (mounts[name]["mountPath"], mounts[name].get("readOnly", False))
        for name, path in host.items()
    }


def test_agent_mounts_only_what_it_needs(docs: list[dict[str, Any]]) -> None:
    assert _host_mounts(docs) == {**EXPECTED_HOST_PATHS, **DRA_HOST_PATHS}
    assert _host_mounts(render({"agent.dra.enabled": False})) == EXPECTED_HOST_PATHS
    # A distribution's own kubelet directory: mounted at the same path (the kubelet dials the
    # socket by it, the runtime bind-mounts metadata files by it).
    k0s = render({"agent.hostPaths.kubeletPlugins": "/var/lib/k0s/kubelet/plugins"})
    assert _host_mounts(k0s)["/var/lib/k0s/kubelet/plugins/pci.hostdev.io"] == (
        "/var/lib/k0s/kubelet/plugins/pci.hostdev.io",
        False,
    )


def test_agent_privileges_are_bounded(docs: list[dict[str, Any]]) -> None:
    c = find(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]["containers"][0]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE", "DAC_READ_SEARCH"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    priv = render({"agent.privileged": True})
    sc2 = find(priv, "DaemonSet", "-agent")["spec"]["template"]["spec"]["containers"][0][
        "securityContext"
    ]
    assert sc2 == {"privileged": True}


def test_no_rule_grants_secrets_or_wildcards(docs: list[dict[str, Any]]) -> None:
    for role in (d for d in docs if d["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role[
                "metadata"
            ]["name"]
            assert "secrets" not in rule["resources"], role["metadata"]["name"]
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_agent_role_is_exactly_nodestates_status_and_pods(docs: list[dict[str, Any]]) -> None:
    got = {
        (g, r, tuple(sorted(rule["verbs"])))
        for rule in rules(docs, "-agent")
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    base = {
        ("hostdev.io", "passthroughnodestates", ("get", "list", "watch")),
        ("hostdev.io", "passthroughnodestates/status", ("patch", "update")),
        ("", "pods", ("get", "list", "watch")),
    }
    assert got == base | {
        (
            "resource.k8s.io",
            "resourceslices",
            ("create", "delete", "get", "list", "update", "watch"),
        ),
        ("resource.k8s.io", "resourceclaims", ("get",)),
        ("", "nodes", ("get",)),
    }
    off = render({"agent.dra.enabled": False})
    assert {
        (g, r, tuple(sorted(rule["verbs"])))
        for rule in rules(off, "-agent")
        for g in rule["apiGroups"]
        for r in rule["resources"]
    } == base
    assert not any(
        d["kind"] == "ValidatingAdmissionPolicy" and "slices" in d["metadata"]["name"] for d in off
    )


def test_operator_role_covers_its_api_calls(docs: list[dict[str, Any]]) -> None:
    def verbs(group: str, resource: str) -> set[str]:
        return {
            v
            for rule in rules(docs, "-operator")
            if group in rule["apiGroups"] and resource in rule["resources"]
            for v in rule["verbs"]
        }

    assert verbs("kubevirt.io", "kubevirts") == {"get", "list", "watch", "patch"}
    assert verbs("kubevirt.io", "virtualmachines") == {"get", "list", "watch", "patch"}
    assert verbs("kubevirt.io", "virtualmachineinstances") == {"get", "list", "watch", "delete"}
    assert verbs("", "nodes") == {"get", "list", "watch", "patch"}
    assert verbs("", "pods/eviction") == {"create"}
    assert verbs("", "events") == {"create", "patch"}
    assert {"create", "delete", "patch"} <= verbs("hostdev.io", "passthroughnodestates")
    assert verbs("coordination.k8s.io", "leases") == set()  # cluster-wide: none
    assert verbs("", "pods") == set() and verbs("", "configmaps") == set()
    assert verbs("resource.k8s.io", "deviceclasses") == {
        "get",
        "list",
        "watch",
        "create",
        "patch",
        "update",
        "delete",
    }
    assert verbs("resource.k8s.io", "resourceclaimtemplates") == {"get", "create", "delete"}
    assert verbs("resource.k8s.io", "resourceslices") == set()


def test_operator_lease_role_is_namespaced_and_minimal(docs: list[dict[str, Any]]) -> None:
    role = find(docs, "Role", "-operator-lease")
    assert role["metadata"]["namespace"] == "hostdev-system"
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": ["hostdev-operator"], "verbs": ["get", "update"]},
    ]  # fmt: skip
    binding = find(docs, "RoleBinding", "-operator-lease")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"].endswith("-operator")


def test_own_nodestate_policy(docs: list[dict[str, Any]]) -> None:
    vap = find(docs, "ValidatingAdmissionPolicy", "-own-nodestate")
    binding = find(docs, "ValidatingAdmissionPolicyBinding", "-own-nodestate")
    assert binding["spec"]["policyName"] == vap["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    (cond,) = vap["spec"]["matchConditions"]
    assert (
        cond["expression"]
        == "request.userInfo.username == 'system:serviceaccount:hostdev-system:hd-hostdev-agent'"
    )
    assert "authentication.kubernetes.io/node-name" in vap["spec"]["variables"][0]["expression"]
    assert (
        "passthroughnodestates/status"
        in vap["spec"]["matchConstraints"]["resourceRules"][0]["resources"]
    )


def test_metrics_services_and_servicemonitor() -> None:
    docs = render(
        {
            "metrics.serviceMonitor.enabled": True,
            "metrics.serviceMonitor.labels": {"release": "prom"},
        }
    )
    agent = find(docs, "Service", "-agent-metrics")
    assert agent["spec"]["clusterIP"] == "None"
    find(docs, "Service", "-operator-metrics")
    sm = find(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert not any(d["kind"] == "ServiceMonitor" for d in render())


def test_disabled_agent_renders_no_agent_objects() -> None:
    docs = render(
        {
            "agent.enabled": False,
            "agent.ownNodeStateGuard.enabled": False,
        }
    )
    names = [d["metadata"]["name"] for d in docs]
    assert not [n for n in names if "agent" in n]
    find(docs, "Deployment", "-operator")


def test_own_resourceslices_policy(docs: list[dict[str, Any]]) -> None:
    vap = find(docs, "ValidatingAdmissionPolicy", "-own-resourceslices")
    binding = find(docs, "ValidatingAdmissionPolicyBinding", "-own-resourceslices")
    assert binding["spec"]["policyName"] == vap["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    (rule,) = vap["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["resourceslices"] and rule["apiGroups"] == ["resource.k8s.io"]
    assert set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE"}
    assert "hd-hostdev-agent" in vap["spec"]["matchConditions"][0]["expression"]
