"""Relaying pods' requests for the cloud's own metadata service (node mode, ``node.passthrough``;
issue #11).

On EKS (and AKS) 169.254.169.254 is also the cloud's instance metadata service, and node mode sends
every pod connection to it on port 80 to metaemu. With ``node.passthrough: [aws]`` (``azure``),
requests that are that service's, and only those, are relayed to ``node.passthrough_address`` as
they came (method, target, headers, body) and its answer (status, headers, body) is streamed back.

Owns: which requests are relayed (``Passthrough.judge``), the path rules, and the relay itself
(``Passthrough.forward``). Not owned here: who the caller is and the per-pod rate limit (the
handler applies both to relayed requests exactly as to Google ones, ``MetadataHandler``).

What is relayed, judged before anything else about the request but ``X-Forwarded-For`` (refused by
the handler first: IMDSv2 refuses it too, kube2iam PR #279):

- SECURITY: never a Google request. Any ``Metadata-Flavor`` (whatever its value) or
  ``X-Google-Metadata-Request`` header, and any path naming ``computeMetadata`` (every spelling,
  after normalisation), is metaemu's: it answers it, or refuses it, itself.
- Only a path in a configured cloud's namespace: AWS ``/latest/...`` (and ``/1.0/``, ``/YYYY-MM-DD/``,
  judged as ``/latest/``); Azure ``/metadata/...`` and only with ``Metadata: true`` (Azure IMDS's own
  SSRF rule). So ``/`` (the Google clients' detection probe) and everything else stays metaemu's.
- Only GET, HEAD, PUT (the IMDSv2 session token) and POST (Azure's scheduled-events acknowledgement).
- SECURITY (security.md §3 item 3, lesson 4): default deny plus an allow-list, judged after
  normalisation and only on a target that *is* its canonical form, of plain characters: a path
  another parser could read differently (``//``, ``..``, percent-encoding, ``\\``, ``;``) is refused,
  never relayed (aad-pod-identity CVE-2022-23551 was a backslash path that reached IMDS). Rules
  compare case-insensitively: Azure IMDS is case-insensitive (aad-pod-identity #1021).
- SECURITY: node credentials are never relayed, whatever the rules say (security.md §3 item 3: a
  pass-through "must never carry node credentials"; ``metaemu.config.NEVER_RELAYED``): AWS's
  instance-profile and instance-identity role credentials and its signed identity documents,
  Azure's managed-identity tokens and attested document get 404, which SDKs read as "no instance
  role". The default rules also leave out AWS user-data (the node's bootstrap script, GKE's
  kube-env analogue) and everything not listed; operators may replace the default rules
  (``node.passthrough_paths``; README, "Node mode"), never the floor.

How it is relayed: hop-by-hop fields (RFC 9110 §7.6.1: Connection and every field it names,
Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-*) are dropped both ways, and Expect
(the 100-continue is between the pod and metaemu). Nothing is added: no ``X-Forwarded-For``, no
``Via`` (IMDSv2 refuses a token request carrying X-Forwarded-For), no User-Agent, Accept or
Content-Type of aiohttp's own; the pod's ``Host`` is kept. No cookie is kept between requests (one
pod must never send another's), no proxy variable is read, no redirect is followed, and bodies are
not decoded. IMDS's hop limit for IMDSv2 tokens is the IP TTL of its answer, which now only has to
reach the node, not the pod behind it: a pod reaches IMDS as the node does, whatever the hop limit
(README; tests/kube/test_passthrough_node.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from metaemu.config import NEVER_RELAYED, PASSTHROUGH_CLOUDS, HostPort, NodeConfig, PassthroughCloud
from metaemu.server.responses import Responder
from metaemu.server.rules import normalise_path

log = logging.getLogger(__name__)

#: Methods relayed; any other gets metaemu's own 405 (SEC-23). PUT is IMDSv2's session token,
#: POST Azure's scheduled-events acknowledgement, HEAD what curl -I sends.
RELAY_METHODS = frozenset({"GET", "HEAD", "PUT", "POST"})
#: The characters a relayed path may hold: IMDS paths are lower-case words, MAC addresses (``:``),
#: tag keys (``+ = . _ : / @``). Anything else (``%``, ``;``, ``\\``, spaces) is refused.
RELAY_PATH = re.compile(r"/[A-Za-z0-9._~:@+=,/-]*")
#: AWS's version segments: ``latest``, ``1.0`` and the dated versions (``2021-07-15``).
_AWS_VERSION = re.compile(r"latest|1\.0|\d{4}-\d{2}-\d{2}")
#: What each cloud relays when ``node.passthrough_paths`` is empty: a path is judged by its longest
#: matching rule (``!``: refuse), at segment boundaries; no match: refused.
DEFAULT_PATHS: Mapping[PassthroughCloud, tuple[str, ...]] = {
    "aws": ("/latest/api/token", "/latest/meta-data", "/latest/dynamic/instance-identity/document"),
    "azure": ("/metadata/instance", "/metadata/versions", "/metadata/loadbalancer", "/metadata/scheduledevents"),
}
#: Request bodies relayed at most: AWS's requests have none, Azure's scheduled-events
#: acknowledgement is a few event ids; aiohttp's client_max_size for the app is the same 4 KiB.
MAX_RELAY_BODY_BYTES = 4096
#: Relays in flight at once. Each holds one of node.max_concurrent_requests (500) for up to the
#: timeout: with IMDS slow or black-holed, relays beyond this get 503 at once, so at least 400 slots
#: stay for Google token requests (the capacity lesson of SEC-24 / SEC-35).
MAX_RELAYS_IN_FLIGHT = 100
#: Connections kept to IMDS: one per relay in flight at most.
RELAY_CONNECTIONS = MAX_RELAYS_IN_FLIGHT
#: An answer without Content-Length to an HTTP/1.0 client (no chunked encoding there) is read whole,
#: up to this much, then sent with its length. IMDS's largest item, user-data, is at most 16 KiB.
MAX_BUFFERED_BYTES = 1 << 20
_CHUNK_BYTES = 64 * 1024
_GOOGLE_HEADERS = ("Metadata-Flavor", "X-Google-Metadata-Request")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "expect"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """A request of ``cloud``'s metadata service: relayed, or refused by the path rules."""

    cloud: PassthroughCloud
    relay: bool

    @property
    def route(self) -> str:
        """The request metrics' route label (bounded: one per cloud)."""
        return f"(passthrough {self.cloud})"


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True, slots=True)
class PathRules:
    """Longest-prefix rules at segment boundaries, lower-case; a tie refuses. A path under one of
    ``never`` is refused before any rule is looked at."""

    rules: tuple[tuple[str, bool], ...]  # (prefix without a trailing "/", allowed)
    never: tuple[str, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str], *, never: Iterable[str] = ()) -> PathRules:
        rules = []
        for entry in entries:
            allowed = not entry.startswith("!")
            rules.append((entry.removeprefix("!").lower().rstrip("/"), allowed))
        return cls(tuple(rules), tuple(never))

    def allows(self, path: str) -> bool:
        if any(_under(path, floor) for floor in self.never):
            return False
        best, allowed = -1, False
        for prefix, allow in self.rules:
            if _under(path, prefix) and (len(prefix) > best or (len(prefix) == best and not allow)):
                best, allowed = len(prefix), allow
        return allowed


