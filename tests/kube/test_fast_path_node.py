"""The fast path in node mode (issue #12), on the real test bed: the caller's identity for a peer
address is the full path's memo, dropped by the pod watch, so pods are served from the fast path
and cannot tell it from the full handler; IP reuse, a deleted pod, a changed annotation and the
per-pod rate limit are decided exactly as the full path decides them.

Each request is sent on a new connection from the pod's address (``exchange``: the agent's own
connection protocols, the peer reported where the kernel's would be) once through the fast path
and once through the full path alone, on one agent: answers must be byte-identical but ``Date``,
and every counter must move by the same amounts.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from metaemu.pods.agent import ACCOUNT_PREFETCH_S, NodeAgent
from metaemu.pods.service_accounts import TTL_S
from tests.kube.agent import GSA_ANNOTATION, Agent, exchange, shipped_config, started_agent, unique
from tests.kube.cluster import KubeCluster
from tests.server.test_fast_path_differential import FIELD_SHAPES, get

pytestmark = pytest.mark.kube

GSA1 = "one@demo-project.iam.gserviceaccount.com"
GSA2 = "two@demo-project.iam.gserviceaccount.com"
SA = "/computeMetadata/v1/instance/service-accounts/"
NODE_IP = "169.254.29.1"
AUDIENCE = "https://fast.example/aud"
_DATE = re.compile(rb"\r\nDate: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r\n")
COUNTED = re.compile(r".*(_total|_count)$")


@dataclass
class Node:
    agent: Agent
    namespace: str
    p1: str  # annotated with GSA1
    p2: str  # not annotated: the federated principal

    @property
    def contexts(self) -> NodeAgent:
        contexts = self.agent.server.components.contexts
        assert isinstance(contexts, NodeAgent)
        return contexts

    @property
    def served(self) -> int:
        fast = self.agent.server.components.fast
        assert fast is not None
        return fast.served


@pytest.fixture
async def node(cluster: KubeCluster, tmp_path: Path) -> AsyncIterator[Node]:
    async with started_agent(cluster, tmp_path, rate_limit_per_second=1000, rate_limit_burst=100_000) as agent:
        namespace = unique("fast")
        p1, _ = agent.workload(namespace, "p1", gsa=GSA1, sa="sa1")
        p2, _ = agent.workload(namespace, "p2", sa="sa2")
        world = Node(agent, namespace, p1, p2)
        await agent.until("both pods", lambda: all(world.contexts.index.candidates(ip) for ip in (p1, p2)))
        yield world


def counters(agent: Agent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in agent.server.metrics.registry.collect() for s in family.samples if COUNTED.match(s.name)}


def moved(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


async def assert_same(agent: Agent, peer: str, data: bytes) -> bytes:
    """The answer of the fast path to ``data`` from ``peer``, having checked that the full path
    gives the same one and moves every counter the same."""
    c0 = counters(agent)
    fast = await exchange(agent, peer, data)
    c1 = counters(agent)
    full = await exchange(agent, peer, data, fast_path=False)
    c2 = counters(agent)
    assert _DATE.sub(b"\r\n", fast) == _DATE.sub(b"\r\n", full), (peer, data)
    assert moved(c0, c1) == moved(c1, c2), (peer, data)
    return fast


def annotate_sa1(node: Node, gsa: str) -> None:
    """Point sa1 at ``gsa`` (which Google lets it impersonate), as an admin would."""
    agent = node.agent
    agent.google.add_service_account(gsa)
    agent.google.grant(gsa, agent.google.principal_for(agent.audience, f"system:serviceaccount:{node.namespace}:sa1"))
    agent.cluster.ok("PATCH", f"/api/v1/namespaces/{node.namespace}/serviceaccounts/sa1",
                     {"metadata": {"annotations": {GSA_ANNOTATION: gsa}}}, content_type="application/merge-patch+json")


def corpus(email: str) -> list[bytes]:
    paths = [f"{SA}default/token", f"{SA}default/email", f"{SA}default/", f"{SA}default/scopes",
             f"{SA}{email}/email", f"{SA}{email}/token", f"{SA}", "/computeMetadata/v1/project/project-id",
             "/computeMetadata/v1/project/numeric-project-id", "/computeMetadata/v1/instance/zone", "/",
             f"{SA}default/identity?audience={AUDIENCE}", f"{SA}default/identity?audience={AUDIENCE}&format=full",
             f"{SA}default/token?scopes=a,b", "/computeMetadata/v1/instance/nonexistent"]
    return [get(path, fields) for path in paths for fields in FIELD_SHAPES[:12]]


async def warm(agent: Agent, peer: str, requests: list[bytes]) -> None:
    """Every request once through the full path, and what that set off in the background (a new
    principal's first exchanges) finished: counters then move only for the requests compared."""
    for data in requests:
        await exchange(agent, peer, data, fast_path=False)
    await agent.advance(0)


async def test_pods_are_served_by_the_fast_path_exactly_as_by_the_full_handler(node: Node) -> None:
    agent = node.agent
    for peer, email in ((node.p1, GSA1), (node.p2, f"{shipped_config()['project_id']}.svc.id.goog")):
        requests = corpus(email)
        await warm(agent, peer, requests)
        before = node.served
        for data in requests:
            await assert_same(agent, peer, data)
        assert node.served - before >= 40, peer  # most plain shapes were the fast path's
    for peer in ("169.254.30.77", NODE_IP, "127.0.0.1"):  # no pod of ours: the same refusals
        for data in corpus(GSA1)[:3]:
            answer = await assert_same(agent, peer, data)
            assert answer.startswith(b"HTTP/1.1 403 "), answer


async def test_a_deleted_pod_and_a_reused_address_are_decided_by_the_watch(node: Node) -> None:
    agent, index = node.agent, node.contexts.index
    email = get(f"{SA}default/email")
    await warm(agent, node.p1, [email])
    assert (await assert_same(agent, node.p1, email)).endswith(GSA1.encode())
    served = node.served
    assert (await exchange(agent, node.p1, email)).endswith(GSA1.encode())
    assert node.served == served + 1  # remembered: the fast path's
    agent.cluster.delete_pod(node.namespace, "p1")
    await agent.until("the deletion", lambda: not index.candidates(node.p1))
    assert (await assert_same(agent, node.p1, email)).startswith(b"HTTP/1.1 403 ")
    agent.cluster.service_account(node.namespace, "sa3")
    agent.cluster.pod(node.namespace, "p3", node=agent.node, service_account="sa3", ip=node.p1,
                      host_ip=NODE_IP)
    await agent.until("the new pod", lambda: bool(index.candidates(node.p1)))
    await warm(agent, node.p1, [email])  # the full path identifies the new pod (and remembers it)
    served = node.served
    pool = f"{shipped_config()['project_id']}.svc.id.goog".encode()
    assert (await assert_same(agent, node.p1, email)).endswith(b"\r\n\r\n" + pool)
    assert node.served == served + 1
    token = json.loads((await exchange(agent, node.p1, get(f"{SA}default/token"))).split(b"\r\n\r\n", 1)[1])
    info = agent.google.token_info(token["access_token"])
    assert info is not None and info.email is None  # the old pod's Google account is never served
    assert info.principal.endswith(f"/subject/system:serviceaccount:{node.namespace}:sa3")


async def test_an_annotation_change_arrives_as_an_event_and_applies_from_the_next_request(node: Node) -> None:
    """Issue #11: the service-account watch delivers the change (no virtual time passes, no re-read
    is due); the next request on either path serves the new account, and the old account's
    principal is retired at once, so none of its tokens is served again."""
    agent = node.agent
    email = get(f"{SA}default/email")
    await warm(agent, node.p1, [email])
    assert (await exchange(agent, node.p1, email)).endswith(GSA1.encode())
    started = agent.clock.monotonic()
    annotate_sa1(node, GSA2)
    await agent.until("the change", lambda: gsa_of_sa1(node) == GSA2)
    assert not any(k.gsa_email == GSA1 for k in node.contexts.principal_keys())
    assert (await exchange(agent, node.p1, email)).endswith(GSA2.encode())  # the very next request
    await warm(agent, node.p1, [email])
    assert (await assert_same(agent, node.p1, email)).endswith(GSA2.encode())
    token = json.loads((await exchange(agent, node.p1, get(f"{SA}default/token"))).split(b"\r\n\r\n", 1)[1])
    info = agent.google.token_info(token["access_token"])
    assert info is not None and info.email == GSA2
    assert agent.clock.monotonic() == started  # an event, not a TTL


def gsa_of_sa1(node: Node) -> str | None:
    found = node.contexts.accounts.peek(node.namespace, "sa1")
    return found[0].gsa_email if found else None


async def watch_down(agent: Agent) -> None:
    """The service-account watch breaks and cannot reconnect: records age by their TTL from now."""
    agent.kube.fail("sa_watch", status_code=500, times=10_000)
    agent.kube.break_watches("sa_watch")
    await agent.until("the watch down", lambda: agent.kube.watches("sa_watch") == 0)


async def test_the_per_pod_rate_limit_holds_on_the_fast_path(cluster: KubeCluster, tmp_path: Path) -> None:
    async with started_agent(cluster, tmp_path, rate_limit_per_second=5, rate_limit_burst=4) as agent:
        ip, _ = agent.workload(unique("ns"), "p", gsa=GSA1, sa="sa")
        contexts = agent.server.components.contexts
        assert isinstance(contexts, NodeAgent)
        await agent.until("the pod", lambda: bool(contexts.index.candidates(ip)))
        email = get(f"{SA}default/email")
        answers = [await exchange(agent, ip, email) for _ in range(6)]  # virtual time stands still
        assert [a.split(b" ", 2)[1] for a in answers] == [b"200"] * 4 + [b"429"] * 2
        assert agent.metric("metaemu_rate_limited_total") == 2
        fast = agent.server.components.fast
        assert fast is not None and fast.served == 3  # the first was the full path's (and remembered)
        assert b"\r\nRetry-After: 1\r\n" in answers[-1]


async def test_a_served_pods_account_is_read_again_before_it_is_due_and_a_change_applies(node: Node) -> None:
    """While the service-account watch is down, the fast path re-reads a served pod's service
    account shortly before its record is due, so its connections never wait on (or move to the
    full path for) that read; a change the read finds applies from the next request."""
    agent = node.agent
    email = get(f"{SA}default/email")
    await warm(agent, node.p1, [email])
    await watch_down(agent)

    def reads() -> int:
        return sum(1 for c in agent.kube.requests if c.endpoint == "get" and "/serviceaccounts/sa1" in c.path)

    before, served = reads(), node.served
    await agent.advance(TTL_S - ACCOUNT_PREFETCH_S + 1)  # inside the prefetch window, not yet due
    assert (await exchange(agent, node.p1, email)).endswith(GSA1.encode())
    await agent.advance(0)  # the read it set off
    assert reads() == before + 1
    read_at = agent.clock.monotonic()
    await agent.advance(ACCOUNT_PREFETCH_S)  # past the old record's due time: the new one is fresh
    assert (await exchange(agent, node.p1, email)).endswith(GSA1.encode())
    assert node.served == served + 2 and reads() == before + 1  # both answered fast, no read waited on
    annotate_sa1(node, GSA2)
    await agent.advance(read_at + TTL_S - ACCOUNT_PREFETCH_S + 1 - agent.clock.monotonic())  # the window again
    assert (await exchange(agent, node.p1, email)).endswith(GSA1.encode())  # the read is set off
    await agent.advance(0)
    assert (await exchange(agent, node.p1, email)).endswith(GSA2.encode())  # the change, from the next request
    await warm(agent, node.p1, [email])  # (the new principal's first exchanges finished)
    assert (await assert_same(agent, node.p1, email)).endswith(GSA2.encode())
