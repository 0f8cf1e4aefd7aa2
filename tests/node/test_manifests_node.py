"""The node-mode manifests (``manifests/node`` and the optional ``manifests/node/metrics``): they
render, validate against the Kubernetes schemas from 1.30 on (ValidatingAdmissionPolicy v1), and
have the properties security.md asks of a node agent, asserted on the rendered objects. What the
admission policies admit and deny is judged by a real kube-apiserver in tests/kube/test_admission.py
(SEC-02, SEC-31)."""

from __future__ import annotations

import ast
import ipaddress
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
NODE = ROOT / "manifests/node"
METRICS = NODE / "metrics"
#: ValidatingAdmissionPolicy is admissionregistration.k8s.io/v1 from Kubernetes 1.30.
OLDEST_KUBERNETES = "1.30.0"
CUSTOM = {("monitoring.coreos.com/v1", "PodMonitor")}
AGENT_USER = "system:serviceaccount:metaemu-system:metaemu"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


# ---------------------------------------------------------------- rendering


@cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(directory: Path, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in render(directory) if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {directory}, found {len(found)}"
    return found[0]


def agent() -> dict[str, Any]:
    """The agent DaemonSet's pod spec."""
    spec: dict[str, Any] = one(NODE, "DaemonSet", "metaemu")["spec"]["template"]["spec"]
    return spec


def container(spec: Mapping[str, Any], name: str, *, init: bool = False) -> dict[str, Any]:
    (found,) = [c for c in spec["initContainers" if init else "containers"] if c["name"] == name]
    return dict(found)


def config() -> dict[str, Any]:
    """metaemu.yaml as embedded in the ConfigMap."""
    data: dict[str, Any] = yaml.safe_load(one(NODE, "ConfigMap", "metaemu")["data"]["metaemu.yaml"])
    return data


TOKEN_POLICY = "metaemu-token-request"
TAINT_POLICY = "metaemu-node-taint"


def policy(name: str = TOKEN_POLICY) -> dict[str, Any]:
    return one(NODE, "ValidatingAdmissionPolicy", name)


def policy_variable(name: str, policy_name: str = TOKEN_POLICY) -> Any:
    """A constant policy variable, evaluated (the audience, the lifetime, the taint key)."""
    (expression,) = [v["expression"] for v in policy(policy_name)["spec"]["variables"] if v["name"] == name]
    # The variables are literals on purpose (admission-policy.yaml); a CEL string or int literal
    # reads the same as a Python one.
    return ast.literal_eval(expression)


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def walk(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair anywhere inside ``value``."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)


@pytest.mark.parametrize("directory", [NODE, METRICS], ids=["node", "node/metrics"])
@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
def test_node_kustomizations_render_and_validate_strictly(directory: Path, version: str) -> None:
    resources = render(directory)
    assert resources
    for resource in resources:
        if (resource["apiVersion"], resource["kind"]) in CUSTOM:
            continue
        kubernetes_validate.validate(resource, version, strict=True)
    namespaced = [r for r in resources if r["kind"] not in
                  {"Namespace", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                   "ValidatingAdmissionPolicyBinding"}]
    assert {r["metadata"]["namespace"] for r in namespaced} == {"metaemu-system"}


def test_the_core_install_needs_no_prometheus_operator() -> None:
    kinds = sorted(r["kind"] for r in render(NODE))
    assert kinds == sorted(["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
                            *["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"] * 3, "DaemonSet"])
    # The agent's namespace needs the privileged Pod Security level (hostNetwork, NET_ADMIN).
    assert one(NODE, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


# ---------------------------------------------------------------- the agent DaemonSet


def test_the_agent_uses_the_host_network_and_declares_no_host_port() -> None:
    """SEC-38: declared ports of a hostNetwork pod become hostPorts; the agent needs none."""
    spec = agent()
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    for c in spec["containers"] + spec["initContainers"]:
        assert "ports" not in c, c["name"]
    for directory in (NODE, METRICS):
        assert "hostPort" not in {key for key, _ in walk(list(render(directory)))}
    # The metrics proxy listens on the node IP on purpose: exactly one declared port.
    proxy = one(METRICS, "DaemonSet", "metaemu-metrics-proxy")["spec"]["template"]["spec"]
    assert [p["containerPort"] for c in proxy["containers"] for p in c.get("ports", [])] == [8990]


def test_the_serving_container_runs_without_any_capability_or_privilege() -> None:
    metaemu = container(agent(), "metaemu")
    ctx = metaemu["securityContext"]
    assert ctx["capabilities"] == {"drop": ["ALL"]}  # drops everything, adds nothing
    assert ctx["runAsNonRoot"] is True
    # A uid of its own (issue #11: the SO_REUSEPORT group is per uid), kept off hostNetwork pods
    # by the metaemu-agent-uid policy, which must name the same one.
    assert ctx["runAsUser"] == 60988  # not the image's 65532 (Dockerfile): distroless images share that
    policy = one(NODE, "ValidatingAdmissionPolicy", "metaemu-agent-uid")
    assert {"name": "agentUid", "expression": str(ctx["runAsUser"])} in policy["spec"]["variables"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert "privileged" not in ctx


def test_node_setup_is_the_only_container_with_capabilities_and_adds_only_net_admin_and_net_raw() -> None:
    spec = agent()
    [setup] = spec["initContainers"]
    assert setup["name"] == "node-setup"
    ctx = setup["securityContext"]
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert sorted(ctx["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    # The xtables lock is the host's, shared with kube-proxy and the CNI.
    assert {"name": "xtables-lock", "mountPath": "/run/xtables.lock"} in setup["volumeMounts"]
    (lock,) = [v for v in spec["volumes"] if v["name"] == "xtables-lock"]
    assert lock["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    # Nothing else anywhere adds a capability, is privileged or shares the host's PIDs.
    proxy = one(METRICS, "DaemonSet", "metaemu-metrics-proxy")["spec"]["template"]["spec"]
    for c in spec["containers"] + proxy["containers"]:
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, c["name"]
    for directory in (NODE, METRICS):
        keys = {key for key, _ in walk(list(render(directory)))}
        assert not keys & {"privileged", "hostPID", "hostIPC"}


def test_node_setup_installs_verifies_then_keeps_the_rules_pointing_at_the_listener() -> None:
    """SEC-02: metaemu starts only after the startupProbe verified the rules; SEC-04: the sidecar
    re-checks and repairs them; its environment is a rule ``metaemu node-setup`` accepts."""
    from metaemu.node_setup import build_parser, rule_from_args

    [setup] = agent()["initContainers"]
    assert setup["restartPolicy"] == "Always"  # a native sidecar: it keeps running to reconcile
    assert setup["startupProbe"]["exec"]["command"] == ["metaemu", "node-setup", "--check"]
    script = setup["args"][-1]
    assert script.count("metaemu node-setup --check") == 1 and "sleep 30" in script
    env = {e["name"]: e["value"] for e in setup["env"]}
    rule = rule_from_args(build_parser().parse_args([]), env)
    assert f"{rule.target_address}:{rule.target_port}" == config()["listen"]
    assert {"cali+", "lxc+", "cni0", "veth+", "eni+"} <= set(rule.pod_interfaces)
    assert env["METAEMU_LOCAL_ADDRESS_DEV"] == "metaemu0"
    # The serving container cannot run iptables, so the agent's own reconciler stays off.
    assert not {"intercept_pod_interfaces", "intercept_node_interface"} & set(config()["node"])


def test_the_metadata_listener_is_node_local_and_the_admin_listener_loopback() -> None:
    """SEC-07: not 0.0.0.0, not the node IP, not loopback (route_localnet); SEC-32: admin apart."""
    listen_host, listen_port = host_port(config()["listen"])
    address = ipaddress.ip_address(listen_host)
    assert address in ipaddress.ip_network("169.254.0.0/16")  # link-local: never routed off the node
    assert str(address) != "169.254.169.254"  # the DNAT target is not the intercepted address itself
    assert listen_port >= 1024  # so the process needs no capability
    admin_host, admin_port = host_port(config()["admin_listen"])
    assert admin_host == "127.0.0.1"
    assert admin_port != listen_port


def test_probes_ask_this_pods_own_agent_over_its_admin_socket() -> None:
    """Issue #11: two agents share admin_listen during an upgrade, so kubelet's probes go to this
    pod's own agent through its admin_socket, in a volume no other pod has."""
    spec = agent()
    metaemu = container(spec, "metaemu")
    socket_path = config()["admin_socket"]
    for probe, check in (("readinessProbe", "ready"), ("livenessProbe", "live")):
        assert metaemu[probe]["exec"] == {"command": ["metaemu", "probe", check, "--socket", socket_path]}
        assert "httpGet" not in metaemu[probe]
    [mount] = [m for m in metaemu["volumeMounts"] if socket_path.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume  # the pod's own: the surge pod has another
    # The metrics proxy forwards only /metrics, to the loopback listener.
    _, admin_port = host_port(config()["admin_listen"])
    proxy = one(METRICS, "DaemonSet", "metaemu-metrics-proxy")["spec"]["template"]["spec"]["containers"][0]
    assert f"--upstream=http://127.0.0.1:{admin_port}/" in proxy["args"]
    assert "--allow-paths=/metrics" in proxy["args"]


def test_the_node_name_and_addresses_come_from_the_downward_api() -> None:
    env = {e["name"]: e for e in container(agent(), "metaemu")["env"]}
    for name in ("NODE_NAME", "METAEMU_NODE_NAME"):
        assert env[name]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["METAEMU_NODE_IPS"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIPs"}}  # >= 1.30
    assert config()["node"]["name"] == "${NODE_NAME}"  # a placeholder: METAEMU_NODE_NAME replaces it


def test_the_agent_is_node_critical_everywhere_and_surges_to_upgrade() -> None:
    daemonset = one(NODE, "DaemonSet", "metaemu")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    for c in spec["containers"] + spec["initContainers"]:
        assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], c["name"]


def test_only_the_serving_container_holds_the_service_account_token() -> None:
    """Lesson 9: the root NET_ADMIN init container never sees the token that can mint tokens."""
    spec = agent()
    assert spec["automountServiceAccountToken"] is False
    assert one(NODE, "ServiceAccount", "metaemu")["automountServiceAccountToken"] is False
    mounted = {c["name"] for c in spec["containers"] + spec["initContainers"]
               for m in c.get("volumeMounts", []) if m["name"] == "kube-api-access"}
    assert mounted == {"metaemu"}
    (volume,) = [v for v in spec["volumes"] if v["name"] == "kube-api-access"]
    sources = volume["projected"]["sources"]
    assert sources[0]["serviceAccountToken"] == {"path": "token", "expirationSeconds": 3607}  # for the API server


def test_the_embedded_config_is_node_mode() -> None:
    cfg = config()
    assert cfg["mode"] == "node"
    assert set(cfg["node"]) == {"name", "audience", "service_account_annotation", "token_expiration_seconds",
                                "host_network", "startup_taint"}
    assert cfg["node"]["service_account_annotation"] == "iam.gke.io/gcp-service-account"
    assert cfg["node"]["host_network"] == "deny"
    assert cfg["node"]["audience"].startswith("//iam.googleapis.com/projects/")


def test_the_embedded_config_loads_with_the_daemonsets_environment(tmp_path: Path) -> None:
    from metaemu.config import load_config

    path = tmp_path / "metaemu.yaml"
    path.write_text(one(NODE, "ConfigMap", "metaemu")["data"]["metaemu.yaml"])
    loaded = load_config(path=path, env={"NODE_NAME": "node-a", "METAEMU_NODE_NAME": "node-a",
                                         "METAEMU_NODE_IPS": "10.0.0.10,fd00::10"})
    assert loaded.mode == "node" and loaded.node is not None
    assert (loaded.node.name, loaded.node.host_addresses) == ("node-a", ("10.0.0.10", "fd00::10"))
    assert (str(loaded.listen), str(loaded.admin_listen)) == (config()["listen"], config()["admin_listen"])
    assert loaded.node.audience == policy_variable("wifAudience")
    assert loaded.node.token_expiration_seconds == policy_variable("maxExpirationSeconds")


# ---------------------------------------------------------------- RBAC


def test_rbac_is_pods_and_service_accounts_read_token_create_and_node_patch_only() -> None:
    role = one(NODE, "ClusterRole", "metaemu-node")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): sorted(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("",), ("pods",)): ["get", "list", "watch"],
        (("",), ("serviceaccounts",)): ["get", "list", "watch"],
        (("",), ("serviceaccounts/token",)): ["create"],
        (("",), ("nodes",)): ["get", "patch"],  # the startup taint only: see the metaemu-node-taint policy
    }
    binding = one(NODE, "ClusterRoleBinding", "metaemu-node")
    account = one(NODE, "ServiceAccount", "metaemu")
    assert binding["roleRef"]["name"] == "metaemu-node"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]
    assert f"system:serviceaccount:{account['metadata']['namespace']}:{account['metadata']['name']}" == AGENT_USER
    # The metrics proxy runs as another account, which cannot create tokens.
    proxy = one(METRICS, "DaemonSet", "metaemu-metrics-proxy")["spec"]["template"]["spec"]
    assert proxy["serviceAccountName"] != account["metadata"]["name"]


# ---------------------------------------------------------------- the admission policy


def test_the_admission_policy_matches_the_agents_token_requests_and_denies() -> None:
    spec = policy()["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["serviceaccounts/token"]}]
    assert [c["expression"] for c in spec["matchConditions"]] == [f"request.userInfo.username == '{AGENT_USER}'"]
    binding = one(NODE, "ValidatingAdmissionPolicyBinding", TOKEN_POLICY)["spec"]
    assert binding == {"policyName": TOKEN_POLICY, "validationActions": ["Deny"]}


def test_the_policy_allows_what_the_config_asks_for() -> None:
    """The DaemonSet's audience and lifetime are the policy's: else every TokenRequest is denied."""
    assert policy_variable("wifAudience") == config()["node"]["audience"]
    assert policy_variable("maxExpirationSeconds") == config()["node"]["token_expiration_seconds"]


def test_the_node_taint_policy_matches_the_agents_node_updates_and_denies() -> None:
    spec = policy(TAINT_POLICY)["spec"]
    assert spec["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes"]}]
    assert [c["expression"] for c in spec["matchConditions"]] == [f"request.userInfo.username == '{AGENT_USER}'"]
    binding = one(NODE, "ValidatingAdmissionPolicyBinding", TAINT_POLICY)["spec"]
    assert binding == {"policyName": TAINT_POLICY, "validationActions": ["Deny"]}
    assert policy_variable("startupTaint", TAINT_POLICY) == config()["node"]["startup_taint"]
    assert config()["node"]["startup_taint"] == "metaemu.dev/agent-not-ready"
