"""Node mode through the real handler, NodeAgent, pod watch and pipelines, against the real
kube-apiserver of the test bed (and the Google stand-in trusting its JWKS). The only identity input
is the TCP peer address, set on the request's transport exactly where the kernel's report would be;
tests/kube/test_simulated_node.py does the same with real pod addresses in network namespaces.

Named after security.md's cases: SEC-02, SEC-08..SEC-15, SEC-25, SEC-26, SEC-34..SEC-36, SEC-40;
GKE-05, GKE-06. (Moved here from the Kubernetes stand-in, issue #10.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest

from metaemu import __version__
from metaemu.pods.agent import NodeAgent
from metaemu.pods.identity import RETRY_AFTER_UNAVAILABLE_S
from metaemu.pods.startup_taint import READY_POLL_S
from metaemu.pods.watch import PodIndex
from tests.helpers import SA_PATH, assert_no_jwt_from
from tests.kube.agent import Agent, shipped_config, started_agent, unique
from tests.kube.cluster import ISSUER, KubeCluster

pytestmark = pytest.mark.kube

NODE_IP = "169.254.29.1"  # the agent's host_addresses (tests/kube/agent.py)
GSA1 = "one@demo-project.iam.gserviceaccount.com"
GSA2 = "two@demo-project.iam.gserviceaccount.com"
STARTUP_TAINT = {"key": "metaemu.dev/agent-not-ready", "value": "true", "effect": "NoSchedule"}


class World:
    """Three pods on the agent's node (two annotated, one not) and one on another node."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.ns = {i: unique(f"ns{i}") for i in (1, 2, 3)}
        self.p1, _ = agent.workload(self.ns[1], "p1", gsa=GSA1, sa="sa1")
        self.p2, _ = agent.workload(self.ns[2], "p2", gsa=GSA2, sa="sa2")
        self.p3, _ = agent.workload(self.ns[3], "p3", sa="sa3")
        elsewhere = unique("node-elsewhere")
        agent.cluster.node(elsewhere)
        agent.cluster.service_account(self.ns[3], "sa4")
        self.elsewhere_ip = "169.254.28.99"
        agent.cluster.pod(self.ns[3], "elsewhere", node=elsewhere, service_account="sa4", ip=self.elsewhere_ip,
                          host_ip="169.254.28.1")

    @property
    def index(self) -> PodIndex:
        contexts = self.agent.server.components.contexts
        assert isinstance(contexts, NodeAgent)
        return contexts.index

    async def token(self, peer: str, query: str = "") -> str:
        response = await self.agent.get(peer, SA_PATH + "token" + query)
        assert response.status == 200, response.text
        return str(json.loads(response.body)["access_token"])  # type: ignore[arg-type]


@pytest.fixture
async def world(cluster: KubeCluster, tmp_path: Path) -> AsyncIterator[World]:
    async with started_agent(cluster, tmp_path, rate_limit_per_second=5, rate_limit_burst=10) as agent:
        w = World(agent)
        await agent.until("the three pods", lambda: all(w.index.candidates(ip) for ip in (w.p1, w.p2, w.p3)))
        yield w


async def test_gke05_each_pod_gets_its_own_service_accounts_token_and_email(world: World) -> None:
    agent = world.agent
    t1, t2, t3 = await world.token(world.p1), await world.token(world.p2), await world.token(world.p3)
    info1, info2, info3 = (agent.google.token_info(t) for t in (t1, t2, t3))
    assert info1 is not None and info1.email == GSA1
    assert info2 is not None and info2.email == GSA2
    assert info3 is not None and info3.principal.endswith(f"/subject/system:serviceaccount:{world.ns[3]}:sa3")
    assert (await agent.get(world.p1, SA_PATH + "email")).text == GSA1
    assert (await agent.get(world.p3, SA_PATH + "email")).text == f"{shipped_config()['project_id']}.svc.id.goog"
    listing = await agent.get(world.p2, "/computeMetadata/v1/instance/service-accounts/")
    assert listing.text == f"default/\n{GSA2}/\n"  # SA-01 per pod
    assert agent.metric("metaemu_pod_lookup_total", result="found") >= 5


