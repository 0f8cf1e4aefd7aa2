"""Node mode through the real handler, NodeAgent, pod watch and pipelines, against the Kubernetes
and Google stand-ins (the Kubernetes one over a loopback socket). The only identity input is the TCP
peer address, set here on the request's transport exactly where the kernel's report would be; the
network-namespace tests (tests/kube/test_simulated_node.py) do the same with real pod addresses.

Named after security.md's cases: SEC-08..SEC-15, SEC-25, SEC-26, SEC-34, SEC-36; GKE-05, GKE-06.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from metaemu import __version__
from metaemu.config import parse_config
from metaemu.server.runner import MetaemuServer
from metaemu.testing.node_world import NodeWorld
from metaemu.testing.world import AUDIENCE, CLUSTER_ISSUER, PROJECT_ID, PROJECT_NUMBER
from tests.helpers import FLAVOR, SA_PATH, assert_no_jwt_from, sample

NODE = "node-1"
NODE_IP = "169.254.20.1"
P1, P2, P3 = "169.254.20.11", "169.254.20.12", "169.254.20.13"
GSA1 = "one@demo-project.iam.gserviceaccount.com"
GSA2 = "two@demo-project.iam.gserviceaccount.com"


@dataclass
class Node:
    world: NodeWorld
    server: MetaemuServer

    async def get(self, peer: str, path: str, headers: dict[str, str] | None = None) -> web.Response:
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda key, default=None: (peer, 40000) if key == "peername" else default
        request = make_mocked_request("GET", path, headers={"Host": "169.254.169.254", **FLAVOR, **(headers or {})},
                                      transport=transport)
        return await self.server.components.handler(request)

    async def token(self, peer: str, query: str = "") -> str:
        response = await self.get(peer, SA_PATH + "token" + query)
        assert response.status == 200, response.text
        return str(json.loads(response.body)["access_token"])  # type: ignore[arg-type]

    def metric(self, name: str, **labels: str) -> float:
        return sample(self.server.metrics, name, **labels)

    async def watch_sees(self, condition: str, predicate: object) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not predicate():  # type: ignore[operator]
            assert loop.time() < deadline, f"the pod watch never saw {condition}"
            await asyncio.sleep(0.01)  # the watch stream is a real socket


@contextlib.asynccontextmanager
async def started_node(tmp_path: Path, world: NodeWorld, **node_config: object) -> AsyncIterator[Node]:
    """metaemu in node mode against ``world``'s Kubernetes stand-in (on a loopback socket)."""
    runner = web.AppRunner(world.kube.app(), shutdown_timeout=0.5)  # open watch streams: do not wait 60 s
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    kubeconfig = world.kube.kubeconfig(tmp_path / "kubeconfig", server=f"http://127.0.0.1:{runner.addresses[0][1]}")
    config = parse_config({
        "mode": "node", "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "project_id": PROJECT_ID,
        "numeric_project_id": PROJECT_NUMBER,
        "node": {"name": NODE, "audience": AUDIENCE, "kubeconfig": str(kubeconfig), "host_addresses": [NODE_IP],
                 **node_config},
        "endpoints": {"sts": "http://sts.test/v1/token", "iam_credentials": "http://iam.test/v1"},
    }, hostname=NODE, base_dir=tmp_path)
    server = MetaemuServer(config, http=world.google.client())
    await server.start()
    started = Node(world, server)
    try:
        await started.watch_sees("the first list", lambda: server.components.contexts.ready() is None)
        yield started
    finally:
        await server.stop()
        await runner.cleanup()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    world = NodeWorld(node_name=NODE)
    world.add_pod({"namespace": "a", "name": "p1", "service_account": "sa1", "ip": P1, "gsa": GSA1})
    world.add_pod({"namespace": "b", "name": "p2", "service_account": "sa2", "ip": P2, "gsa": GSA2})
    world.add_pod({"namespace": "c", "name": "p3", "service_account": "sa3", "ip": P3})  # not annotated
    world.kube.add_pod("d", "elsewhere", node="node-2", ips=["169.254.20.99"], service_account="sa4")
    async with started_node(tmp_path, world, rate_limit_per_second=5, rate_limit_burst=10) as started:
        yield started


