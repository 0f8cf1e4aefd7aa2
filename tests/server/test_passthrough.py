"""node.passthrough (issue #11) in process: the metadata listener as node mode wires it (the real
handler, protocol and fast path; the caller table of a node agent reduced to a dict of pod
addresses) relaying to an IMDSv2 stand-in (metaemu.testing.imds_stand_in, FakeImds) on 127.0.0.1
port 0, and real botocore asking it for the region. Proves: what is relayed and what never is
(no Google request, no node credential, no path another parser could read differently); that a
request and its answer cross unchanged but for the hop-by-hop fields; that nothing is added (no
X-Forwarded-For, no cookie from another request); the caller and rate-limit rules; the bounds
(body, timeout, an unreachable upstream) and the configuration's errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from botocore.utils import IMDSFetcher, InstanceMetadataRegionFetcher
from yarl import URL

from metaemu.clock import SystemClock
from metaemu.config import DEFAULT_PASSTHROUGH_ADDRESS, HostPort, PassthroughCloud, parse_config
from metaemu.errors import ConfigError
from metaemu.metrics import Metrics
from metaemu.pods.identity import Refusal, peer_ip_of
from metaemu.server.app import MAX_REQUEST_BODY
from metaemu.server.context import RequestContext
from metaemu.server.fast_path import ContextAnswers, FastAnswers, FastPathProtocol
from metaemu.server.handlers import MetadataHandler
from metaemu.server.limits import RateLimiter
from metaemu.server.passthrough import MAX_RELAY_BODY_BYTES, Passthrough
from metaemu.server.protocol import MetadataRequestHandler
from metaemu.server.rules import DEFAULT_ALLOWED_HOSTS, HostAllowList
from metaemu.server.runner import IDLE_TIMEOUT_S
from metaemu.testing.fake_aws import FakeImds
from metaemu.testing.imds_stand_in import NODE_KEY, NODE_ROLE, imds_app
from metaemu.testing.world import World
from tests.helpers import FLAVOR, SA_PATH, running_server, sample

AUD = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/q"
TTL = {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}
#: Bounds a wait for something the test itself causes (an answer, a close): never the expectation.
BOUND_S = 10.0


# -- the IMDS stand-in and the node-mode listener ------------------------------------------------


@dataclass
class Imds:
    imds: FakeImds
    log: Path
    address: HostPort

    def requests(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def paths(self) -> list[str]:
        return [entry["path"] for entry in self.requests()]


@pytest.fixture
async def imds(tmp_path: Path) -> AsyncIterator[Imds]:
    stand_in = FakeImds(role_name=NODE_ROLE, credentials=NODE_KEY, availability_zone="eu-west-3b")
    log = tmp_path / "imds.jsonl"
    async with TestServer(imds_app(stand_in, log), host="127.0.0.1", port=0) as server:
        assert server.port is not None
        yield Imds(stand_in, log, HostPort(host="127.0.0.1", port=server.port))


@dataclass
class _Pod:
    context: RequestContext
    fast_answers: ContextAnswers | None = None


class PodsByAddress:
    """A node agent's caller resolution reduced to a table (pod address -> pod UID), for the
    handler (``ContextProvider``) and the fast path (``CallerLookup``) alike."""

    static: RequestContext | None = None

    def __init__(self, context: RequestContext, pods: dict[str, str]) -> None:
        self.default_index = context.index
        self._pods = {ip: _Pod(RequestContext(index=context.index, credentials=context.credentials, rate_key=uid))
                      for ip, uid in pods.items()}

    async def context_for(self, request: web.Request) -> RequestContext | Refusal:
        pod = self._pods.get(peer_ip_of(request) or "")
        if pod is None:
            return Refusal(status=403, reason="not_found", message="The caller is no pod of this node.")
        return pod.context

    def fast_caller(self, ip: str) -> _Pod | None:
        return self._pods.get(ip)

    def count_found(self) -> None:
        pass

    def ready(self) -> str | None:
        return None

    async def warm(self) -> None:
        return None


@dataclass
class Node:
    url: str
    port: int
    metrics: Metrics
    fast: FastAnswers
    session: aiohttp.ClientSession = field(repr=False)

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        url = URL(self.url + path, encoded=True)
        async with self.session.request(method, url, headers={"Host": "169.254.169.254", **(headers or {})},
                                        data=data, allow_redirects=False) as reply:
            return reply.status, dict(reply.headers), await reply.read()

    async def token(self) -> str:
        status, _, body = await self.request("PUT", "/latest/api/token", TTL)
        assert status == 200, body
        return body.decode()


@contextlib.asynccontextmanager
async def node_listener(world: World, *, upstream: HostPort | None, pods: tuple[str, ...] = ("127.0.0.1",),
                        clouds: tuple[PassthroughCloud, ...] = ("aws", "azure"), paths: tuple[str, ...] = (),
                        timeout_s: float = 5.0, burst: int = 40) -> AsyncIterator[Node]:
    """The metadata listener wired as runner.MetaemuServer wires node mode's (fast path first,
    then aiohttp with MetadataRequestHandler), with ``upstream`` as node.passthrough_address
    (None: passthrough off). The sidecar's credentials stand in for every pod's."""
    async with running_server(world) as sidecar:
        c = sidecar.components
        assert c.contexts.static is not None
        contexts = PodsByAddress(c.contexts.static, {ip: f"uid-{i}" for i, ip in enumerate(pods)})
        responder, clock, hosts = c.handler.responder, SystemClock(), HostAllowList(DEFAULT_ALLOWED_HOSTS)
        relay = None if upstream is None else Passthrough(
            clouds=clouds, paths=paths, address=upstream, timeout_s=timeout_s, responder=responder)
        limiter = RateLimiter(rate_per_s=0.001, burst=burst, clock=clock)
        handler = MetadataHandler(contexts=contexts, responder=responder, metrics=c.metrics, clock=clock, hosts=hosts,
                                  limiter=limiter, max_concurrent=500, passthrough=relay)
        fast = FastAnswers(static=None, callers=contexts, responder=responder, metrics=c.metrics, clock=clock,
                           hosts=hosts, limiter=limiter, at_capacity=handler.at_capacity)
        app = web.Application(client_max_size=MAX_REQUEST_BODY)
        if relay is not None:
            app.cleanup_ctx.append(relay.session_ctx)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        assert runner.server is not None
        runner.server.request_handler = handler.__call__  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        full = partial(MetadataRequestHandler, runner.server, responder=responder, metrics=c.metrics, loop=loop,
                       keepalive_timeout=IDLE_TIMEOUT_S, access_log=None)
        listener = await loop.create_server(partial(FastPathProtocol, answers=fast, full=full, open_connections=set(),
                                                    idle_timeout_s=IDLE_TIMEOUT_S), "127.0.0.1", 0)
        port = int(listener.sockets[0].getsockname()[1])
        session = aiohttp.ClientSession(auto_decompress=False)
        try:
            yield Node(f"http://127.0.0.1:{port}", port, c.metrics, fast, session)
        finally:
            await session.close()
            listener.close()
            await runner.cleanup()
            await listener.wait_closed()


async def raw_exchange(port: int, data: bytes) -> bytes:
    """``data`` on a new connection, then everything until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), BOUND_S)
    finally:
        writer.close()