async def test_gke06_unannotated_pod_gets_no_identity_token(world: World) -> None:
    agent = world.agent
    assert (await agent.get(world.p3, SA_PATH + "identity?audience=https://x.example")).status == 404
    ident = await agent.get(world.p1, SA_PATH + "identity?audience=https://x.example&format=full")
    assert ident.status == 200
    key = jwt.PyJWKSet.from_dict(agent.google.google_jwks()).keys[0]
    claims = jwt.decode(ident.text or "", key, algorithms=["RS256"], audience="https://x.example")
    assert claims["email"] == GSA1  # the pod's own Google account, signed by Google


async def test_sec08_sec13_sec14_unknown_elsewhere_node_and_loopback_get_403(world: World) -> None:
    agent = world.agent
    # An address no pod of this node has: one live lookup (the real server answers: nothing), and,
    # since no pod of the node is waiting for its address, the refusal at once (issue #11). The
    # node's own addresses are refused without a lookup.
    waits = {"169.254.30.250": 0, world.elsewhere_ip: 0, NODE_IP: 0, "127.0.0.1": 0}
    for peer, wait_s in waits.items():
        response, waited_s = await agent.drive(agent.get(peer, SA_PATH + "token"), step_s=0.25)
        assert response.status == 403, peer
        assert b"access_token" not in (response.body or b"")  # type: ignore[operator]
        assert waited_s == wait_s, peer
    assert agent.metric("metaemu_pod_lookup_total", result="host_network") == 2
    assert agent.metric("metaemu_pod_lookup_total", result="not_found") == 2
    lookups = [c for c in agent.kube.requests if c.endpoint == "list" and "status.podIP=" in c.query["fieldSelector"]]
    assert [c.query["fieldSelector"] for c in lookups] == [
        f"status.podIP={ip},spec.nodeName={agent.node}" for ip in ("169.254.30.250", world.elsewhere_ip)]


async def test_sec15_headers_and_parameters_never_change_identity(world: World) -> None:
    agent = world.agent
    spoof = {"X-Real-IP": world.p2, "Forwarded": f"for={world.p2}", "podname": "p2", "podns": world.ns[2]}
    token = await world.token(world.p1, f"?ip={world.p2}")
    response = await agent.get(world.p1, SA_PATH + "token", headers=spoof)
    assert json.loads(response.body)["access_token"] == token  # type: ignore[arg-type]
    info = agent.google.token_info(token)
    assert info is not None and info.email == GSA1
    assert (await agent.get(world.p1, SA_PATH + "token", headers={"X-Forwarded-For": world.p2})).status == 403


async def test_sec25_token_requests_are_exactly_audience_bound_to_the_calling_pod(world: World) -> None:
    agent = world.agent
    await world.token(world.p1)
    await world.token(world.p2)
    keys = jwt.PyJWKSet.from_dict(agent.cluster.jwks())
    seen = set()
    for token in agent.subject_tokens():  # what the real server issued, verified as STS does
        key = next(k for k in keys.keys if k.key_id == jwt.get_unverified_header(token)["kid"])
        claims = jwt.decode(token, key, algorithms=["RS256"], audience=agent.audience, issuer=ISSUER)
        assert claims["aud"] == [agent.audience]
        assert claims["exp"] - claims["iat"] <= 3600
        pod = claims["kubernetes.io"]["pod"]["name"]
        seen.add((claims["sub"], pod))
    # Each pod's credentials were prefetched when the watch saw it (issue #11), each token bound
    # to that pod: the same for p3, which never asked for a token.
    assert seen == {(f"system:serviceaccount:{world.ns[1]}:sa1", "p1"),
                    (f"system:serviceaccount:{world.ns[2]}:sa2", "p2"),
                    (f"system:serviceaccount:{world.ns[3]}:sa3", "p3")}
    for peer in (world.p1, world.p2, world.p3):  # no response is ever a cluster-issued JWT
        for path in ("token", "?recursive=true", "identity?audience=x", "email"):
            assert_no_jwt_from(ISSUER, (await agent.get(peer, SA_PATH + path)).text or "")