async def test_gke05_each_pod_gets_its_own_service_accounts_token_and_email(node: Node) -> None:
    t1, t2, t3 = await node.token(P1), await node.token(P2), await node.token(P3)
    info1, info2, info3 = (node.world.google.token_info(t) for t in (t1, t2, t3))
    assert info1 is not None and info1.email == GSA1
    assert info2 is not None and info2.email == GSA2
    assert info3 is not None and info3.principal.endswith("/subject/system:serviceaccount:c:sa3")  # federated
    assert (await node.get(P1, SA_PATH + "email")).text == GSA1
    assert (await node.get(P3, SA_PATH + "email")).text == f"{PROJECT_ID}.svc.id.goog"
    listing = await node.get(P2, "/computeMetadata/v1/instance/service-accounts/")
    assert listing.text == f"default/\n{GSA2}/\n"  # SA-01 per pod
    assert node.metric("metaemu_pod_lookup_total", result="found") >= 5


async def test_gke06_unannotated_pod_gets_no_identity_token(node: Node) -> None:
    response = await node.get(P3, SA_PATH + "identity?audience=https://x.example")
    assert response.status == 404
    ident = await node.get(P1, SA_PATH + "identity?audience=https://x.example&format=full")
    assert ident.status == 200
    key = jwt.PyJWKSet.from_dict(node.world.google.google_jwks()).keys[0]
    claims = jwt.decode(ident.text or "", key, algorithms=["RS256"], audience="https://x.example")
    assert claims["email"] == GSA1  # the pod's own Google account, signed by Google


async def test_sec08_unknown_address_gets_403_and_no_token(node: Node) -> None:
    response = await node.get("169.254.20.77", SA_PATH + "token")
    assert response.status == 403
    assert b"access_token" not in (response.body or b"")  # type: ignore[operator]
    assert node.metric("metaemu_pod_lookup_total", result="not_found") == 1


async def test_sec13_pod_on_another_node_is_unknown_here(node: Node) -> None:
    assert (await node.get("169.254.20.99", SA_PATH + "token")).status == 403


async def test_sec14_node_address_and_loopback_get_403(node: Node) -> None:
    for peer in (NODE_IP, "127.0.0.1"):
        response = await node.get(peer, SA_PATH + "token")
        assert response.status == 403
    assert node.metric("metaemu_pod_lookup_total", result="host_network") == 2


async def test_sec15_headers_and_parameters_never_change_identity(node: Node) -> None:
    spoof = {"X-Real-IP": P2, "Forwarded": f"for={P2}", "podname": "p2", "podns": "b"}
    token = await node.token(P1, f"?ip={P2}")
    response = await node.get(P1, SA_PATH + "token", headers=spoof)
    assert json.loads(response.body)["access_token"] == token  # type: ignore[arg-type]
    info = node.world.google.token_info(token)
    assert info is not None and info.email == GSA1
    assert (await node.get(P1, SA_PATH + "token", headers={"X-Forwarded-For": P2})).status == 403


async def test_sec25_token_request_is_exactly_audience_bound_to_the_calling_pod(node: Node) -> None:
    await node.token(P1)
    await node.token(P2)
    requests = node.world.kube.token_requests
    assert {(r.namespace, r.service_account) for r in requests} == {("a", "sa1"), ("b", "sa2")}
    for r in requests:
        assert r.audiences == (AUDIENCE,)
        assert r.bound_kind == "Pod"
        assert r.bound_name == {"sa1": "p1", "sa2": "p2"}[r.service_account]
        assert r.expiration_s is not None and r.expiration_s <= 3600
        assert r.status == 201
    for peer in (P1, P2, P3):  # no response is ever a cluster-issued JWT
        for path in ("token", "?recursive=true", "identity?audience=x", "email"):
            assert_no_jwt_from(CLUSTER_ISSUER, (await node.get(peer, SA_PATH + path)).text or "")


