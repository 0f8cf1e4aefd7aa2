"""metaemu's KubeClient against the real kube-apiserver, as the agent (its pod-bound token under
manifests/node's RBAC and policies): TokenRequest (SEC-25), the server's errors kept with their
Status bodies, list and watch of pods and service accounts, and 410 Gone for a compacted
resourceVersion. (Moved here from the Kubernetes stand-in, issue #10; tests/pods keeps what needs a
controllable clock or injected faults.)
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from metaemu.clock import SystemClock
from metaemu.errors import UpstreamError
from metaemu.metrics import Metrics, create_metrics
from metaemu.pods.kube_client import KubeClient, KubeConnection, WatchEvent
from metaemu.pods.stream import KubeHttp
from tests.helpers import sample
from tests.kube.agent import agent_token, shipped_config, unique
from tests.kube.cluster import ISSUER, KubeCluster

pytestmark = pytest.mark.kube


class Client:
    def __init__(self, cluster: KubeCluster, node: str, kube: KubeClient, metrics: Metrics) -> None:
        self.cluster, self.node, self.kube, self.metrics = cluster, node, kube, metrics
        self.namespace = unique("apps")
        self.audience = str(shipped_config()["node"]["audience"])
        cluster.service_account(self.namespace, "app")

    def pod(self, name: str, ip: str) -> str:
        return self.cluster.pod(self.namespace, name, node=self.node, service_account="app", ip=ip,
                                host_ip="169.254.29.1")


@pytest.fixture
async def client(cluster: KubeCluster, tmp_path: Path) -> AsyncIterator[Client]:
    node = unique("node")
    cluster.node(node)
    token_file = tmp_path / "token"
    token_file.write_text(agent_token(cluster, node))
    connection = KubeConnection.from_kubeconfig(cluster.kubeconfig(tmp_path / "kubeconfig", token_file=token_file))
    http = KubeHttp(ssl_context=connection.ssl_context())
    metrics = create_metrics()
    try:
        yield Client(cluster, node, KubeClient(connection=connection, http=http, stream=http, clock=SystemClock(),
                                               metrics=metrics), metrics)
    finally:
        await http.close()


async def test_sec25_a_token_request_for_exactly_the_audience_bound_to_the_pod(client: Client) -> None:
    uid = client.pod("web", "169.254.40.5")
    before = dt.datetime.now(dt.UTC)
    token = await client.kube.create_token(namespace=client.namespace, service_account="app",
                                           audience=client.audience, pod_name="web", pod_uid=uid, expiration_s=3600)
    key = next(k for k in jwt.PyJWKSet.from_dict(client.cluster.jwks()).keys
               if k.key_id == jwt.get_unverified_header(token.value)["kid"])
    claims = jwt.decode(token.value, key, algorithms=["RS256"], audience=client.audience, issuer=ISSUER)
    assert claims["aud"] == [client.audience]
    assert claims["kubernetes.io"]["pod"] == {"name": "web", "uid": uid}
    # The expiry is the server's status.expirationTimestamp (second resolution), not our own sum.
    assert dt.datetime.fromtimestamp(claims["exp"], dt.UTC) == token.expiry
    assert before + dt.timedelta(seconds=3598) <= token.expiry <= before + dt.timedelta(seconds=3602)


async def test_a_422_keeps_the_status_and_the_kubernetes_status_body(client: Client) -> None:
    uid = client.pod("web", "169.254.40.5")
    with pytest.raises(UpstreamError) as caught:
        await client.kube.create_token(namespace=client.namespace, service_account="app", audience=client.audience,
                                       pod_name="web", pod_uid=uid, expiration_s=300)
    error = caught.value
    assert (error.service, error.status, error.retryable) == ("k8s", 422, False)
    assert (error.body["kind"], error.body["reason"]) == ("Status", "Invalid")
    assert "less than 10 minutes" in error.body["message"]


async def test_a_403_from_the_admission_policy_is_a_permanent_error_and_counted(client: Client) -> None:
    client.pod("web", "169.254.40.5")
    with pytest.raises(UpstreamError) as caught:  # another audience: metaemu-token-request denies it
        await client.kube.create_token(namespace=client.namespace, service_account="app",
                                       audience="https://kubernetes.default.svc", pod_name="web", pod_uid="x",
                                       expiration_s=3600)
    assert (caught.value.status, caught.value.permanent) == (403, True)
    assert caught.value.body["reason"] == "Forbidden"
    assert sample(client.metrics, "metaemu_upstream_errors_total", backend="k8s", status="403") == 1


async def test_a_bound_pod_with_another_uid_is_refused(client: Client) -> None:
    client.pod("web", "169.254.40.5")
    with pytest.raises(UpstreamError) as caught:
        await client.kube.create_token(namespace=client.namespace, service_account="app", audience=client.audience,
                                       pod_name="web", pod_uid="00000000-0000-0000-0000-000000000000",
                                       expiration_s=3600)
    assert caught.value.status == 409  # what the real server answers for a UID mismatch
    assert caught.value.permanent


async def test_list_pods_returns_typed_pods_and_the_resource_version(client: Client) -> None:
    client.pod("web", "169.254.40.5")
    listing = await client.kube.list_pods(field_selector=f"spec.nodeName={client.node}")
    pods = [p for p in listing.pods if p.namespace == client.namespace]
    assert [(p.name, p.service_account, p.pod_ips, p.phase) for p in pods] == [
        ("web", "app", ("169.254.40.5",), "Running")]
    assert int(listing.resource_version) > 0


async def collect(events: AsyncIterator[WatchEvent[Any]], count: int) -> list[WatchEvent[Any]]:
    got: list[WatchEvent[Any]] = []
    async for event in events:
        got.append(event)
        if len(got) == count:
            break
    return got


async def test_watch_yields_additions_and_a_graceful_deletion(client: Client) -> None:
    selector = f"spec.nodeName={client.node}"
    rv = (await client.kube.list_pods(field_selector=selector)).resource_version
    client.pod("web", "169.254.40.5")
    client.cluster.ok("DELETE", f"/api/v1/namespaces/{client.namespace}/pods/web", {"gracePeriodSeconds": 30})
    events = client.kube.watch_pods(field_selector=selector, resource_version=rv, timeout_s=60)
    try:
        got = await collect(events, 3)  # created, status set, marked for deletion (no kubelet finishes it)
    finally:
        await events.aclose()
    assert [e.type for e in got] == ["ADDED", "MODIFIED", "MODIFIED"]
    assert got[-1].item is not None and got[-1].item.deleting
    assert [int(e.resource_version) for e in got] == sorted(int(e.resource_version) for e in got)


async def test_a_compacted_resource_version_is_a_410(client: Client) -> None:
    selector = f"spec.nodeName={client.node}"
    old = (await client.kube.list_pods(field_selector=selector)).resource_version
    client.pod("web", "169.254.40.5")
    client.cluster.compact_etcd()
    client.cluster.stop_apiserver()  # its watch cache would still replay: start it afresh
    client.cluster.start_apiserver()
    events = client.kube.watch_pods(field_selector=selector, resource_version=old, timeout_s=60)
    try:
        with pytest.raises(UpstreamError) as caught:
            await collect(events, 1)
    finally:
        await events.aclose()
    assert caught.value.status == 410
    assert caught.value.body["reason"] in ("Expired", "Gone")


async def test_the_agent_may_watch_every_service_account_and_sees_an_annotation_change(client: Client) -> None:
    """Issue #11: annotation changes arrive as events. The watch starts from the collection's
    resourceVersion (a one-item list: nothing else of the cluster's service accounts is read)."""
    version = await client.kube.service_accounts_version()
    assert int(version) > 0
    events = client.kube.watch_service_accounts(annotation="iam.gke.io/gcp-service-account",
                                                resource_version=version, timeout_s=60)
    try:
        reading = asyncio.ensure_future(collect(events, 1))
        uid = await asyncio.to_thread(client.cluster.service_account, client.namespace, "app", annotations={
            "iam.gke.io/gcp-service-account": "changed@demo-project.iam.gserviceaccount.com"})
        [event] = await asyncio.wait_for(reading, timeout=30)
    finally:
        await events.aclose()
    assert event.type == "MODIFIED" and event.item is not None
    assert (event.item.namespace, event.item.name, event.item.uid, event.item.gsa_email) == (
        client.namespace, "app", uid, "changed@demo-project.iam.gserviceaccount.com")