async def test_sec26_two_service_accounts_never_share_a_token_even_for_one_gsa(world: World) -> None:
    ip, _ = world.agent.workload(unique("ns5"), "p5", gsa=GSA1, sa="sa5")  # another KSA, same Google account
    await world.agent.until("p5", lambda: bool(world.index.candidates(ip)))
    assert await world.token(world.p1) != await world.token(ip)


async def test_sec34_per_pod_rate_limit_protects_the_neighbours(world: World) -> None:
    agent = world.agent
    statuses = [(await agent.get(world.p1, SA_PATH + "email")).status for _ in range(15)]
    assert statuses[:10] == [200] * 10  # the burst
    assert 429 in statuses[10:]
    limited = await agent.get(world.p1, SA_PATH + "email")
    assert limited.status == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert (await agent.get(world.p2, SA_PATH + "email")).status == 200  # another pod is unaffected
    assert agent.metric("metaemu_rate_limited_total") >= 1


async def test_sec11_two_pods_on_one_address_are_refused_not_guessed(world: World) -> None:
    agent = world.agent
    agent.workload(unique("ns7"), "twin", sa="sa7", ip=world.p1)
    await agent.until("the twin", lambda: len(world.index.candidates(world.p1)) == 2)
    response = await agent.get(world.p1, SA_PATH + "token")
    assert response.status == 503
    assert "Retry-After" in response.headers
    assert agent.metric("metaemu_pod_lookup_total", result="ambiguous") >= 1


async def test_sec36_api_outage_keeps_known_pods_served(world: World) -> None:
    agent = world.agent
    token = await world.token(world.p1)
    email = (await agent.get(world.p2, SA_PATH + "email")).text
    await agent.until("the prefetches", lambda: agent.metric("metaemu_pod_prefetches_total", result="started") == 3)
    await agent.advance(0)
    # A fourth pod whose service-account read does not get through before the outage.
    held = agent.kube.stall("get")
    p4, _ = agent.workload(unique("ns4"), "p4", sa="sa4")
    await agent.until("p4's account read", lambda: any(
        c.endpoint == "get" and c.path.endswith("/serviceaccounts/sa4") for c in agent.kube.requests))
    agent.cluster.stop_apiserver()
    try:
        held.set()
        await agent.until("p4's prefetch failed",
                          lambda: agent.metric("metaemu_pod_prefetches_total", result="failed") == 1)
        assert await world.token(world.p1) == token  # seen before the outage: cached, served from memory
        assert (await agent.get(world.p2, SA_PATH + "email")).text == email
        assert (await agent.get(world.p3, SA_PATH + "token")).status == 200  # never asked: prefetched (#11)
        unseen = await agent.get(p4, SA_PATH + "token")  # in the index, its account never read
        assert unseen.status == 503
        assert "Retry-After" in unseen.headers
        unknown, waited_s = await agent.drive(agent.get("169.254.30.251", SA_PATH + "token"))
        assert unknown.status == 503  # never a guess: the live lookup cannot be made
        assert unknown.headers["Retry-After"] == str(RETRY_AFTER_UNAVAILABLE_S)
        assert waited_s == 0  # refused at once: the connection to the API server is refused
        assert agent.metric("metaemu_pod_lookup_total", result="api_fallback") == 1
    finally:
        agent.cluster.start_apiserver()


async def test_sec35_concurrency_cap_refuses_predictably_and_recovers(cluster: KubeCluster, tmp_path: Path) -> None:
    async with started_agent(cluster, tmp_path, max_concurrent_requests=2) as agent:
        ip, _ = agent.workload(unique("ns1"), "p1", gsa=GSA1, sa="sa1")
        contexts = agent.server.components.contexts
        assert isinstance(contexts, NodeAgent)
        await agent.until("p1", lambda: bool(contexts.index.candidates(ip)))
        held = [asyncio.create_task(agent.get(ip, "/computeMetadata/v1/project/project-id?wait_for_change=true"
                                               "&timeout_sec=1")) for _ in range(2)]
        await agent.until("both long polls held", lambda: agent.metric("metaemu_long_polls_in_flight") == 2)
        busy = await agent.get(ip, SA_PATH + "email")
        assert busy.status == 503
        assert busy.headers["Retry-After"] == "1"
        assert not any(task.done() for task in held)
        await agent.advance(1)  # the long polls' timeout_sec, in virtual time
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
        assert (await agent.get(ip, SA_PATH + "email")).status == 200  # capacity is back