class Passthrough:
    """The relay of one node agent. ``session_ctx`` (a ``cleanup_ctx`` entry) owns its client."""

    def __init__(self, *, clouds: Iterable[PassthroughCloud], paths: Iterable[str], address: HostPort,
                 timeout_s: float, responder: Responder) -> None:
        self._clouds = frozenset(clouds)
        configured = tuple(paths)
        self._rules = {cloud: PathRules.parse(
            [p for p in configured if p.removeprefix("!").split("/")[1].lower() == PASSTHROUGH_CLOUDS[cloud]]
            if configured else DEFAULT_PATHS[cloud], never=NEVER_RELAYED[cloud]) for cloud in self._clouds}
        self.address = address
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._timeout_s = timeout_s
        self._r = responder
        self._session: aiohttp.ClientSession | None = None
        self._in_flight = 0

    @classmethod
    def from_config(cls, node: NodeConfig, responder: Responder) -> Passthrough | None:
        if not node.passthrough:
            return None
        return cls(clouds=node.passthrough, paths=node.passthrough_paths, address=node.passthrough_address,
                   timeout_s=node.passthrough_timeout_seconds, responder=responder)

    async def session_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """The relay's client for the app's lifetime.

        aiohttp's client directly, not the ``HttpClient`` seam of the credential pipeline: that one
        buffers whole bodies into frozen values, decodes them, and adds its own headers, where a
        relay must stream bytes as they are and add nothing."""
        connector = aiohttp.TCPConnector(limit=RELAY_CONNECTIONS, use_dns_cache=False)
        # SECURITY: DummyCookieJar: a cookie one pod's answer sets is never sent for another pod.
        # trust_env=False: the agent's HTTP(S)_PROXY never sees (or forwards) a pod's request.
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, auto_decompress=False,
                                              cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                                              skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent",
                                                                 "Content-Type"))
        try:
            yield
        finally:
            await self._session.close()
            self._session = None

    def judge(self, method: str, target: str, headers: CIMultiDictProxy[str]) -> Verdict | None:
        """Whether a request is the cloud's (relayed or refused) or metaemu's (None). Pure."""
        if not target.startswith("/") or any(name in headers for name in _GOOGLE_HEADERS):
            return None
        path = target.partition("?")[0]
        try:
            canonical = normalise_path(path)
        except UnicodeDecodeError:  # not UTF-8 once decoded: metaemu's own rules answer it
            return None
        if canonical is None or "computemetadata" in canonical.path.lower() or "computemetadata" in path.lower():
            return None
        segments = canonical.key.lower().split("/")
        cloud = self._cloud(segments[1], headers)
        if cloud is None or method not in RELAY_METHODS:
            return None
        if cloud == "aws":
            segments[1] = "latest"  # every version is judged by the /latest/ rules
        judged = "/".join(segments).rstrip("/") or "/"
        canonical_target = path == canonical.key and RELAY_PATH.fullmatch(path) is not None
        return Verdict(cloud=cloud, relay=canonical_target and self._rules[cloud].allows(judged))

    def _cloud(self, first: str, headers: CIMultiDictProxy[str]) -> PassthroughCloud | None:
        if "aws" in self._clouds and _AWS_VERSION.fullmatch(first):
            return "aws"
        if "azure" in self._clouds and first == PASSTHROUGH_CLOUDS["azure"]:
            values = headers.getall("Metadata", ())
            if values and all(v.strip().lower() == "true" for v in values):
                return "azure"
        return None

    def refused(self) -> web.Response:
        """A path the rules refuse: 404, what IMDS answers for an item that does not exist."""
        return self._r.text(404, "Not relayed to the cloud's metadata service: node.passthrough_paths does not "
                            "allow this path (metaemu).\n")

    async def forward(self, request: web.Request, verdict: Verdict) -> web.Response:
        """Relay ``request`` and stream the answer back. Never raises for the upstream's failures:
        502 when it cannot be reached or answers malformed, 504 when it does not answer within the
        timeout, 413 for a body over ``MAX_RELAY_BODY_BYTES``, 503 over ``MAX_RELAYS_IN_FLIGHT``; a
        failure after the answer started aborts the connection (the pod sees it truncated)."""
        session = self._session
        if session is None or self._in_flight >= MAX_RELAYS_IN_FLIGHT:
            return self._r.text(503, "metaemu is relaying too many requests to the cloud's metadata service; "
                                "retry shortly.\n", extra={"Retry-After": "1"})
        body = await _read_body(request)
        if body is None:
            return self._r.text(413, f"Request bodies relayed to the cloud's metadata service are at most "
                                f"{MAX_RELAY_BODY_BYTES} bytes (metaemu).\n", extra={"Connection": "close"})
        url = URL(f"http://{self.address}{request.raw_path}", encoded=True)
        self._in_flight += 1
        try:
            async with session.request(request.method, url, headers=_end_to_end(request.headers),
                                       data=body or None, allow_redirects=False) as upstream:
                return await self._stream_back(request, upstream, verdict)
        except TimeoutError:
            return self._failed(504, verdict, f"no answer within {self._timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            return self._failed(502, verdict, exc.strerror or type(exc).__name__)
        except aiohttp.ClientError as exc:
            return self._failed(502, verdict, type(exc).__name__)
        finally:
            self._in_flight -= 1

    async def _stream_back(self, request: web.Request, upstream: aiohttp.ClientResponse,
                           verdict: Verdict) -> web.Response:
        headers = _end_to_end(upstream.headers)
        length = upstream.headers.get(hdrs.CONTENT_LENGTH)
        if length is not None and length.isdigit():
            headers[hdrs.CONTENT_LENGTH] = length
        elif request.version < aiohttp.HttpVersion11:  # no chunked encoding for HTTP/1.0: buffer it
            data = await upstream.content.read(MAX_BUFFERED_BYTES + 1)
            if len(data) > MAX_BUFFERED_BYTES:
                return self._failed(502, verdict, "an answer too large to buffer for an HTTP/1.0 client")
            return web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=data)
        # A web.Response streamed by hand (the handler's contract is web.Response): prepared here,
        # written chunk by chunk; aiohttp finishes it with write_eof once the handler returns it.
        response = web.Response(status=upstream.status, reason=upstream.reason, headers=headers)
        if length is None and request.method != "HEAD":
            response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_chunked(_CHUNK_BYTES):
                await response.write(chunk)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("passthrough answer cut short", extra={"cloud": verdict.cloud, "error": type(exc).__name__})
            if request.transport is not None:
                request.transport.abort()  # never let a truncated answer look complete
        return response

    def _failed(self, status: int, verdict: Verdict, reason: str) -> web.Response:
        log.warning("passthrough relay failed", extra={"cloud": verdict.cloud, "status": status, "error": reason,
                                                       "upstream": str(self.address)})
        return self._r.text(status, f"metaemu could not relay this request to the cloud's metadata service at "
                            f"{self.address}: {reason}.\n")


async def _read_body(request: web.Request) -> bytes | None:
    """The request body, or None when it is over ``MAX_RELAY_BODY_BYTES`` (checked before reading
    when Content-Length says so, else while reading a chunked one)."""
    if not request.body_exists:
        return b""
    if request.content_length is not None and request.content_length > MAX_RELAY_BODY_BYTES:
        return None
    data = bytearray()
    while chunk := await request.content.read(MAX_RELAY_BODY_BYTES + 1 - len(data)):
        data += chunk
        if len(data) > MAX_RELAY_BODY_BYTES:
            return None
    return bytes(data)


def _end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """``headers`` without the hop-by-hop fields (RFC 9110 §7.6.1) and Content-Length (the relay
    sets its own for what it sends), every copy of the others kept in order. A repeated field keeps
    its first spelling (names are case-insensitive, RFC 9110 §5.1): aiohttp's client would drop an
    earlier copy spelled differently."""
    named = {token.strip().lower() for value in headers.getall(hdrs.CONNECTION, ()) for token in value.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    spelling: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in _HOP_BY_HOP or lower in named or lower.startswith("proxy-") or lower == "content-length":
            continue
        out.add(spelling.setdefault(lower, name), value)
    return out
