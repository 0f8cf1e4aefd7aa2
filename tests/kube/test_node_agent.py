"""The node agent, unmodified, against a real kube-apiserver (issue #10): its pod list/watch, service
account lookups and pod-bound TokenRequests under exactly manifests/node's RBAC and admission
policies; the Google stand-in verifies the real tokens against the real server's JWKS and issuer.

GKE-05, SEC-02, SEC-08, SEC-10, SEC-13, SEC-25, SEC-31, SEC-36.
"""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from metaemu.pods.startup_taint import READY_POLL_S
from tests.helpers import SA_PATH
from tests.kube.agent import Agent, agent_of, started_agent, unique
from tests.kube.cluster import ISSUER, KubeCluster

pytestmark = pytest.mark.kube

GSA = "app@my-project.iam.gserviceaccount.com"


async def test_gke05_sec25_pod_gets_its_own_token_from_a_real_pod_bound_token_request(agent: Agent) -> None:
    namespace = unique("apps")
    ip, uid = agent.workload(namespace, "web", gsa=GSA)
    await agent.until("the pod in the watch", lambda: bool(agent_of(agent).index.candidates(ip)))
    token = await agent.token_for(ip)
    info = agent.google.token_info(token)
    assert info is not None and info.email == GSA
    # The subject token STS verified was minted by the real server: its issuer, its key, bound to
    # the calling pod, with exactly the Workload Identity audience (SEC-25, SEC-31).
    subject = [r.form["subject_token"] for r in agent.google.requests if r.endpoint == "sts"][-1]
    header = jwt.get_unverified_header(subject)
    key = next(k for k in jwt.PyJWKSet.from_dict(agent.cluster.jwks()).keys if k.key_id == header["kid"])
    claims = jwt.decode(subject, key, algorithms=["RS256"], audience=agent.audience, issuer=ISSUER)
    assert claims["aud"] == [agent.audience]
    assert claims["sub"] == f"system:serviceaccount:{namespace}:app"
    assert claims["kubernetes.io"]["pod"] == {"name": "web", "uid": uid}
    assert claims["kubernetes.io"]["node"]["name"] == agent.node
    assert claims["exp"] - claims["iat"] <= 3600
    email = await agent.get(ip, SA_PATH + "email")
    assert email.text == GSA
    # Every TokenRequest the agent made was accepted: no k8s error was counted.
    assert agent.metric("metaemu_upstream_errors_total", backend="k8s", status="403") == 0


async def test_sec08_sec13_pods_elsewhere_and_unknown_addresses_get_403(agent: Agent, cluster: KubeCluster) -> None:
    namespace = unique("apps")
    ip, _ = agent.workload(namespace, "here", gsa=GSA)
    cluster.service_account(namespace, "other")
    elsewhere = unique("node-elsewhere")
    cluster.node(elsewhere)
    cluster.pod(namespace, "elsewhere", node=elsewhere, service_account="other", ip="169.254.28.9",
                host_ip="169.254.28.1")
    await agent.until("the pod in the watch", lambda: bool(agent_of(agent).index.candidates(ip)))
    for peer in ("169.254.28.9", "169.254.28.77"):
        response, waited_s = await agent.drive(agent.get(peer, SA_PATH + "token"))
        assert response.status == 403
        assert waited_s == 0  # the live lookup found nothing and no pod of the node awaits its address
        assert b"access_token" not in (response.body or b"")  # type: ignore[operator]


async def test_sec10_deleted_pod_is_refused_and_its_address_serves_only_the_new_pod(agent: Agent) -> None:
    namespace = unique("apps")
    ip, _ = agent.workload(namespace, "old", gsa=GSA, sa="old-sa")
    index = agent_of(agent).index
    await agent.until("the old pod", lambda: bool(index.candidates(ip)))
    old = agent.google.token_info(await agent.token_for(ip))
    assert old is not None and old.email == GSA
    agent.cluster.delete_pod(namespace, "old")
    await agent.until("the deletion", lambda: not index.candidates(ip))
    refused, _ = await agent.drive(agent.get(ip, SA_PATH + "token"))
    assert refused.status == 403
    # The address is reused by another pod of another service account (federated, no GSA).
    agent.cluster.service_account(namespace, "new-sa")
    agent.cluster.pod(namespace, "new", node=agent.node, service_account="new-sa", ip=ip, host_ip="169.254.29.1")
    await agent.until("the new pod", lambda: bool(index.candidates(ip)))
    new = agent.google.token_info(await agent.token_for(ip))
    assert new is not None and new.email != GSA
    assert new.principal.endswith(f"/subject/system:serviceaccount:{namespace}:new-sa")


async def test_sec02_startup_taint_removed_by_a_real_patch_that_the_policy_admits(cluster: KubeCluster,
                                                                                  tmp_path: Path) -> None:
    other = {"key": "example.com/keep", "value": "1", "effect": "NoSchedule"}
    startup = {"key": "metaemu.dev/agent-not-ready", "value": "true", "effect": "NoSchedule"}
    async with started_agent(cluster, tmp_path, taints=[other, startup]) as agent:
        await agent.until("the taint removal", lambda: agent.metric("metaemu_startup_taint_cleared") == 1,
                          advance_s=READY_POLL_S)
        taints = cluster.ok("GET", f"/api/v1/nodes/{agent.node}")["spec"]["taints"]
        # Only the startup taint went; ours and the one the real server's TaintNodesByCondition
        # admission adds to every new node stay.
        assert taints == [other, {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]