async def test_sec40_after_a_scripted_run_the_node_metrics_exist(world: World) -> None:
    agent = world.agent
    await world.token(world.p1)
    await world.token(world.p1)  # a cache hit
    await agent.get(world.p1, SA_PATH + "token?scopes=https://www.googleapis.com/auth/devstorage.read_only")  # miss
    await agent.drive(agent.get("169.254.30.252", SA_PATH + "token"))  # not_found
    await agent.get(NODE_IP, SA_PATH + "token")  # host_network
    await agent.get(world.p2, SA_PATH + "token", headers={"X-Forwarded-For": "1.2.3.4"})  # blocked
    for _ in range(12):
        await agent.get(world.p3, SA_PATH + "email")  # past the burst of 10: rate limited
    m = agent.metric
    assert m("metaemu_requests_total", route="/computeMetadata/v1/instance/service-accounts/{account}/token",
             code="200") == 3
    for result in ("found", "not_found", "host_network"):
        assert m("metaemu_pod_lookup_total", result=result) >= 1, result
    assert m("metaemu_token_cache_total", kind="access_token", result="hit") >= 1
    assert m("metaemu_token_cache_total", kind="access_token", result="miss") >= 1
    for backend in ("k8s", "sts", "iam"):
        assert m("metaemu_upstream_request_duration_seconds_count", backend=backend) >= 1, backend
    assert m("metaemu_blocked_requests_total", reason="xff") == 1
    assert m("metaemu_rate_limited_total") >= 1
    assert m("metaemu_pod_watch_synced") == 1
    assert m("metaemu_service_account_watch_synced") == 1
    assert m("metaemu_pod_prefetches_total", result="started") == 3
    assert m("metaemu_build_info", version=__version__) == 1


async def test_sec02_the_agent_clears_only_its_own_nodes_startup_taint(cluster: KubeCluster, tmp_path: Path) -> None:
    other = unique("node-other")
    cluster.node(other, taints=[STARTUP_TAINT])
    async with started_agent(cluster, tmp_path, taints=[STARTUP_TAINT]) as agent:  # returns once ready
        await agent.until("the taint removed", lambda: agent.metric("metaemu_startup_taint_cleared") == 1,
                          advance_s=READY_POLL_S)
        assert agent.metric("metaemu_pod_watch_synced") == 1
        mine = cluster.ok("GET", f"/api/v1/nodes/{agent.node}")["spec"]["taints"]
        assert STARTUP_TAINT["key"] not in {t["key"] for t in mine}
        theirs = cluster.ok("GET", f"/api/v1/nodes/{other}")["spec"]["taints"]
        assert STARTUP_TAINT in theirs


async def test_sec02_without_a_startup_taint_configured_the_node_is_left_alone(cluster: KubeCluster,
                                                                               tmp_path: Path) -> None:
    async with started_agent(cluster, tmp_path, taints=[STARTUP_TAINT], startup_taint="") as agent:
        ip, _ = agent.workload(unique("ns1"), "p1", gsa=GSA1, sa="sa1")
        contexts = agent.server.components.contexts
        assert isinstance(contexts, NodeAgent)
        await agent.until("p1", lambda: bool(contexts.index.candidates(ip)))
        await agent.token_for(ip)
        assert "startup_taint_clearer" not in {t.get_name() for t in asyncio.all_tasks()}
        taints = cluster.ok("GET", f"/api/v1/nodes/{agent.node}")["spec"]["taints"]
        assert STARTUP_TAINT in taints
        assert agent.metric("metaemu_startup_taint_cleared") == 0
