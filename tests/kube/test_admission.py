"""manifests/node's RBAC and ValidatingAdmissionPolicies enforced by a real kube-apiserver (issue #10):
what the agent's own service-account token may and may not do (SEC-02, SEC-31), and the README's
two ``kubectl ... --as`` checks run as written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.kube.agent import (
    AGENT_NAMESPACE,
    AGENT_SA,
    AGENT_USER,
    agent_token,
    rendered_manifests,
    shipped_config,
    unique,
)
from tests.kube.cluster import KubeCluster

pytestmark = pytest.mark.kube

README = Path(__file__).resolve().parents[2] / "README.md"
#: node.audience of the shipped configmap.yaml, which admission-policy.yaml must name too.
WIF_AUDIENCE = ("//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/my-pool"
                "/providers/my-cluster")
STARTUP_TAINT = {"key": "metaemu.dev/agent-not-ready", "value": "true", "effect": "NoSchedule"}


class Setup:
    """A node with the startup taint, the agent's token bound to a pod on it, and a workload pod."""

    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster
        self.node = unique("node")
        cluster.node(self.node, taints=[STARTUP_TAINT])
        self.token = agent_token(cluster, self.node)
        self.namespace = unique("apps")
        cluster.service_account(self.namespace, "app")
        self.pod_uid = cluster.pod(self.namespace, "web", node=self.node, service_account="app",
                                   ip="169.254.30.1", host_ip="169.254.29.1")
        self.audience = WIF_AUDIENCE

    def spec(self, **overrides: Any) -> dict[str, Any]:
        """The TokenRequest the agent makes (metaemu.pods.kube_client.create_token), with ``overrides``."""
        spec: dict[str, Any] = {"audiences": [self.audience], "expirationSeconds": 3600,
                                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "web",
                                                   "uid": self.pod_uid}}
        spec.update(overrides)
        return {k: v for k, v in spec.items() if v is not None}

    def request_token(self, **overrides: Any) -> tuple[int, str]:
        reply = self.cluster.token_request(self.namespace, "app", self.spec(**overrides), token=self.token)
        return reply.status, str(reply.body.get("message", ""))

    def patch_node(self, node: str, operations: list[dict[str, Any]]) -> tuple[int, str]:
        reply = self.cluster.request("PATCH", f"/api/v1/nodes/{node}", operations, token=self.token,
                                     content_type="application/json-patch+json")
        return reply.status, str(reply.body.get("message", ""))


@pytest.fixture
def setup(cluster: KubeCluster) -> Setup:
    return Setup(cluster)


def test_sec31_the_agents_own_token_request_is_admitted(setup: Setup) -> None:
    assert shipped_config()["node"]["audience"] == WIF_AUDIENCE
    assert setup.request_token() == (201, "")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"audiences": ["https://kubernetes.default.svc.cluster.local"]},
     "metaemu may request service-account tokens only for exactly the Workload Identity provider audience"),
    ({"audiences": None}, "metaemu may request service-account tokens only for exactly"),  # server's own
    ({"audiences": [WIF_AUDIENCE, "https://other.example"]}, "only for exactly the Workload Identity provider"),
    ({"boundObjectRef": None}, "metaemu may request only tokens bound to a Pod"),
    ({"expirationSeconds": 7200}, "metaemu may not request tokens living longer than node.token_expiration_seconds"),
], ids=["api-server-audience", "no-audience", "extra-audience", "unbound", "longer-expiration"])
def test_sec31_token_requests_outside_the_policy_are_denied(setup: Setup, overrides: dict[str, Any],
                                                            message: str) -> None:
    status, text = setup.request_token(**overrides)
    assert status == 403, text
    assert message in text
    assert "metaemu-token-request" in text  # the real server names the policy that denied it