async def test_sec26_two_service_accounts_never_share_a_token_even_for_one_gsa(node: Node) -> None:
    node.world.add_pod({"namespace": "e", "name": "p5", "service_account": "sa5", "ip": "169.254.20.15",
                        "gsa": GSA1})  # another KSA annotated with the same Google account
    await node.watch_sees("p5", lambda: node.world.kube.store.pods and
                          node.server.components.contexts.index.candidates("169.254.20.15"))  # type: ignore[union-attr]
    assert await node.token(P1) != await node.token("169.254.20.15")


async def test_sec34_per_pod_rate_limit_protects_the_neighbours(node: Node) -> None:
    statuses = [(await node.get(P1, SA_PATH + "email")).status for _ in range(15)]
    assert statuses[:10] == [200] * 10  # the burst
    assert 429 in statuses[10:]
    limited = await node.get(P1, SA_PATH + "email")
    assert limited.status == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert (await node.get(P2, SA_PATH + "email")).status == 200  # another pod is unaffected
    assert node.metric("metaemu_rate_limited_total") >= 1


async def test_sec10_sec12_deleted_pod_is_refused_and_a_reused_address_waits_for_its_new_pod(node: Node) -> None:
    index = node.server.components.contexts.index  # type: ignore[union-attr]
    await node.token(P2)
    node.world.kube.delete_pod("b", "p2", grace_period_s=30)  # terminating: not a candidate any more
    await node.watch_sees("p2 terminating", lambda: not index.candidates(P2))
    assert (await node.get(P2, SA_PATH + "token")).status in (403, 503)
    node.world.add_pod({"namespace": "f", "name": "p6", "service_account": "sa6", "ip": P2})  # address reused
    await node.watch_sees("p6", lambda: bool(index.candidates(P2)))
    token = await node.token(P2)
    info = node.world.google.token_info(token)
    assert info is not None and info.principal.endswith("/subject/system:serviceaccount:f:sa6")


async def test_sec11_two_pods_on_one_address_are_refused_not_guessed(node: Node) -> None:
    index = node.server.components.contexts.index  # type: ignore[union-attr]
    node.world.add_pod({"namespace": "g", "name": "twin", "service_account": "sa7", "ip": P1})
    await node.watch_sees("the twin", lambda: len(index.candidates(P1)) == 2)
    response = await node.get(P1, SA_PATH + "token")
    assert response.status == 503
    assert "Retry-After" in response.headers
    assert node.metric("metaemu_pod_lookup_total", result="ambiguous") >= 1


async def test_sec36_api_outage_keeps_known_pods_served(node: Node) -> None:
    token = await node.token(P1)
    email = (await node.get(P2, SA_PATH + "email")).text
    node.world.kube.outage()
    assert await node.token(P1) == token  # seen before the outage: cached, served from memory
    assert (await node.get(P2, SA_PATH + "email")).text == email
    unseen = await node.get(P3, SA_PATH + "token")  # in the index, but its account was never fetched
    assert unseen.status == 503
    assert "Retry-After" in unseen.headers
    unknown = await node.get("169.254.20.50", SA_PATH + "token")
    assert unknown.status in (403, 503)  # never a guess
    node.world.kube.restore()


async def test_sec35_concurrency_cap_refuses_predictably_and_recovers(tmp_path: Path) -> None:
    world = NodeWorld(node_name=NODE)
    world.add_pod({"namespace": "a", "name": "p1", "service_account": "sa1", "ip": P1, "gsa": GSA1})
    async with started_node(tmp_path, world, max_concurrent_requests=2) as node:
        held = [asyncio.create_task(node.get(P1, "/computeMetadata/v1/project/project-id?wait_for_change=true"
                                              "&timeout_sec=1")) for _ in range(2)]
        await asyncio.sleep(0.05)  # both long polls are now held by the handler
        busy = await node.get(P1, SA_PATH + "email")
        assert busy.status == 503
        assert busy.headers["Retry-After"] == "1"
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
        assert (await node.get(P1, SA_PATH + "email")).status == 200  # capacity is back


