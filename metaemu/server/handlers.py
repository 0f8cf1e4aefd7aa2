"""The metadata request handler: request rules, routing over the pre-rendered tree, and the
dynamic ``token`` and ``identity`` leaves.

One handler serves every request (the metadata listener hands each one straight to it, with no
router: create_metadata_app). Routing is a dict lookup on the canonical path, which keeps the hot
path short (the benchmark compares it with a bare aiohttp handler). Order of checks:
X-Forwarded-For (R-06), method (R-12), Host or the absolute-form authority (SEC-22), normalise
(SEC-19), Metadata-Flavor (R-01..R-05), lookup, then query rules. In node mode with
``node.passthrough``, a request of the cloud's own metadata service is told apart right after the
X-Forwarded-For check and relayed (metaemu.server.passthrough), never a Google one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from aiohttp import hdrs, web
from multidict import CIMultiDictProxy, istr

from metaemu.cache.credentials import CachedCredentials, IdTokenKey, ScopeKey
from metaemu.clock import Clock
from metaemu.credentials.tokens import AccessToken
from metaemu.errors import CredentialError, NotConfiguredError
from metaemu.metrics import Metrics
from metaemu.pods.identity import Refusal
from metaemu.server.context import ContextProvider, RequestContext
from metaemu.server.limits import RateLimiter
from metaemu.server.metadata_tree import Body, Entry
from metaemu.server.passthrough import Passthrough, Verdict
from metaemu.server.protocol import MetadataRequestHandler
from metaemu.server.responses import JSON, RETRY_AFTER_S, TEXT, Responder, credential_error_text
from metaemu.server.rules import HostAllowList, is_true, normalise_path, parse_query, request_authority

log = logging.getLogger(__name__)

#: A request that finds no token (start-up, a new scope set or audience) waits this long for the
#: in-flight exchange, then gets 503 (issue §4); under Python's 3 s metadata timeout (ERR-08).
FIRST_TOKEN_WAIT_S = 2.0
#: wait_for_change holds at most this long, whatever timeout_sec says (Q-12 "[?]": the values of
#: this server change only on restart, so clients simply re-poll).
LONG_POLL_CAP_S = 300.0
#: Google's emulator notes "500 max hanging gets" (Q-13); beyond that, 503 so they cannot starve
#: token requests.
LONG_POLL_LIMIT = 500
#: Pre-built case-insensitive header names: lookups skip re-folding the name on every request.
_FLAVOR = istr("Metadata-Flavor")
_XFF = hdrs.X_FORWARDED_FOR
_HOST = hdrs.HOST
#: Fast-path memos (Host values, raw token query strings) stop growing at this many entries; real
#: clients use a handful of each.
_MEMO_LIMIT = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    route: str
    response: web.Response


class MetadataHandler:
    def __init__(self, *, contexts: ContextProvider, responder: Responder, metrics: Metrics, clock: Clock,
                 hosts: HostAllowList, limiter: RateLimiter | None = None, max_concurrent: int | None = None,
                 passthrough: Passthrough | None = None) -> None:
        self.contexts = contexts
        self._passthrough = passthrough
        self._index = contexts.default_index
        self._static_context = contexts.static  # sidecar mode: one context, and the fast path
        self._static_creds = contexts.static.credentials if contexts.static else None
        self._r = self.responder = responder
        self._limiter = limiter
        self._max_concurrent = max_concurrent
        self._in_flight = 0
        self._metrics = metrics
        self._clock = clock
        self._hosts = hosts
        self._gce = responder.profile == "gce"
        self._long_polls = 0
        self.shutdown = asyncio.Event()  # set on SIGTERM: releases long polls, closes connections
        # Memos for the fast path, bounded so hostile input cannot grow them.
        self._hosts_seen: set[str] = set()
        self._scope_keys: dict[str, ScopeKey] = {}
        self._last_body: tuple[AccessToken, int, bytes] | None = None

    def at_capacity(self) -> bool:
        """Whether a request arriving now gets the concurrency cap's 503 (SEC-35)."""
        return self._max_concurrent is not None and self._in_flight >= self._max_concurrent

    async def __call__(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        fast = self._fast_path(request) if self._static_creds is not None else None
        if fast is not None:
            route, response = fast
        elif self.at_capacity():
            route = "(over capacity)"  # SEC-35: refuse predictably rather than queue without bound
            response = self._r.text(503, "The metadata server is busy; retry shortly.\n", extra={"Retry-After": "1"})
        else:
            self._in_flight += 1
            try:
                reply = await self._dispatch(request)
            finally:
                self._in_flight -= 1
            route, response = reply.route, reply.response
        self._metrics.requests.record(route, response.status, time.perf_counter() - started)
        if self.shutdown.is_set():  # draining (issue #11): the client's next request opens a new
            response.force_close()  # connection, which the kernel gives to the successor agent
        return response

    def _fast_path(self, request: web.Request) -> tuple[str, web.Response] | None:
        """Serve the common case without awaiting: a GET with the flavor header, an allowed Host,
        no X-Forwarded-For, an exact canonical path, and (for ``token``) a cached token.

        SECURITY: this only ever answers a subset of what ``_dispatch`` would answer, identically;
        anything else (any other spelling of a path included: the raw target must be a canonical key
        as is) returns None and goes through every rule in ``_dispatch``.
        """
        if request.method != "GET":
            return None
        headers = request.headers
        if headers.get(_FLAVOR) != "Google" or _XFF in headers or len(headers.getall(_FLAVOR)) != 1:
            return None
        host = headers.get(_HOST, "")
        if host not in self._hosts_seen and not self._remember_host(host):
            return None
        path, _, raw_query = request.raw_path.partition("?")
        entry = self._index.get(path)
        if entry is None:
            return None
        if entry.kind == "dynamic":
            creds = self._static_creds
            if entry.dynamic != "token" or creds is None:
                return None
            now_ts = self._clock.time()
            key = self._scope_keys.get(raw_query)
            if key is None:
                key = self._scope_key(creds, raw_query)
            token = creds.access.get_nowait(key, now_ts)
            if token is None:
                return None
            return entry.route, self._r.ok(self._token_body(token, now_ts), JSON, None)
        plain = entry.plain
        if raw_query or plain is None:
            return None
        return entry.route, self._r.ok(plain.data, plain.content_type, plain.etag)

    def _remember_host(self, host: str) -> bool:
        if not self._hosts.allows(host):
            return False
        if len(self._hosts_seen) < _MEMO_LIMIT:
            self._hosts_seen.add(host)
        return True

    def _scope_key(self, creds: CachedCredentials, raw_query: str) -> ScopeKey:
        params = parse_query(raw_query) if raw_query else {}
        key = creds.access_key(_requested_scopes(params))
        if len(self._scope_keys) < _MEMO_LIMIT:
            self._scope_keys[raw_query] = key
        return key

    def _token_body(self, token: AccessToken, now_ts: float) -> bytes:
        """SA-06 body; the last one is reused while the token and its whole seconds are unchanged."""
        expires_in = token.expires_in_at(now_ts)
        last = self._last_body
        if last is not None and last[0] is token and last[1] == expires_in:
            return last[2]
        body = (f'{{"access_token":{json.dumps(token.value)},"expires_in":{expires_in},'
                f'"token_type":"Bearer"}}').encode()
        self._last_body = (token, expires_in, body)
        return body

    def _blocked(self, reason: str, response: web.Response, route: str = "(blocked)") -> Reply:
        self._metrics.blocked.labels(reason).inc()
        return Reply(route=route, response=response)

    async def _dispatch(self, request: web.Request) -> Reply:
        headers = request.headers
        # SECURITY: an SSRF through a proxy arrives with X-Forwarded-For; the real server refuses it.
        if "X-Forwarded-For" in headers:
            return self._blocked("xff", self._r.text(403, "Calls with X-Forwarded-For header are not allowed "
                                                          "by the metadata server.\n"))
        if self._passthrough is not None:
            verdict = self._passthrough.judge(request.method, request.raw_path, headers)
            if verdict is not None:
                return await self._relay(request, verdict)
        if request.method != "GET":
            return self._blocked("method", self._r.text(405, "Method Not Allowed\n", extra={"Allow": "GET"}))
        if not self._host_allowed(request):
            return self._host_refused()
        raw_path = request.rel_url.raw_path
        canonical = normalise_path(raw_path)
        if canonical is None:
            return Reply(route="(unmatched)", response=self._r.not_found(raw_path))
        index = self._index
        context: RequestContext | None = None
        if canonical.path.split("/", 2)[1] == "computeMetadata":
            if not self._has_flavor(headers):
                entry = index.get(canonical.key)
                return self._blocked("metadata_flavor", self._r.missing_flavor(raw_path),
                                     route=entry.route if entry else "(unmatched)")
            resolved = await self._caller(request)
            if isinstance(resolved, Reply):
                return resolved
            context, index = resolved, resolved.index
        entry = index.get(canonical.key)
        if entry is None:
            directory = None if canonical.trailing_slash else index.get(canonical.path + "/")
            if directory is not None:
                qs = request.rel_url.raw_query_string
                location = canonical.path + "/" + (f"?{qs}" if qs else "")
                return Reply(route=directory.route, response=self._r.redirect(location))
            return Reply(route="(unmatched)", response=self._r.not_found(raw_path))
        params = parse_query(request.query_string) if request.query_string else {}
        if entry.kind == "dynamic":
            assert context is not None  # dynamic entries exist only under /computeMetadata
            creds = context.credentials
            response = await (self._token(creds, params) if entry.dynamic == "token" else self._identity(creds, params))
        else:
            response = await self._static(entry, params, request)
        return Reply(route=entry.route, response=response)

    def _host_allowed(self, request: web.Request) -> bool:
        authority = request_authority(request.raw_path, request.headers.get(_HOST))
        return authority is not None and self._hosts.allows(authority)

    def _host_refused(self) -> Reply:
        return self._blocked("host", self._r.text(403, "Host header is not a name of the metadata server "
                                                       "(operators: see allowed_hosts).\n"))

    async def _caller(self, request: web.Request) -> RequestContext | Reply:
        """The caller's context, within its rate limit; else the refusal or the 429 to answer."""
        resolved = self._static_context or await self.contexts.context_for(request)
        if isinstance(resolved, Refusal):  # node mode: the caller is no pod of ours (SEC-08..SEC-14)
            extra = {"Retry-After": str(resolved.retry_after_s)} if resolved.retry_after_s else None
            return Reply(route="(unidentified)", response=self._r.text(resolved.status, resolved.message + "\n",
                                                                       extra=extra))
        return self._rate_limit(resolved) or resolved

    async def _relay(self, request: web.Request, verdict: Verdict) -> Reply:
        """A request of the cloud's metadata service (node.passthrough), relayed or refused.

        Judged like a Google request before it leaves: Host (SEC-22, DNS rebinding), then the
        caller and its rate limit. SECURITY: the relay reaches the cloud's service with the node's
        standing (IMDS sees the node's address; its IMDSv2 hop limit is spent on the node), so only a
        pod of this node may use it: an unknown address, a pod of another node and a host-network
        caller get the same 403 (503 while a new pod is being looked up) as for a token. The per-pod
        bucket is shared with Google requests (SEC-34): one pod cannot flood the instance's IMDS
        throttle, which kubelet, the CNI and every other pod depend on."""
        assert self._passthrough is not None
        if not self._host_allowed(request):
            return self._host_refused()
        if not verdict.relay:
            return self._blocked("passthrough_path", self._passthrough.refused(), route=verdict.route)
        resolved = await self._caller(request)
        if isinstance(resolved, Reply):
            return resolved
        return Reply(route=verdict.route, response=await self._passthrough.forward(request, verdict))

    def _rate_limit(self, context: RequestContext) -> Reply | None:
        if self._limiter is None or context.rate_key is None:
            return None
        wait_s = self._limiter.allow(context.rate_key)
        if wait_s is None:
            return None
        self._metrics.rate_limited.inc()  # SEC-34
        return Reply(route="(rate limited)", response=self._r.text(
            429, "Too many requests from this pod; slow down.\n", extra={"Retry-After": str(wait_s)}))

    def _has_flavor(self, headers: CIMultiDictProxy[str]) -> bool:
        # SECURITY: every copy must agree; a second, different copy is never "first one wins"
        # (a proxy or library in between may read the other one).
        flavors = headers.getall(_FLAVOR, ())
        if flavors:
            return all(f == "Google" for f in flavors)
        # the legacy header still works on GCE; the GKE server rejects it.
        legacy = headers.getall("X-Google-Metadata-Request", ())
        return self._gce and bool(legacy) and all(v.lower() == "true" for v in legacy)

    # ------------------------------------------------------------ static keys

    async def _static(self, entry: Entry, params: dict[str, str], request: web.Request) -> web.Response:
        alt = params.get("alt")
        if alt not in (None, "json", "text"):
            return self._r.text(400, "alt must be 'json' or 'text'\n")
        wait = is_true(params.get("wait_for_change"))
        if entry.kind == "directory":
            if is_true(params.get("recursive")):
                body = entry.as_text if alt == "text" else entry.as_json
            elif alt is not None or wait:
                return self._r.text(400, "alt and wait_for_change on a directory need recursive=true\n")
            else:
                body = entry.plain
        else:
            body = entry.as_json if alt == "json" else entry.as_text if alt == "text" else entry.plain
        assert body is not None
        if wait:
            gone = request.protocol.client_gone if isinstance(request.protocol, MetadataRequestHandler) else None
            return await self._long_poll(body, params, gone)
        return self._r.ok(body.data, body.content_type, body.etag)

    async def _long_poll(self, body: Body, params: dict[str, str], gone: asyncio.Event | None) -> web.Response:
        """Q-10..Q-12: hold until the value changes (never, until restart) or timeout_sec passes."""
        last_etag = params.get("last_etag")
        if last_etag is not None and last_etag != body.etag:  # stale etag -> answer now
            return self._r.ok(body.data, body.content_type, body.etag)
        timeout = params.get("timeout_sec")
        if timeout is not None and not timeout.isdigit():
            return self._r.text(400, "timeout_sec must be a non-negative integer\n")
        if self._long_polls >= LONG_POLL_LIMIT:
            return self._r.text(503, "too many wait_for_change requests\n", extra={"Retry-After": "1"})
        self._long_polls += 1
        self._metrics.long_polls.inc()
        try:
            hold = min(float(timeout), LONG_POLL_CAP_S) if timeout is not None else LONG_POLL_CAP_S
            await self._hold(hold, gone)
        finally:
            self._long_polls -= 1
            self._metrics.long_polls.dec()
        return self._r.ok(body.data, body.content_type, body.etag)

    async def _hold(self, seconds: float, gone: asyncio.Event | None) -> None:
        """Wait ``seconds``, or until shutdown, or until the client is gone (issue #13: a departed
        client must not keep its slot)."""
        if gone is None:
            await self._clock.sleep(seconds, until=self.shutdown)
            return
        release = asyncio.Event()
        watchers = [asyncio.ensure_future(event.wait()) for event in (self.shutdown, gone)]
        for watcher in watchers:
            watcher.add_done_callback(lambda _: release.set())
        try:
            await self._clock.sleep(seconds, until=release)
        finally:
            for watcher in watchers:
                watcher.cancel()

    # ------------------------------------------------------------ dynamic keys

    async def _token(self, creds: CachedCredentials, params: dict[str, str]) -> web.Response:
        try:
            token = await creds.access_token(creds.access_key(_requested_scopes(params)), wait_s=FIRST_TOKEN_WAIT_S)
        except CredentialError as exc:
            return self._credential_error(exc, "access token")
        return self._r.ok(self._token_body(token, self._clock.time()), JSON, None)  # SA-06, SA-07, SA-08

    async def _identity(self, creds: CachedCredentials, params: dict[str, str]) -> web.Response:
        audience = params.get("audience", "")
        if not audience:
            return self._r.text(400, "non-empty audience parameter required\n")  # SA-14
        fmt = params.get("format", "standard") or "standard"
        if fmt not in ("standard", "full"):
            return self._r.text(400, "format must be 'standard' or 'full'\n")
        if creds.service_account is None:
            return self._r.text(404, "Identity tokens need a Google service account: this metadata server serves "
                                "a federated principal, and no workload_identity.service_account is configured "
                                "to impersonate (GKE-06).\n")
        key = IdTokenKey(audience=audience, format=fmt, licenses=is_true(params.get("licenses")))
        try:
            token = await creds.id_token(key, wait_s=FIRST_TOKEN_WAIT_S)
        except CredentialError as exc:
            return self._credential_error(exc, "ID token")
        return self._r.ok(token.value.encode(), TEXT, None)  # SA-12: the bare JWT

    def _credential_error(self, exc: CredentialError, what: str) -> web.Response:
        status = 404 if isinstance(exc, NotConfiguredError) else 403 if exc.permanent else 503
        extra = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return self._r.text(status, credential_error_text(exc, what), extra=extra)


def _requested_scopes(params: dict[str, str]) -> list[str] | None:
    """SA-09: any ``scopes`` value is accepted; comma-separated, blanks ignored."""
    scopes = params.get("scopes")
    return [s for s in scopes.split(",") if s.strip()] if scopes else None
