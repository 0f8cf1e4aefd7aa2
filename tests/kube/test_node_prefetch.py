"""Credentials before the first request, and refusals without a wait (issue #11), on the real
kube-apiserver: a pod the watch sees with its address has its token exchanged before it asks; a
first request during that exchange joins it; a pod gone before its account is read drops its
prefetch; an unknown caller is refused at once unless a pod of the node still awaits its address.
Agent time is virtual (``Agent.drive`` reports how much of it a request waited)."""

from __future__ import annotations

import asyncio

import pytest

from metaemu.pods.identity import NEW_POD_WAIT_S
from tests.helpers import SA_PATH
from tests.kube.agent import Agent, agent_of, unique

pytestmark = pytest.mark.kube

GSA = "app@my-project.iam.gserviceaccount.com"


def exchanges(agent: Agent) -> tuple[int, int]:
    """(STS exchanges, generateAccessToken calls) the Google stand-in has answered."""
    return (sum(1 for r in agent.google.requests if r.endpoint == "sts"),
            sum(1 for r in agent.google.requests if r.endpoint == "generateAccessToken"))


async def test_a_pod_the_watch_sees_has_its_token_before_its_first_request(agent: Agent) -> None:
    ip, _ = agent.workload(unique("apps"), "web", gsa=GSA)
    await agent.until("the prefetch", lambda: agent.metric("metaemu_pod_prefetches_total", result="started") == 1)
    await agent.advance(0)
    assert exchanges(agent) == (1, 1)  # before any request
    response, waited_s = await agent.drive(agent.get(ip, SA_PATH + "token"))
    assert response.status == 200 and waited_s == 0
    assert exchanges(agent) == (1, 1)  # served from memory
    assert agent.metric("metaemu_token_cache_total", kind="access_token", result="miss") == 0
    info = agent.google.token_info(await agent.token_for(ip))
    assert info is not None and info.email == GSA


async def test_a_pods_later_updates_start_no_further_prefetch(agent: Agent) -> None:
    """Kubelet's status updates and label changes arrive as MODIFIED events: not news to prefetch."""
    namespace = unique("apps")
    _, uid = agent.workload(namespace, "web", gsa=GSA)
    index = agent_of(agent).index
    await agent.until("the prefetch", lambda: agent.metric("metaemu_pod_prefetches_total", result="started") == 1)
    before = index.pod(uid)
    assert before is not None
    agent.cluster.ok("PATCH", f"/api/v1/namespaces/{namespace}/pods/web", {"metadata": {"labels": {"v": "2"}}},
                     content_type="application/merge-patch+json")
    await agent.until("the update", lambda: (p := index.pod(uid)) is not None
                      and p.resource_version != before.resource_version)
    await agent.advance(0)
    assert [agent.metric("metaemu_pod_prefetches_total", result=r) for r in ("started", "cached")] == [1, 0]


async def test_a_first_request_during_the_exchange_joins_it(agent: Agent) -> None:
    held = agent.google.stall("sts")
    ip, _ = agent.workload(unique("apps"), "web", gsa=GSA)
    await agent.until("the exchange", lambda: exchanges(agent)[0] == 1)
    first = asyncio.ensure_future(agent.get(ip, SA_PATH + "token"))
    await agent.advance(0)
    assert not first.done()  # waiting on the exchange in flight, not starting its own
    held.set()
    response = await first
    assert response.status == 200
    assert exchanges(agent) == (1, 1)


async def test_a_pod_gone_before_its_account_is_read_drops_its_prefetch(agent: Agent) -> None:
    namespace = unique("apps")
    held = agent.kube.stall("get")
    ip, _ = agent.workload(namespace, "web", gsa=GSA)
    index = agent_of(agent).index
    await agent.until("the account read", lambda: any(
        c.endpoint == "get" and c.path.endswith("/serviceaccounts/app") for c in agent.kube.requests))
    agent.cluster.delete_pod(namespace, "web")
    await agent.until("the deletion", lambda: not index.candidates(ip))
    held.set()
    await agent.advance(0)
    assert agent.metric("metaemu_pod_prefetches_total", result="cancelled") == 1
    assert agent.metric("metaemu_pod_prefetches_total", result="started") == 0
    assert exchanges(agent) == (0, 0)


async def test_an_unknown_caller_waits_only_while_a_pod_of_the_node_awaits_its_address(agent: Agent) -> None:
    """SEC-09 keeps its grace for a pod whose containers run before kubelet posts its address; with
    no such pod, nothing the watch could deliver would be the caller, so it is refused at once."""
    namespace = unique("apps")
    refused, waited_s = await agent.drive(agent.get("169.254.30.201", SA_PATH + "token"))
    assert (refused.status, waited_s) == (403, 0)
    agent.cluster.service_account(namespace, "app")
    agent.cluster.pod(namespace, "starting", node=agent.node, service_account="app")  # no address yet
    index = agent_of(agent).index
    await agent.until("the starting pod", index.awaiting_addresses)
    refused, waited_s = await agent.drive(agent.get("169.254.30.202", SA_PATH + "token"))
    assert (refused.status, waited_s) == (403, NEW_POD_WAIT_S)
    agent.cluster.pod_status(namespace, "starting", ip="169.254.30.203", host_ip="169.254.29.1")
    await agent.until("its address", lambda: not index.awaiting_addresses())
    refused, waited_s = await agent.drive(agent.get("169.254.30.204", SA_PATH + "token"))
    assert (refused.status, waited_s) == (403, 0)


async def test_warm_returns_only_once_every_pods_exchange_has_ended(agent: Agent) -> None:
    """What a successor agent waits for before it listens (issue #11): the watch synced and each
    pod's prefetched exchange finished, failed ones included; cancelling the wait cancels none."""
    node_agent = agent_of(agent)
    held = agent.google.stall("sts")
    agent.workload(unique("apps"), "web", gsa=GSA)
    await agent.until("the exchange", lambda: exchanges(agent)[0] == 1)
    warm = asyncio.ensure_future(node_agent.warm())
    await agent.advance(0)
    assert not warm.done()  # the exchange is still in flight
    abandoned = asyncio.ensure_future(node_agent.warm())
    await agent.advance(0)
    abandoned.cancel()  # a successor giving up after WARM_TIMEOUT_S
    await agent.advance(0)
    held.set()
    await agent.until("warm", warm.done)
    assert warm.result() is None
    assert exchanges(agent) == (1, 1)  # the exchange the cancelled wait watched still completed
    assert agent.metric("metaemu_refresh_total", kind="access_token", result="success") == 1