async def test_sec40_after_a_scripted_run_the_node_metrics_exist(node: Node) -> None:
    await node.token(P1)
    await node.token(P1)  # a cache hit
    await node.get("169.254.20.77", SA_PATH + "token")  # not_found
    await node.get(NODE_IP, SA_PATH + "token")  # host_network
    await node.get(P2, SA_PATH + "token", headers={"X-Forwarded-For": "1.2.3.4"})  # blocked
    for _ in range(12):
        await node.get(P3, SA_PATH + "email")  # past the burst of 10: rate limited
    m = node.metric
    assert m("metaemu_requests_total", route="/computeMetadata/v1/instance/service-accounts/{account}/token",
             code="200") == 2
    for result in ("found", "not_found", "host_network"):
        assert m("metaemu_pod_lookup_total", result=result) >= 1, result
    assert m("metaemu_token_cache_total", kind="access_token", result="hit") >= 1
    assert m("metaemu_token_cache_total", kind="access_token", result="miss") >= 1
    for backend in ("k8s", "sts", "iam"):
        assert m("metaemu_upstream_request_duration_seconds_count", backend=backend) >= 1, backend
    assert m("metaemu_blocked_requests_total", reason="xff") == 1
    assert m("metaemu_rate_limited_total") >= 1
    assert m("metaemu_pod_watch_synced") == 1
    assert m("metaemu_build_info", version=__version__) == 1


STARTUP_TAINT = {"key": "metaemu.dev/agent-not-ready", "value": "true", "effect": "NoSchedule"}


async def test_sec02_the_agent_clears_only_its_own_nodes_startup_taint_once_ready(tmp_path: Path) -> None:
    world = NodeWorld(node_name=NODE)
    world.kube.add_node(NODE, taints=[STARTUP_TAINT])
    world.kube.add_node("node-2", taints=[STARTUP_TAINT])
    world.add_pod({"namespace": "a", "name": "p1", "service_account": "sa1", "ip": P1, "gsa": GSA1})
    async with started_node(tmp_path, world) as node:  # returns once ready() holds
        await node.watch_sees("the taint removed", lambda: world.kube.node_taints(NODE) == [])
        [patch] = world.kube.node_patches
        assert patch.node == NODE and patch.status == 200
        assert world.kube.node_taints("node-2") == [STARTUP_TAINT]
        assert node.metric("metaemu_startup_taint_cleared") == 1
        assert node.metric("metaemu_pod_watch_synced") == 1


async def test_sec02_without_a_startup_taint_configured_nodes_are_never_read(tmp_path: Path) -> None:
    world = NodeWorld(node_name=NODE)
    world.kube.add_node(NODE, taints=[STARTUP_TAINT])
    world.add_pod({"namespace": "a", "name": "p1", "service_account": "sa1", "ip": P1, "gsa": GSA1})
    async with started_node(tmp_path, world, startup_taint="") as node:
        await node.token(P1)
        assert "startup_taint_clearer" not in {t.get_name() for t in asyncio.all_tasks()}
        assert world.kube.calls["node_get"] == world.kube.calls["node_patch"] == 0
        assert world.kube.node_taints(NODE) == [STARTUP_TAINT]
        assert node.metric("metaemu_startup_taint_cleared") == 0


def test_the_readme_node_metrics_table_names_only_metrics_node_mode_exports() -> None:
    """Every metric the README's node-mode table documents is one the agent registers."""
    import re

    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from metaemu.metrics import create_metrics
    from metaemu.node_setup import create_interception_metrics
    from metaemu.pods.pod_metrics import create_pod_metrics
    from metaemu.pods.startup_taint import create_startup_taint_metrics

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("Node mode adds"):readme.index("### Alerts and runbooks")]
    documented = set(re.findall(r"^\| `(metaemu_[a-z_]+)", table, flags=re.M))
    metrics = create_metrics()
    create_pod_metrics(metrics.registry)
    create_interception_metrics(metrics.registry)
    create_startup_taint_metrics(metrics.registry)
    exported = {f.name for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    exported |= {f"{name}_total" for name in exported}  # counters' sample names
    assert len(documented) == 8
    assert documented <= exported, documented - exported