# -- what is relayed ------------------------------------------------------------------------------


def botocore_region(base_url: str) -> str | None:
    fetcher = InstanceMetadataRegionFetcher(timeout=5, num_attempts=1, base_url=base_url, env={})
    region: str | None = fetcher.retrieve_region()
    return region


def botocore_identity_document(base_url: str) -> dict[str, Any]:
    fetcher = IMDSFetcher(timeout=5, num_attempts=1, base_url=base_url, env={})
    token = fetcher._fetch_metadata_token()
    assert token, "no IMDSv2 session token"
    document: dict[str, Any] = json.loads(fetcher._get_request("latest/dynamic/instance-identity/document",
                                                               None, token).text)
    return document


async def test_botocore_resolves_its_region_and_identity_document_through_imdsv2(world: World, imds: Imds) -> None:
    async with node_listener(world, upstream=imds.address) as node:
        assert await asyncio.to_thread(botocore_region, node.url) == "eu-west-3"
        document = await asyncio.to_thread(botocore_identity_document, node.url)
    assert document["region"] == "eu-west-3" and document["instanceId"] == "i-fake"
    requests = imds.requests()
    assert [(r["method"], r["path"]) for r in requests] == [
        ("PUT", "/latest/api/token"), ("GET", "/latest/meta-data/placement/availability-zone/"),
        ("PUT", "/latest/api/token"), ("GET", "/latest/dynamic/instance-identity/document")]
    assert imds.imds.session_tokens_issued == 2  # IMDSv2 all the way: every GET carried a live token
    for r in requests:
        names = {name.lower() for name, _ in r["headers"]}
        assert not names & {"x-forwarded-for", "forwarded", "via", "metadata-flavor"}
    assert node.fast.served == 0  # the fast path never answered (or swallowed) any of them


