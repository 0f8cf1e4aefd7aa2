"""KubeClient, its connection settings and the node-mode token source, against the real API server,
on a controllable clock, with the faults only ``FaultyKube`` can put on cue (410 answers, broken
streams, malformed events): the token source's TokenRequests (SEC-25, SEC-26), the bearer token
re-read from its file, in-cluster and kubeconfig settings, and the aiohttp adapter streaming a watch
over a real socket. The bare KubeClient calls (errors with their Status bodies, list, watch, 410 for
a compacted history) are in tests/kube/test_kube_api_client.py."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from metaemu.errors import ConfigError, SourceError, UpstreamError
from metaemu.metrics import Metrics
from metaemu.pods.identity import PodIdentity
from metaemu.pods.kube_client import TOKEN_REREAD_S, KubeClient, KubeConnection, WatchEvent
from metaemu.pods.objects import parse_pod
from metaemu.pods.stream import KubeHttp
from metaemu.pods.token_source import PodTokenSource
from metaemu.pods.watch import PodIndex
from metaemu.testing.fake_clock import FakeClock
from metaemu.testing.kube_faults import FaultyKube
from tests.kube.agent import agent_token
from tests.kube.cluster import ISSUER
from tests.pods.support import Pods, audience, eventually

EXPIRATION_S = 3600


def identity_of(pods: Pods, obj: dict[str, Any]) -> PodIdentity:
    meta, sa = obj["metadata"], obj["spec"]["serviceAccountName"]
    account = pods.cluster.ok("GET", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}")
    return PodIdentity(namespace=meta["namespace"], pod_name=meta["name"], pod_uid=meta["uid"], ksa_name=sa,
                       ksa_uid=account["metadata"]["uid"], gsa_email=None)


def source_for(pods: Pods, kube: KubeClient, index: PodIndex, clock: FakeClock, obj: dict[str, Any],
               *, expiration_s: int = EXPIRATION_S) -> PodTokenSource:
    return PodTokenSource(kube=kube, index=index, identity=identity_of(pods, obj), audience=audience(),
                          expiration_s=expiration_s, clock=clock)


def running(pods: Pods, index: PodIndex, name: str, sa: str = "app") -> dict[str, Any]:
    """A Running pod on the API server, and in the index as the watch would put it."""
    obj = pods.pod(name, sa=sa)
    index.upsert(parse_pod(obj))
    return obj


def token_requests(faulty: FaultyKube) -> list[dict[str, Any]]:
    """The TokenRequest specs the agent sent, with the status each got."""
    return [{**a.call.body["spec"], "status": a.status} for a in faulty.answers if a.call.endpoint == "token"]


# -- SEC-25 TokenRequest -----------------------------------------------------------------------------


async def test_sec25_token_request_names_the_ksa_the_audience_the_calling_pod_and_the_lifetime(
        pods: Pods, faulty: FaultyKube, kube: KubeClient, index: PodIndex, clock: FakeClock) -> None:
    running(pods, index, "other")
    caller = running(pods, index, "web")
    subject = await source_for(pods, kube, index, clock, caller).fetch()
    [request] = token_requests(faulty)
    assert request == {"audiences": [audience()], "expirationSeconds": EXPIRATION_S, "status": 201,
                       "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "web",
                                          "uid": caller["metadata"]["uid"]}}
    assert faulty.requests[-1].path == f"/api/v1/namespaces/{pods.namespace}/serviceaccounts/app/token"
    claims = jwt.decode(subject.value, options={"verify_signature": False})
    assert claims["aud"] == [audience()] and claims["iss"] == ISSUER
    assert claims["kubernetes.io"]["pod"] == {"name": "web", "uid": caller["metadata"]["uid"]}
    assert claims["kubernetes.io"]["node"]["name"] == pods.node
    assert subject.token_type == "urn:ietf:params:oauth:token-type:jwt"
    assert claims["exp"] - claims["iat"] == EXPIRATION_S
    assert subject.expiry == dt.datetime.fromtimestamp(claims["exp"], dt.UTC)  # the server's expirationTimestamp
    assert subject.value not in repr(subject)


async def test_the_token_is_bound_to_another_running_pod_once_the_caller_is_gone(
        pods: Pods, faulty: FaultyKube, kube: KubeClient, index: PodIndex, clock: FakeClock) -> None:
    first = running(pods, index, "web-1")
    second = running(pods, index, "web-2")
    source = source_for(pods, kube, index, clock, first)
    await source.fetch()
    pods.delete_pod("web-1")
    index.remove(parse_pod(first))
    await source.fetch()
    assert [(r["boundObjectRef"]["uid"], r["status"]) for r in token_requests(faulty)] == [
        (first["metadata"]["uid"], 201), (second["metadata"]["uid"], 201)]
    source.prefer(identity_of(pods, second))
    await source.fetch()
    assert token_requests(faulty)[-1]["boundObjectRef"]["name"] == "web-2"


async def test_no_running_pod_of_the_ksa_means_no_token(
        pods: Pods, faulty: FaultyKube, kube: KubeClient, index: PodIndex, clock: FakeClock) -> None:
    caller = running(pods, index, "web")
    source = source_for(pods, kube, index, clock, caller)
    index.remove(parse_pod(caller))
    with pytest.raises(SourceError, match="no running pod"):
        await source.fetch()
    assert faulty.calls["token"] == 0


async def test_sec26_a_recreated_ksa_never_serves_the_old_key(
        pods: Pods, faulty: FaultyKube, kube: KubeClient, index: PodIndex, clock: FakeClock) -> None:
    """The account is deleted and recreated under the same name while its pod runs: the real server
    issues a token for the new account (a new UID), which the source refuses to use for the old one."""
    caller = running(pods, index, "web")
    source = source_for(pods, kube, index, clock, caller)
    old_uid = identity_of(pods, caller).ksa_uid
    pods.delete_service_account("app")
    assert pods.service_account("app") != old_uid
    with pytest.raises(SourceError, match="recreated") as caught:
        await source.fetch()
    assert caught.value.permanent
    [request] = token_requests(faulty)
    assert request["status"] == 201  # the server did issue it: the refusal is ours


@pytest.mark.parametrize("expiration_s", [0, 599, (1 << 32) + 1])
def test_token_lifetime_outside_the_api_limits_is_a_config_error(
        pods: Pods, kube: KubeClient, index: PodIndex, clock: FakeClock, expiration_s: int) -> None:
    caller = pods.pod("web")
    with pytest.raises(ConfigError, match=r"node\.token_expiration_seconds"):
        source_for(pods, kube, index, clock, caller, expiration_s=expiration_s)


async def test_the_api_limits_are_the_real_servers(pods: Pods, kube: KubeClient) -> None:
    """Why 600 is the floor: the real server refuses a shorter TokenRequest with 422."""
    uid = pods.pod("web")["metadata"]["uid"]
    with pytest.raises(UpstreamError) as caught:
        await kube.create_token(namespace=pods.namespace, service_account="app", audience=audience(),
                                pod_name="web", pod_uid=uid, expiration_s=599)
    assert caught.value.status == 422


async def test_object_names_are_not_path_injection(faulty: FaultyKube, kube: KubeClient) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes object name"):
        await kube.get_service_account("apps", "../../secrets", annotation="a")
    assert faulty.requests == []


# -- watch faults ------------------------------------------------------------------------------------


async def collect(events: AsyncIterator[WatchEvent[Any]], count: int) -> list[WatchEvent[Any]]:
    got: list[WatchEvent[Any]] = []
    async for event in events:
        got.append(event)
        if len(got) == count:
            break
    return got


async def test_a_410_answer_to_the_watch_request_is_a_410(faulty: FaultyKube, kube: KubeClient) -> None:
    faulty.fail("watch", status_code=410, reason="Expired")
    with pytest.raises(UpstreamError) as caught:
        await collect(kube.watch_pods(field_selector="", resource_version="5", timeout_s=60), 1)
    assert caught.value.status == 410


async def test_a_broken_watch_stream_is_a_retryable_error(pods: Pods, faulty: FaultyKube, kube: KubeClient) -> None:
    rv = (await kube.list_pods(field_selector=f"spec.nodeName={pods.node}")).resource_version
    events = kube.watch_pods(field_selector=f"spec.nodeName={pods.node}", resource_version=rv, timeout_s=60)
    reading = asyncio.ensure_future(collect(events, 1))
    await eventually(lambda: faulty.watch_count == 1)
    faulty.break_watches()
    with pytest.raises(UpstreamError) as caught:
        await reading
    assert (caught.value.status, caught.value.retryable) == (0, True)


@pytest.mark.parametrize("line", [b"not json", b'{"type": "ADDED"}', b'{"type": "ADDED", "object": {"spec": {}}}'])
async def test_a_malformed_watch_event_is_an_error(pods: Pods, faulty: FaultyKube, kube: KubeClient,
                                                   line: bytes) -> None:
    rv = (await kube.list_pods(field_selector=f"spec.nodeName={pods.node}")).resource_version
    events = kube.watch_pods(field_selector=f"spec.nodeName={pods.node}", resource_version=rv, timeout_s=60)
    reading = asyncio.ensure_future(collect(events, 1))
    await eventually(lambda: faulty.watch_count == 1)
    faulty.inject(line)  # amid the real server's stream
    with pytest.raises(UpstreamError, match="did not return"):
        await reading


# -- the bearer token --------------------------------------------------------------------------------


async def test_the_token_file_is_reread_after_a_minute_and_after_a_401(
        pods: Pods, faulty: FaultyKube, tmp_path: Path, clock: FakeClock, metrics: Metrics) -> None:
    """The file kubelet rotates: re-read once a minute, and at once when the cached token is refused."""
    cluster = pods.cluster
    first, second = agent_token(cluster, pods.node), agent_token(cluster, pods.node)
    pods.service_account("nobody")  # authenticates, may list nothing
    third = str(cluster.token_request(pods.namespace, "nobody", {"expirationSeconds": 3600}).body["status"]["token"])
    token_file = tmp_path / "token"
    token_file.write_text(first + "\n")
    kube = KubeClient(connection=KubeConnection(server=cluster.server, token_file=token_file,
                                                ca_file=cluster.ca_file),
                      http=faulty, stream=faulty, clock=clock, metrics=metrics)
    selector = f"spec.nodeName={pods.node}"
    await kube.list_pods(field_selector=selector)
    token_file.write_text(second + "\n")  # kubelet rotated it
    await kube.list_pods(field_selector=selector)  # the cached copy is still valid
    clock.advance(TOKEN_REREAD_S)
    await kube.list_pods(field_selector=selector)
    assert [r.bearer for r in faulty.requests] == [first, first, second]

    token_file.write_text(third)
    # The cached token stops working before the minute is up. (At the real server that takes its
    # authenticator's 10 s cache after the bound pod is deleted; the 401 is what counts here.)
    faulty.fail("list", status_code=401, reason="Unauthorized")
    with pytest.raises(UpstreamError) as caught:
        await kube.list_pods(field_selector=selector)
    assert caught.value.status == 401
    with pytest.raises(UpstreamError) as caught:
        await kube.list_pods(field_selector=selector)
    assert caught.value.status == 403  # re-read at once after the 401: the new token authenticates
    assert [r.bearer for r in faulty.requests][-2:] == [second, third]


# -- connection settings -----------------------------------------------------------------------------


def test_in_cluster_settings_come_from_the_environment_and_the_mounted_secret(tmp_path: Path) -> None:
    conn = KubeConnection.in_cluster({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
                                     secrets_dir=tmp_path)
    assert conn.server == "https://10.96.0.1:443"
    assert (conn.token_file, conn.ca_file) == (tmp_path / "token", tmp_path / "ca.crt")
    v6 = KubeConnection.in_cluster({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"})
    assert v6.server == "https://[fd00::1]:443"
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST"):
        KubeConnection.in_cluster({})


def test_kubeconfig_settings(tmp_path: Path) -> None:
    (tmp_path / "config").write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [{"name": "k", "cluster": {"server": "http://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "s3cret-bearer"}}]}))
    conn = KubeConnection.from_kubeconfig(tmp_path / "config")
    assert (conn.server, conn.token, conn.ssl_context()) == ("http://127.0.0.1:6443", "s3cret-bearer", None)
    assert "s3cret" not in repr(conn)


def test_kubeconfig_with_a_token_file_and_ca_data(tmp_path: Path) -> None:
    pem = _self_signed_ca()
    (tmp_path / "config").write_text(f"""