def test_sec31_a_token_bound_to_a_secret_is_denied(setup: Setup, cluster: KubeCluster) -> None:
    secret = cluster.ok("POST", f"/api/v1/namespaces/{setup.namespace}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "type": "Opaque"})
    status, text = setup.request_token(boundObjectRef={"apiVersion": "v1", "kind": "Secret", "name": "s",
                                                       "uid": secret["metadata"]["uid"]})
    assert (status, "metaemu may request only tokens bound to a Pod" in text) == (403, True)


def test_rbac_the_agent_can_read_no_secrets_and_create_no_pods(setup: Setup, cluster: KubeCluster) -> None:
    assert cluster.request("GET", f"/api/v1/namespaces/{setup.namespace}/secrets", token=setup.token).status == 403
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [{"name": "c", "image": "i"}]}}
    assert cluster.request("POST", f"/api/v1/namespaces/{setup.namespace}/pods", pod, token=setup.token).status == 403
    # What it needs: its node's pods, service accounts.
    assert cluster.request("GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3D{setup.node}",
                           token=setup.token).status == 200
    assert cluster.request("GET", f"/api/v1/namespaces/{setup.namespace}/serviceaccounts/app",
                           token=setup.token).status == 200


def test_sec02_the_agent_may_remove_its_startup_taint_from_its_own_node(setup: Setup) -> None:
    status, _ = setup.patch_node(setup.node, [
        {"op": "test", "path": "/spec/taints/0/key", "value": STARTUP_TAINT["key"]},
        {"op": "remove", "path": "/spec/taints/0"}])
    assert status == 200


@pytest.mark.parametrize(("operations", "message"), [
    ([], "metaemu may only remove its startup taint from a node"),
    ([{"op": "add", "path": "/spec/taints/-", "value": {"key": "x", "effect": "NoSchedule"}}],
     "metaemu may only remove its startup taint from a node"),
    ([{"op": "add", "path": "/spec/unschedulable", "value": True}], "metaemu may not cordon or uncordon a node"),
    ([{"op": "add", "path": "/metadata/labels", "value": {"x": "y"}}],
     "metaemu may not change a node's labels, annotations, finalizers or owners"),
    ([{"op": "add", "path": "/metadata/annotations", "value": {"x": "y"}}],
     "metaemu may not change a node's labels, annotations, finalizers or owners"),
], ids=["only-the-other-change", "add-taint", "cordon", "label", "annotate"])
def test_sec02_the_agent_may_change_nothing_else_on_its_node(setup: Setup, operations: list[dict[str, Any]],
                                                             message: str) -> None:
    """Even together with the one allowed change (the startup taint's removal), nothing else passes;
    without it, every other change fails the taint rule first."""
    if operations:
        operations = [{"op": "remove", "path": "/spec/taints/0"}, *operations]
    else:
        operations = [{"op": "add", "path": "/metadata/labels", "value": {"x": "y"}}]
    status, text = setup.patch_node(setup.node, operations)
    assert (status, message in text) == (403, True), text


def test_sec02_the_agent_may_not_touch_another_node(setup: Setup, cluster: KubeCluster) -> None:
    other = unique("node-other")
    cluster.node(other, taints=[STARTUP_TAINT])
    status, text = setup.patch_node(other, [{"op": "remove", "path": "/spec/taints/0"}])
    assert (status, "metaemu may change only the node it runs on" in text) == (403, True), text


def readme_as_checks() -> list[list[str]]:
    """The two ``kubectl ... --as`` commands of the README's node-mode section, as written."""
    commands = [line.split() for line in README.read_text().splitlines()
                if line.startswith("kubectl ") and f"--as {AGENT_USER}" in line]
    assert len(commands) == 2, "the README's two kubectl --as checks moved: update this test"
    return commands


