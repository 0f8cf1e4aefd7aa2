"""The agent's pod watch under a real API server's faults (issue #10): restarted under it, and its
history compacted away so the resumed watch gets 410 Gone and relists. Known pods keep their cached
tokens through the outage (SEC-36); what changed meanwhile (through a standby API server the agent
does not know) is seen after (SEC-10).

These restart the session's API server (etcd and its data stay): each leaves it running and ready.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metaemu.pods.agent import NodeAgent
from tests.helpers import SA_PATH
from tests.kube.agent import Agent, started_agent, unique
from tests.kube.cluster import KubeCluster

pytestmark = pytest.mark.kube

GSA = "app@my-project.iam.gserviceaccount.com"
#: Real seconds to wait for a restarted API server to be watched again. The watch's retry backoff
#: (1, 2, 4 ... s) is on the agent's virtual clock, which these waits advance by ``BACKOFF_STEP_S``
#: per poll while the wire is quiet.
RECONNECT_S = 60.0
BACKOFF_STEP_S = 0.5


@pytest.fixture
async def agent(cluster: KubeCluster, tmp_path: Path) -> AsyncIterator[Agent]:
    async with started_agent(cluster, tmp_path) as started:
        try:
            yield started
        finally:
            if not cluster.running:  # a test that failed mid-outage: the next ones need the server
                cluster.start_apiserver()


def index_of(agent: Agent) -> NodeAgent:
    contexts = agent.server.components.contexts
    assert isinstance(contexts, NodeAgent)
    return contexts


async def test_sec36_restart_known_pods_keep_their_tokens_and_changes_meanwhile_are_seen_after(
        agent: Agent, cluster: KubeCluster) -> None:
    namespace = unique("apps")
    index = index_of(agent).index
    kept_ip, _ = agent.workload(namespace, "kept", gsa=GSA)
    gone_ip, _ = agent.workload(namespace, "gone", gsa=GSA, sa="gone-sa")
    await agent.until("both pods", lambda: bool(index.candidates(kept_ip) and index.candidates(gone_ip)))
    kept_token = await agent.token_for(kept_ip)
    errors_before = agent.metric("metaemu_pod_watch_restarts_total", reason="error")

    cluster.stop_apiserver()
    # The outage: the watch breaks and is retried; the known pod is served from memory.
    await agent.until("the broken watch", lambda: agent.metric(
        "metaemu_pod_watch_restarts_total", reason="error") > errors_before)
    assert await agent.token_for(kept_ip) == kept_token
    assert (await agent.get(kept_ip, SA_PATH + "email")).text == GSA

    # Meanwhile the cluster changes through another API server the agent does not know: a new
    # pod, a deleted one, its address reused by a pod of another account.
    with cluster.standby_apiserver():
        new_ip, _ = agent.workload(namespace, "new", gsa=GSA, sa="new-sa")
        cluster.delete_pod(namespace, "gone")
        cluster.service_account(namespace, "reuser")
        cluster.pod(namespace, "reuser", node=agent.node, service_account="reuser", ip=gone_ip,
                    host_ip="169.254.29.1")
        assert index.candidates(gone_ip) and not index.candidates(new_ip)  # the agent has seen none of it
    cluster.start_apiserver()
    await agent.until("the changes made during the outage", lambda: bool(index.candidates(new_ip)) and any(
        p.name == "reuser" for p in index.candidates(gone_ip)), timeout_s=RECONNECT_S, advance_s=BACKOFF_STEP_S)
    assert [p.name for p in index.candidates(gone_ip)] == ["reuser"]
    assert await agent.token_for(kept_ip) == kept_token  # nothing was re-minted for the known pod
    reused = agent.google.token_info(await agent.token_for(gone_ip))
    assert reused is not None and reused.email is None  # federated: the old pod's GSA is not served
    assert reused.principal.endswith(f"/subject/system:serviceaccount:{namespace}:reuser")
    fresh = agent.google.token_info(await agent.token_for(new_ip))
    assert fresh is not None and fresh.email == GSA


async def test_compacted_history_gives_410_and_a_relist_that_finds_the_changes(
        agent: Agent, cluster: KubeCluster) -> None:
    namespace = unique("apps")
    index = index_of(agent).index
    first_ip, _ = agent.workload(namespace, "first", gsa=GSA)
    await agent.until("the first pod", lambda: bool(index.candidates(first_ip)))
    expired_before = agent.metric("metaemu_pod_watch_restarts_total", reason="expired")

    second_ip, _ = agent.workload(namespace, "second", gsa=GSA, sa="second-sa")
    cluster.delete_pod(namespace, "first")
    # History moves on past what the agent can see (pods of another node: not in its watch), then
    # etcd compacts it away and the server restarts: the agent's resourceVersion is older than
    # anything the server can replay, so its resumed watch gets 410 Gone and it must relist.
    elsewhere = unique("node-elsewhere")
    cluster.node(elsewhere)
    cluster.service_account(namespace, "other")
    for i in range(3):
        cluster.pod(namespace, f"elsewhere-{i}", node=elsewhere, service_account="other")
    cluster.stop_apiserver()
    cluster.compact_etcd()
    cluster.start_apiserver()

    await agent.until("410 Gone", lambda: agent.metric(
        "metaemu_pod_watch_restarts_total", reason="expired") > expired_before, timeout_s=RECONNECT_S,
        advance_s=BACKOFF_STEP_S)
    await agent.until("the relisted pods", lambda: bool(index.candidates(second_ip))
                      and not index.candidates(first_ip), timeout_s=RECONNECT_S, advance_s=BACKOFF_STEP_S)
    refused, _ = await agent.drive(agent.get(first_ip, SA_PATH + "token"))
    assert refused.status == 403
    info = agent.google.token_info(await agent.token_for(second_ip))
    assert info is not None and info.email == GSA