current-context: c
contexts: [{{name: c, context: {{cluster: k, user: u}}}}]
clusters: [{{name: k, cluster: {{server: "https://kube.test:6443",
  certificate-authority-data: {base64.b64encode(pem).decode()}}}}}]
users: [{{name: u, user: {{tokenFile: secrets/token}}}}]
""")
    conn = KubeConnection.from_kubeconfig(tmp_path / "config")
    assert conn.token_file == tmp_path / "secrets" / "token"
    context = conn.ssl_context()
    assert context is not None
    assert context.get_ca_certs()[0]["subject"] == ((("commonName", "test-cluster-ca"),),)


def test_kubeconfig_users_other_than_tokens_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config").write_text("""
current-context: c
contexts: [{name: c, context: {cluster: k, user: u}}]
clusters: [{name: k, cluster: {server: "https://kube.test"}}]
users: [{name: u, user: {client-certificate: a.crt, client-key: a.key}}]
""")
    with pytest.raises(ConfigError, match="client-certificate"):
        KubeConnection.from_kubeconfig(tmp_path / "config")


@pytest.mark.parametrize("server", ["http://kube.test", "http://10.0.0.1:6443", "ftp://127.0.0.1", "kube.test"])
def test_a_bearer_token_never_travels_in_clear_text_off_loopback(server: str) -> None:
    with pytest.raises(ConfigError):
        KubeConnection(server=server, token="t")


def _self_signed_ca() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-cluster-ca")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


# -- the aiohttp adapter over a socket ---------------------------------------------------------------


async def test_kube_http_streams_watch_events_as_they_happen(pods: Pods, connection: KubeConnection,
                                                            clock: FakeClock, metrics: Metrics) -> None:
    """A real socket to the real server: an event is delivered while the watch stays open (its
    ``timeoutSeconds`` is 300), not when the response ends."""
    http = KubeHttp(ssl_context=connection.ssl_context())
    kube = KubeClient(connection=connection, http=http, stream=http, clock=clock, metrics=metrics)
    try:
        selector = f"spec.nodeName={pods.node}"
        listing = await kube.list_pods(field_selector=selector)
        events = kube.watch_pods(field_selector=selector, resource_version=listing.resource_version, timeout_s=300)
        first = asyncio.ensure_future(collect(events, 1))
        await asyncio.to_thread(pods.pod, "web")
        [event] = await asyncio.wait_for(first, timeout=10)
        assert (event.type, event.item.name if event.item else None) == ("ADDED", "web")
        await events.aclose()
        uid = pods.service_account("app")
        assert (await kube.get_service_account(pods.namespace, "app", annotation="x")).uid == uid
    finally:
        await http.close()


async def test_kube_http_reports_a_dropped_api_server_as_unreachable(clock: FakeClock, metrics: Metrics) -> None:
    """A peer that resets an open watch, then is gone: both are status 0, retryable (SEC-36)."""
    opened, drop = asyncio.Event(), asyncio.Event()

    async def watch(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        opened.set()
        await drop.wait()
        assert request.transport is not None
        request.transport.abort()  # a reset mid-stream, no terminating chunk
        return response

    app = web.Application()
    app.router.add_get("/api/v1/pods", watch)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    http = KubeHttp()
    kube = KubeClient(connection=KubeConnection(server=str(server.make_url("")), token="t"), http=http, stream=http,
                      clock=clock, metrics=metrics)
    try:
        events = kube.watch_pods(field_selector="", resource_version="1", timeout_s=300)
        reading = asyncio.ensure_future(collect(events, 1))
        await opened.wait()
        drop.set()
        with pytest.raises(UpstreamError) as caught:
            await asyncio.wait_for(reading, timeout=10)
        assert (caught.value.status, caught.value.retryable) == (0, True)
        await server.close()
        with pytest.raises(UpstreamError) as caught:  # ... and then nothing listens there
            await kube.list_pods(field_selector="")
        assert (caught.value.status, caught.value.retryable) == (0, True)
    finally:
        await http.close()
        await server.close()
