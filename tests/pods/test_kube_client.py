"""KubeClient, its connection settings and the node-mode token source on a controllable clock, with
the faults only a stand-in can inject (410 answers, broken streams, malformed events, bookmarks on
demand): TokenRequest shape (SEC-25), the bearer token re-read from its file, in-cluster and
kubeconfig settings, and the aiohttp adapter streaming a watch over a real socket. What a real API
server answers (errors with their Status bodies, list, watch, 410 for a compacted history) is
tested against one in tests/kube/test_kube_api_client.py."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
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
from metaemu.pods.stream import KubeHttp, LineStream
from metaemu.pods.token_source import PodTokenSource
from metaemu.pods.watch import PodIndex
from metaemu.testing.fake_clock import FakeClock, settle
from metaemu.testing.fake_kubernetes import FakeKubernetes
from metaemu.transport import HttpRequest, HttpResponse
from tests.pods.support import API_SERVER, AUDIENCE, CLUSTER_ISSUER, NODE, eventually

EXPIRATION_S = 3600


def identity_of(fake: FakeKubernetes, obj: dict[str, Any]) -> PodIdentity:
    meta = obj["metadata"]
    sa = fake.store.service_accounts[(meta["namespace"], obj["spec"]["serviceAccountName"])]
    return PodIdentity(namespace=meta["namespace"], pod_name=meta["name"], pod_uid=meta["uid"],
                       ksa_name=obj["spec"]["serviceAccountName"], ksa_uid=sa["metadata"]["uid"], gsa_email=None)


def source_for(fake: FakeKubernetes, kube: KubeClient, index: PodIndex, clock: FakeClock, obj: dict[str, Any],
               *, expiration_s: int = EXPIRATION_S) -> PodTokenSource:
    return PodTokenSource(kube=kube, index=index, identity=identity_of(fake, obj), audience=AUDIENCE,
                          expiration_s=expiration_s, clock=clock)


def running(fake: FakeKubernetes, index: PodIndex, name: str, ip: str, sa: str = "app") -> dict[str, Any]:
    obj = fake.add_pod("apps", name, node=NODE, ips=[ip], service_account=sa)
    index.upsert(parse_pod(obj))
    return obj


# -- SEC-25 TokenRequest -----------------------------------------------------------------------------


async def test_sec25_token_request_names_the_ksa_the_audience_the_calling_pod_and_the_lifetime(
        fake: FakeKubernetes, kube: KubeClient, index: PodIndex, clock: FakeClock) -> None:
    running(fake, index, "other", "10.1.0.4")
    caller = running(fake, index, "web", "10.1.0.5")
    subject = await source_for(fake, kube, index, clock, caller).fetch()
    [request] = fake.token_requests
    assert (request.namespace, request.service_account, request.status) == ("apps", "app", 201)
    assert request.audiences == (AUDIENCE,)
    assert (request.bound_kind, request.bound_name, request.bound_uid) == ("Pod", "web", caller["metadata"]["uid"])
    assert request.expiration_s == EXPIRATION_S
    assert fake.requests[-1].path == "/api/v1/namespaces/apps/serviceaccounts/app/token"
    claims = jwt.decode(subject.value, options={"verify_signature": False})
    assert claims["aud"] == [AUDIENCE]
    assert claims["iss"] == CLUSTER_ISSUER
    assert claims["kubernetes.io"]["pod"] == {"name": "web", "uid": caller["metadata"]["uid"]}
    assert subject.token_type == "urn:ietf:params:oauth:token-type:jwt"
    assert subject.expiry == clock.now() + dt.timedelta(seconds=EXPIRATION_S)
    assert subject.value not in repr(subject)


async def test_sec25_expiry_comes_from_the_servers_expiration_timestamp(
        fake: FakeKubernetes, kube: KubeClient, index: PodIndex, clock: FakeClock) -> None:
    fake.max_token_lifetime_s = 1200  # the server shortens what was asked for
    caller = running(fake, index, "web", "10.1.0.5")
    subject = await source_for(fake, kube, index, clock, caller).fetch()
    assert subject.expiry == clock.now() + dt.timedelta(seconds=1200)


async def test_the_token_is_bound_to_another_running_pod_once_the_caller_is_gone(
        fake: FakeKubernetes, kube: KubeClient, index: PodIndex, clock: FakeClock) -> None:
    first = running(fake, index, "web-1", "10.1.0.5")
    second = running(fake, index, "web-2", "10.1.0.6")
    source = source_for(fake, kube, index, clock, first)
    await source.fetch()
    fake.delete_pod("apps", "web-1")
    index.remove(parse_pod(first))
    await source.fetch()
    assert [r.bound_uid for r in fake.token_requests] == [first["metadata"]["uid"], second["metadata"]["uid"]]
    source.prefer(identity_of(fake, second))
    await source.fetch()
    assert fake.token_requests[-1].bound_name == "web-2"


async def test_no_running_pod_of_the_ksa_means_no_token(
        fake: FakeKubernetes, kube: KubeClient, index: PodIndex, clock: FakeClock) -> None:
    caller = running(fake, index, "web", "10.1.0.5")
    source = source_for(fake, kube, index, clock, caller)
    index.remove(parse_pod(caller))
    with pytest.raises(SourceError, match="no running pod"):
        await source.fetch()
    assert fake.token_requests == []


async def test_sec26_a_recreated_ksa_never_serves_the_old_key(
        fake: FakeKubernetes, kube: KubeClient, index: PodIndex, clock: FakeClock) -> None:
    caller = running(fake, index, "web", "10.1.0.5")
    source = source_for(fake, kube, index, clock, caller)
    fake.add_service_account("apps", "app", uid="a-new-uid")  # deleted and recreated under the same name
    with pytest.raises(SourceError, match="recreated") as caught:
        await source.fetch()
    assert caught.value.permanent


@pytest.mark.parametrize("expiration_s", [0, 599, (1 << 32) + 1])
def test_token_lifetime_outside_the_api_limits_is_a_config_error(
        fake: FakeKubernetes, kube: KubeClient, index: PodIndex, clock: FakeClock, expiration_s: int) -> None:
    caller = fake.add_pod("apps", "web", node=NODE, ips=["10.1.0.5"], service_account="app")
    with pytest.raises(ConfigError):
        source_for(fake, kube, index, clock, caller, expiration_s=expiration_s)


async def test_object_names_are_not_path_injection(kube: KubeClient) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes object name"):
        await kube.get_service_account("apps", "../../secrets", annotation="a")


# -- list and watch ----------------------------------------------------------------------------------


async def collect(events: AsyncIterator[WatchEvent], count: int) -> list[WatchEvent]:
    got: list[WatchEvent] = []
    async for event in events:
        got.append(event)
        if len(got) == count:
            break
    return got


async def test_watch_yields_pod_events_and_bookmarks(fake: FakeKubernetes, kube: KubeClient) -> None:
    rv = (await kube.list_pods(field_selector="")).resource_version
    fake.add_pod("apps", "web", node=NODE, ips=["10.1.0.5"])
    fake.delete_pod("apps", "web", grace_period_s=30)
    events = kube.watch_pods(field_selector=f"spec.nodeName={NODE}", resource_version=rv, timeout_s=60)
    got = await collect(events, 2)
    fake.bookmark()
    got += await collect(events, 1)
    await events.aclose()
    assert [e.type for e in got] == ["ADDED", "MODIFIED", "BOOKMARK"]
    assert got[1].pod is not None
    assert got[1].pod.deleting
    assert got[2].pod is None
    assert got[2].resource_version == str(fake.store.resource_version)


async def test_a_410_answer_to_the_watch_request_is_a_410(fake: FakeKubernetes, kube: KubeClient) -> None:
    fake.fail("watch", status_code=410)
    with pytest.raises(UpstreamError) as caught:
        await collect(kube.watch_pods(field_selector="", resource_version="5", timeout_s=60), 1)
    assert caught.value.status == 410


async def test_a_broken_watch_stream_is_a_retryable_error(fake: FakeKubernetes, kube: KubeClient) -> None:
    events = kube.watch_pods(field_selector="", resource_version="", timeout_s=60)
    reading = asyncio.ensure_future(collect(events, 1))
    await settle()
    fake.outage()
    with pytest.raises(UpstreamError) as caught:
        await reading
    assert (caught.value.status, caught.value.retryable) == (0, True)


class _Lines:
    """An ``HttpStreamClient`` answering every watch with fixed lines."""

    def __init__(self, *lines: bytes) -> None:
        self._lines = lines

    def open(self, request: HttpRequest) -> Any:
        return _LinesContext(self._lines)


class _LinesContext:
    def __init__(self, lines: tuple[bytes, ...]) -> None:
        self._lines = lines

    async def __aenter__(self) -> LineStream:
        async def gen() -> AsyncIterator[bytes]:
            for line in self._lines:
                yield line
        return LineStream(status=200, lines=gen())

    async def __aexit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("line", [b"not json", b'{"type": "ADDED"}', b'{"type": "ADDED", "object": {"spec": {}}}'])
async def test_a_malformed_watch_event_is_an_error(clock: FakeClock, metrics: Metrics, line: bytes) -> None:
    kube = KubeClient(connection=KubeConnection(server=API_SERVER, token="t"), http=_NoHttp(), stream=_Lines(line),
                      clock=clock, metrics=metrics)
    with pytest.raises(UpstreamError, match="did not return"):
        await collect(kube.watch_pods(field_selector="", resource_version="", timeout_s=60), 1)


class _NoHttp:
    async def send(self, request: HttpRequest) -> HttpResponse:
        raise AssertionError("unexpected request")


# -- the bearer token --------------------------------------------------------------------------------


async def test_the_token_file_is_reread_after_a_minute_and_after_a_401(
        fake: FakeKubernetes, tmp_path: Path, clock: FakeClock, metrics: Metrics) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    fake.add_user("first", "agent-1")
    fake.add_user("second", "agent-2")
    transport = fake.client(clock=clock)
    kube = KubeClient(connection=KubeConnection(server=API_SERVER, token_file=token_file), http=transport,
                      stream=transport, clock=clock, metrics=metrics)
    await kube.list_pods(field_selector="")
    token_file.write_text("second\n")  # kubelet rotated it
    await kube.list_pods(field_selector="")  # the cached copy is still valid
    clock.advance(TOKEN_REREAD_S)
    await kube.list_pods(field_selector="")
    assert [r.user for r in fake.requests] == ["agent-1", "agent-1", "agent-2"]
    token_file.write_text("third")
    fake.add_user("third", "agent-3", permissions=())
    fake.remove_user("second")  # the cached token stops working before the minute is up
    with pytest.raises(UpstreamError) as caught:
        await kube.list_pods(field_selector="")
    assert caught.value.status == 401
    with pytest.raises(UpstreamError) as caught:
        await kube.list_pods(field_selector="")
    assert caught.value.status == 403  # re-read at once after the 401: the new token authenticates
    assert fake.requests[-1].user == "agent-3"


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


def test_kubeconfig_settings(tmp_path: Path, fake: FakeKubernetes) -> None:
    path = fake.kubeconfig(tmp_path / "config", server="http://127.0.0.1:6443", token="s3cret-bearer")
    conn = KubeConnection.from_kubeconfig(path)
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


async def test_kube_http_streams_watch_events_as_they_happen(fake: FakeKubernetes, clock: FakeClock,
                                                            metrics: Metrics, tmp_path: Path) -> None:
    async with TestServer(fake.app()) as server:
        conn = KubeConnection.from_kubeconfig(fake.kubeconfig(tmp_path / "config", server=str(server.make_url(""))))
        http = KubeHttp(ssl_context=conn.ssl_context())
        kube = KubeClient(connection=conn, http=http, stream=http, clock=clock, metrics=metrics)
        try:
            listing = await kube.list_pods(field_selector=f"spec.nodeName={NODE}")
            events = kube.watch_pods(field_selector=f"spec.nodeName={NODE}",
                                     resource_version=listing.resource_version, timeout_s=300)
            first = asyncio.ensure_future(collect(events, 1))
            await eventually(lambda: fake.store.watch_count == 1, rounds=1000)  # the request reached the server
            assert not first.done()
            fake.add_pod("apps", "web", node=NODE, ips=["10.1.0.5"])
            [event] = await asyncio.wait_for(first, timeout=5)  # delivered while the watch stays open
            assert (event.type, event.pod.name if event.pod else None) == ("ADDED", "web")
            await events.aclose()
            fake.add_service_account("apps", "app", uid="u-1")
            assert (await kube.get_service_account("apps", "app", annotation="x")).uid == "u-1"
        finally:
            await http.close()


async def test_kube_http_reports_a_dropped_api_server_as_unreachable(
        fake: FakeKubernetes, clock: FakeClock, metrics: Metrics, tmp_path: Path) -> None:
    async with TestServer(fake.app()) as server:
        conn = KubeConnection.from_kubeconfig(fake.kubeconfig(tmp_path / "config", server=str(server.make_url(""))))
        http = KubeHttp()
        kube = KubeClient(connection=conn, http=http, stream=http, clock=clock, metrics=metrics)
        try:
            events = kube.watch_pods(field_selector="", resource_version="1", timeout_s=300)
            reading = asyncio.ensure_future(collect(events, 1))
            await eventually(lambda: fake.store.watch_count == 1, rounds=1000)
            fake.outage()  # the open watch breaks mid-stream ...
            with pytest.raises(UpstreamError) as caught:
                await asyncio.wait_for(reading, timeout=5)
            assert caught.value.status == 0
            with pytest.raises(UpstreamError) as caught:  # ... and new connections are dropped
                await kube.list_pods(field_selector="")
            assert (caught.value.status, caught.value.retryable) == (0, True)
        finally:
            await http.close()