@pytest.mark.parametrize("index", [0, 1], ids=["create-token", "label-node"])
def test_readme_kubectl_as_checks_are_refused_by_the_real_server(setup: Setup, cluster: KubeCluster,
                                                                 index: int) -> None:
    argv = readme_as_checks()[index]
    # The README's placeholders: the workload namespace "apps" and $NODE.
    cluster.service_account("apps", "app")
    argv = [setup.node if arg == "$NODE" else arg for arg in argv[1:]]
    result = cluster.kubectl(*argv)
    assert result.returncode != 0, result.stdout
    policy = "metaemu-token-request" if index == 0 else "metaemu-node-taint"
    assert re.search(rf"is forbidden: ValidatingAdmissionPolicy '{policy}' with binding '{policy}' denied request",
                     result.stderr), result.stderr


def test_agent_user_is_the_policies_match(cluster: KubeCluster) -> None:
    """The admission policies match on the agent's exact username; the applied objects say so."""
    for name in ("metaemu-token-request", "metaemu-node-taint"):
        policy = cluster.ok("GET", f"/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/{name}")
        assert AGENT_USER in policy["spec"]["matchConditions"][0]["expression"]
    assert (AGENT_NAMESPACE, AGENT_SA) == ("metaemu-system", "metaemu")


def host_network_pod(cluster: KubeCluster, namespace: str, *, pod_uid: int | None = None,
                     container_uid: int | None = None, host_network: bool = True) -> tuple[int, str]:
    """Create a pod as a workload owner would; (status, message)."""
    container: dict[str, Any] = {"name": "app", "image": "registry.invalid/app:1"}
    if container_uid is not None:
        container["securityContext"] = {"runAsUser": container_uid}
    spec: dict[str, Any] = {"hostNetwork": host_network, "automountServiceAccountToken": False,
                            "containers": [container]}
    if pod_uid is not None:
        spec["securityContext"] = {"runAsUser": pod_uid}
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": unique("p"), "namespace": namespace},
            "spec": spec}
    reply = cluster.request("POST", f"/api/v1/namespaces/{namespace}/pods", body)
    return reply.status, str(reply.body.get("message", ""))


def test_host_network_pods_may_not_run_as_the_agents_uid(cluster: KubeCluster) -> None:
    """Issue #11: the agent's SO_REUSEPORT group admits any socket of its uid, so no other
    hostNetwork pod may run as that uid (metaemu-agent-uid), whether the pod or a container sets it."""
    agent_uid = int(next(c for c in rendered_manifests_pod_containers() if c["name"] == "metaemu")
                    ["securityContext"]["runAsUser"])
    namespace = unique("hostnet")
    for ns in (namespace, AGENT_NAMESPACE):  # no controller-manager creates the default accounts
        cluster.service_account(ns, "default")
    # A new policy is enforced once the server's informer compiled it: poll for the first denial.
    cluster.wait_until("metaemu-agent-uid enforced",
                       lambda: host_network_pod(cluster, namespace, pod_uid=agent_uid)[0] == 403)
    status, message = host_network_pod(cluster, namespace, container_uid=agent_uid)
    assert status == 403
    assert "ValidatingAdmissionPolicy 'metaemu-agent-uid'" in message
    assert "may not run as metaemu's user id" in message
    assert host_network_pod(cluster, namespace, pod_uid=1000, container_uid=agent_uid)[0] == 403  # container wins
    assert host_network_pod(cluster, namespace, pod_uid=agent_uid, container_uid=1000)[0] == 201
    assert host_network_pod(cluster, namespace, container_uid=1000)[0] == 201
    assert host_network_pod(cluster, namespace, container_uid=agent_uid, host_network=False)[0] == 201
    # The agent's own pods, in its namespace, are not matched.
    assert host_network_pod(cluster, AGENT_NAMESPACE, container_uid=agent_uid)[0] == 201


def rendered_manifests_pod_containers() -> list[dict[str, Any]]:
    daemonset = next(d for d in rendered_manifests()
                     if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "metaemu")
    containers: list[dict[str, Any]] = daemonset["spec"]["template"]["spec"]["containers"]
    return containers