async def test_imdsv2_answers_come_back_as_imds_gave_them(world: World, imds: Imds) -> None:
    async with node_listener(world, upstream=imds.address) as node:
        assert (await node.request("GET", "/latest/meta-data/placement/region"))[0] == 401  # IMDSv2 required
        assert (await node.request("PUT", "/latest/api/token"))[0] == 400  # the TTL header is required
        assert (await node.request("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "0"}))[0] == 400
        token = await node.token()
        status, headers, body = await node.request("GET", "/latest/meta-data/placement/region",
                                                   {"X-aws-ec2-metadata-token": token})
        assert (status, body) == (200, b"eu-west-3")
        assert "Metadata-Flavor" not in headers  # IMDS's answer, not metaemu's
        head_status, head_headers, head_body = await node.request(
            "HEAD", "/latest/meta-data/placement/region", {"X-aws-ec2-metadata-token": token})
        # FakeImds answers HEAD 405 "Method Not Allowed": relayed as is, its length and no body.
        assert (head_status, head_body, head_headers["Content-Length"]) == (405, b"", "18")
        assert (await node.request("GET", "/latest/meta-data/placement/region",
                                   {"X-aws-ec2-metadata-token": "forged"}))[0] == 401
    assert node.metrics.requests.count("(passthrough aws)", 200) == 2
    assert ("HEAD", "/latest/meta-data/placement/region") in [(r["method"], r["path"]) for r in imds.requests()]


async def test_a_connection_the_fast_path_answered_first_is_handed_over_for_a_relay(world: World, imds: Imds) -> None:
    google = (f"GET {SA_PATH}email HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata-Flavor: Google\r\n\r\n").encode()
    aws = (b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
           b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\n\r\n")
    async with node_listener(world, upstream=imds.address) as node:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        try:
            answers = []
            for head in (google, aws):
                writer.write(head)
                status = await asyncio.wait_for(reader.readline(), BOUND_S)
                headers = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
                length = int(next(line.split(b":")[1] for line in headers.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                answers.append((status, headers, await asyncio.wait_for(reader.readexactly(length), BOUND_S)))
        finally:
            writer.close()
        assert node.fast.served == 1  # the first answer was the fast path's, on the same connection
    (google_status, google_headers, _), (aws_status, aws_headers, token) = answers
    assert google_status.startswith(b"HTTP/1.1 200") and b"Metadata-Flavor: Google" in google_headers
    assert aws_status.startswith(b"HTTP/1.1 200") and b"Metadata-Flavor" not in aws_headers and token
    assert imds.paths() == ["/latest/api/token"]


async def test_the_request_crosses_unchanged_but_for_hop_by_hop_fields(world: World, imds: Imds) -> None:
    head = ("PUT /latest/api/token?x=1&y=%2F HTTP/1.1\r\nHost: 169.254.169.254\r\n"
            "X-aws-ec2-metadata-token-ttl-seconds: 60\r\nUser-Agent: aws-sdk-go-v2/1.30\r\n"
            "Connection: close, X-Hop\r\nX-Hop: dropped\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
            "Proxy-Authorization: Basic eDp5\r\nUpgrade: h2c\r\nX-Custom: a\r\nx-custom: b\r\n"
            "Content-Length: 0\r\n\r\n")
    async with node_listener(world, upstream=imds.address) as node:
        answer = await raw_exchange(node.port, head.encode())
    assert answer.startswith(b"HTTP/1.1 200 ")
    [seen] = imds.requests()
    assert seen["path"] == "/latest/api/token?x=1&y=%2F"  # the target as sent, query included
    assert seen["headers"] == [["Host", "169.254.169.254"], ["X-aws-ec2-metadata-token-ttl-seconds", "60"],
                               ["User-Agent", "aws-sdk-go-v2/1.30"], ["X-Custom", "a"], ["X-Custom", "b"],
                               ["Content-Length", "0"]]
    assert seen["peer"] == "127.0.0.1"


async def stream_upstream(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    return server


async def test_the_answer_streams_back_without_hop_by_hop_fields_and_no_cookie_is_kept(world: World) -> None:
    first_chunk_seen = asyncio.Event()
    cookies: list[str | None] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        cookies.append(request.headers.get("Cookie"))
        response = web.StreamResponse(status=203, reason="Relayed Exactly", headers={
            "Server": "EC2ws", "X-Upstream": "1", "Keep-Alive": "timeout=1", "Proxy-Authenticate": "Basic",
            "Connection": "X-Hop", "X-Hop": "dropped", "Set-Cookie": "imds=secret; Path=/",
            "Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"a" * 70_000)
        await asyncio.wait_for(first_chunk_seen.wait(), BOUND_S)  # proves the relay does not buffer
        await response.write(b"b" * 200_000)
        await response.write_eof()
        return response

    upstream = await stream_upstream(answer)
    try:
        assert upstream.port is not None
        async with node_listener(world, upstream=HostPort(host="127.0.0.1", port=upstream.port)) as node:
            url = URL(node.url + "/latest/meta-data/tags/instance/Name", encoded=True)
            async with node.session.get(url, headers={"Host": "169.254.169.254"}) as reply:
                assert (reply.status, reply.reason) == (203, "Relayed Exactly")
                body = await reply.content.readexactly(70_000)
                first_chunk_seen.set()
                body += await reply.read()
                headers = reply.headers
            assert body == b"a" * 70_000 + b"b" * 200_000
            assert headers["Server"] == "EC2ws" and headers["X-Upstream"] == "1"
            assert not {"Keep-Alive", "Proxy-Authenticate", "X-Hop", "Metadata-Flavor"} & set(headers)
            first_chunk_seen.set()
            assert (await node.request("GET", "/latest/meta-data/tags/instance/Name"))[0] == 203
    finally:
        await upstream.close()
    assert cookies == [None, None]  # the first answer's Set-Cookie never comes back upstream


async def test_an_http10_client_gets_a_chunked_answer_with_its_length(world: World) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"eu-west-3")
        await response.write_eof()
        return response

    upstream = await stream_upstream(answer)
    try:
        assert upstream.port is not None
        async with node_listener(world, upstream=HostPort(host="127.0.0.1", port=upstream.port)) as node:
            out = await raw_exchange(node.port, b"GET /latest/meta-data/placement/region HTTP/1.0\r\n"
                                                b"Host: 169.254.169.254\r\n\r\n")
    finally:
        await upstream.close()
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Content-Length: 9" in head and b"chunked" not in head and body == b"eu-west-3"


async def test_azure_requests_are_relayed_only_with_metadata_true(world: World, imds: Imds) -> None:
    async with node_listener(world, upstream=imds.address) as node:
        path = "/metadata/instance/compute/location?api-version=2021-02-01&format=text"
        assert (await node.request("GET", path))[0] == 404  # no Metadata: true: metaemu's 404, not relayed
        assert (await node.request("GET", path, {"Metadata": "false"}))[0] == 404
        await node.request("GET", path, {"Metadata": "true"})
        for refused in ("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://x",
                        "/Metadata/Identity/oauth2/token?api-version=2018-02-01&resource=https://x",
                        "/metadata/attested/document?api-version=2020-09-01"):
            status, _, body = await node.request("GET", refused, {"Metadata": "true"})
            assert status == 404 and b"node.passthrough_paths" in body
    assert imds.paths() == [path]


# -- what is never relayed ----------------------------------------------------------------------


GOOGLE_BOUND = [
    ("GET", SA_PATH + "token", FLAVOR, 200),
    ("GET", "/computeMetadata/v1/project/project-id", {}, 403),  # no flavor: metaemu's 403, never IMDS
    ("GET", "/latest/../computeMetadata/v1/project/project-id", FLAVOR, 200),
    ("GET", "/latest/meta-data/computeMetadata/v1/", {}, 404),
    ("GET", "/latest/meta-data/placement/region", FLAVOR, 404),
    ("GET", "/latest/meta-data/placement/region", {"Metadata-Flavor": "Amazon"}, 404),
    ("GET", "/latest/meta-data/placement/region", {"X-Google-Metadata-Request": "True"}, 404),
    ("PUT", "/latest/api/token", {**FLAVOR, **TTL}, 405),
    ("GET", "/", {}, 200),  # the Google clients' detection probe
    ("GET", "/metadata/instance?api-version=2021-02-01", {"Metadata": "true", **FLAVOR}, 404),
    ("DELETE", "/latest/api/token", TTL, 405),
    ("GET", "/latest/meta-data/placement/region", {"X-Forwarded-For": "10.0.0.1"}, 403),
]


async def test_nothing_google_bound_is_ever_relayed(world: World, imds: Imds) -> None:
    async with node_listener(world, upstream=imds.address) as node:
        for method, path, headers, status in GOOGLE_BOUND:
            got, reply_headers, _ = await node.request(method, path, headers)
            assert got == status, (method, path, headers)
            assert reply_headers.get("Metadata-Flavor") == "Google"  # metaemu answered
    assert imds.requests() == []


NODE_CREDENTIALS = [
    "/latest/meta-data/iam/security-credentials/",
    f"/latest/meta-data/iam/security-credentials/{NODE_ROLE}",
    "/latest/meta-data/iam/security-credentials",
    f"/2021-07-15/meta-data/iam/security-credentials/{NODE_ROLE}",
    f"/1.0/meta-data/iam/security-credentials/{NODE_ROLE}",
    "/latest/meta-data/IAM/Security-Credentials/",
    "/latest/meta-data//iam/security-credentials/",
    "/latest/meta-data/placement/../iam/security-credentials/",
    "/latest/meta-data/%69am/security-credentials/",
    "/latest/meta-data/iam\\security-credentials/",
    "/latest/meta-data/iam;x/security-credentials/",
    "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    "/latest/dynamic/instance-identity/pkcs7",
    "/latest/dynamic/instance-identity/signature",
    "/2021-07-15/dynamic/instance-identity/rsa2048",
    "/latest/user-data",
    "/latest/meta-data/placement/%72egion",  # harmless, but not its canonical spelling
]


@pytest.mark.parametrize("path", NODE_CREDENTIALS)
async def test_node_credentials_and_odd_spellings_are_refused_by_default(world: World, imds: Imds, path: str) -> None:
    async with node_listener(world, upstream=imds.address) as node:
        token = await node.token()
        status, _, body = await node.request("GET", path, {"X-aws-ec2-metadata-token": token})
    assert status == 404 and b"node.passthrough_paths" in body
    assert imds.paths() == ["/latest/api/token"]
    assert sample(node.metrics, "metaemu_blocked_requests_total", reason="passthrough_path") == 1


async def test_botocore_finds_no_instance_role_through_the_agent(world: World, imds: Imds) -> None:
    from botocore.utils import InstanceMetadataFetcher

    async with node_listener(world, upstream=imds.address) as node:
        fetcher = InstanceMetadataFetcher(timeout=5, num_attempts=1, base_url=node.url, env={})
        assert await asyncio.to_thread(fetcher.retrieve_iam_role_credentials) == {}
    assert not any("security-credentials" in p for p in imds.paths())


async def test_operators_rules_replace_the_defaults_but_never_the_credential_floor(world: World, imds: Imds) -> None:
    rules = ("/latest/api/token", "/latest/meta-data/iam", "/latest/user-data", "!/latest/meta-data/iam/info")
    async with node_listener(world, upstream=imds.address, paths=rules, clouds=("aws",)) as node:
        token = {"X-aws-ec2-metadata-token": await node.token()}
        assert (await node.request("GET", "/latest/user-data", token))[0] == 404  # relayed: FakeImds has none
        # Under an allowed prefix, yet the node's role credentials stay out of reach (security.md §3 item 3).
        status, _, body = await node.request("GET", f"/latest/meta-data/iam/security-credentials/{NODE_ROLE}", token)
        assert status == 404 and b"node.passthrough_paths" in body
        assert (await node.request("GET", "/latest/meta-data/iam/info", token))[0] == 404
        assert (await node.request("GET", "/latest/meta-data/placement/region", token))[0] == 404
        assert (await node.request("GET", "/metadata/instance", {"Metadata": "true"}))[0] == 404  # azure is off
    assert imds.paths() == ["/latest/api/token", "/latest/user-data"]
    assert NODE_KEY.access_key_id not in imds.log.read_text()


async def test_with_passthrough_off_aws_requests_get_metaemus_refusal(world: World, imds: Imds) -> None:
    async with node_listener(world, upstream=None) as node:
        assert (await node.request("PUT", "/latest/api/token", TTL))[0] == 405
        assert (await node.request("GET", "/latest/meta-data/placement/region"))[0] == 404
        assert await asyncio.to_thread(botocore_region, node.url) is None
    assert imds.requests() == []


# -- who may use it, and its bounds ---------------------------------------------------------------


async def test_an_unknown_caller_is_refused_and_nothing_is_relayed(world: World, imds: Imds) -> None:
    async with node_listener(world, upstream=imds.address, pods=("169.254.20.11",)) as node:
        status, _, body = await node.request("PUT", "/latest/api/token", TTL)
    assert (status, body) == (403, b"The caller is no pod of this node.\n")
    assert imds.requests() == []


async def test_relayed_requests_share_the_pods_rate_limit(world: World, imds: Imds) -> None:
    async with node_listener(world, upstream=imds.address, burst=2) as node:
        token = await node.token()
        assert (await node.request("GET", SA_PATH + "email", FLAVOR))[0] == 200  # a Google request: the same bucket
        status, headers, _ = await node.request("GET", "/latest/meta-data/placement/region",
                                                {"X-aws-ec2-metadata-token": token})
    assert status == 429 and "Retry-After" in headers
    assert imds.paths() == ["/latest/api/token"]


async def test_a_disallowed_host_is_refused_before_relaying(world: World, imds: Imds) -> None:
    async with node_listener(world, upstream=imds.address) as node:
        status, _, _ = await node.request("PUT", "/latest/api/token", {**TTL, "Host": "attacker.example"})
    assert status == 403
    assert imds.requests() == []


async def test_a_body_over_the_bound_gets_413_and_is_not_relayed(world: World, imds: Imds) -> None:
    async with node_listener(world, upstream=imds.address) as node:
        big = b"x" * (MAX_RELAY_BODY_BYTES + 1)
        assert (await node.request("POST", "/latest/api/token", TTL, data=big))[0] == 413

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"y" * 2000

        url = URL(node.url + "/latest/api/token", encoded=True)
        async with node.session.post(url, data=chunks(), headers={"Host": "169.254.169.254", **TTL}) as reply:
            assert reply.status == 413
        assert (await node.request("POST", "/latest/api/token", TTL, data=b"z" * 100))[0] == 405  # small: relayed
    assert [(r["method"], r["body"]) for r in imds.requests()] == [("POST", "z" * 100)]


async def test_an_unreachable_imds_gives_502_with_a_clear_body(world: World, refused_port: int) -> None:
    async with node_listener(world, upstream=HostPort(host="127.0.0.1", port=refused_port)) as node:
        status, headers, body = await node.request("PUT", "/latest/api/token", TTL)
    assert status == 502
    assert body.startswith(f"metaemu could not relay this request to the cloud's metadata service at "
                           f"127.0.0.1:{refused_port}: ".encode())
    assert b"Traceback" not in body and headers["Content-Type"].startswith("text/plain")


async def test_an_imds_that_never_answers_gives_504_after_the_timeout(world: World) -> None:
    never = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        await never.wait()  # cancelled when the relay gives up and closes the connection
        raise AssertionError("unreachable")

    upstream = await stream_upstream(stall)
    try:
        assert upstream.port is not None
        async with node_listener(world, upstream=HostPort(host="127.0.0.1", port=upstream.port),
                                 timeout_s=0.3) as node:
            status, _, body = await asyncio.wait_for(node.request("PUT", "/latest/api/token", TTL), BOUND_S)
            assert status == 504 and b"no answer within 0.3 s" in body
            assert node.metrics.requests.count("(passthrough aws)", 504) == 1
    finally:
        await upstream.close()


# -- configuration -------------------------------------------------------------------------------


def node_raw(**node: Any) -> dict[str, Any]:
    return {"mode": "node", "project_id": "p", "numeric_project_id": "1",
            "node": {"name": "n", "audience": AUD, **node}}


def test_passthrough_is_off_by_default_and_parses_every_key() -> None:
    off = parse_config(node_raw(), hostname="h", base_dir=Path.cwd()).node
    assert off is not None and off.passthrough == () and off.passthrough_address == DEFAULT_PASSTHROUGH_ADDRESS
    on = parse_config(node_raw(passthrough=["aws", "azure"], passthrough_address="169.254.169.254:8080",
                               passthrough_paths=["/latest/api/token", "/metadata/instance"],
                               passthrough_timeout_seconds=2), hostname="h", base_dir=Path.cwd()).node
    assert on is not None and on.passthrough == ("aws", "azure")
    assert on.passthrough_address == HostPort(host="169.254.169.254", port=8080)
    assert on.passthrough_paths == ("/latest/api/token", "/metadata/instance")
    assert on.passthrough_timeout_seconds == 2.0


@pytest.mark.parametrize(("node", "extra", "key"), [
    ({"passthrough": ["gcp"]}, {}, "node.passthrough"),
    ({"passthrough": ["aws", "aws"]}, {}, "node.passthrough"),
    ({"passthrough": [1]}, {}, "node.passthrough"),
    ({"passthrough": ["aws"], "passthrough_address": "imds"}, {}, "node.passthrough_address"),
    ({"passthrough": ["aws"], "passthrough_address": "0.0.0.0:80"}, {}, "node.passthrough_address"),
    ({"passthrough": ["aws"], "passthrough_address": "169.254.169.252:8988"}, {"listen": "169.254.169.252:8988"},
     "node.passthrough_address"),
    ({"passthrough": ["aws"], "passthrough_timeout_seconds": 0}, {}, "node.passthrough_timeout_seconds"),
    ({"passthrough": ["aws"], "passthrough_timeout_seconds": 600}, {}, "node.passthrough_timeout_seconds"),
    ({"passthrough_paths": ["/latest/api/token"]}, {}, "node.passthrough_paths"),
    ({"passthrough": ["aws"], "passthrough_paths": ["/metadata/instance"]}, {}, "node.passthrough_paths"),
    ({"passthrough": ["aws"], "passthrough_paths": ["/latest/meta-data/../x"]}, {}, "node.passthrough_paths"),
    ({"passthrough": ["aws"], "passthrough_paths": ["/latest/%69am"]}, {}, "node.passthrough_paths"),
    ({"passthrough": ["aws"], "passthrough_paths": ["latest/api/token"]}, {}, "node.passthrough_paths"),
    ({"passthrough": ["aws", "azure"], "passthrough_paths": ["/latest/api/token"]}, {}, "node.passthrough_paths"),
    ({"passthrough": ["aws"], "passthrough_paths": ["/latest/meta-data/iam/security-credentials/"]}, {},
     "node.passthrough_paths"),
    ({"passthrough": ["aws"], "passthrough_paths": ["/LATEST/dynamic/instance-identity/pkcs7"]}, {},
     "node.passthrough_paths"),
    ({"passthrough": ["azure"], "passthrough_paths": ["/metadata/identity/oauth2/token"]}, {},
     "node.passthrough_paths"),
])
def test_passthrough_config_errors_name_the_key(node: dict[str, Any], extra: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**node_raw(**node), **extra}, hostname="h", base_dir=Path.cwd())
    assert err.value.key == key
