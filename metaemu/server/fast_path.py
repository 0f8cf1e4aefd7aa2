"""The metadata listener's fast path (issue #12): the common request answered at the protocol level,
in front of aiohttp, with pre-rendered bytes.

A profile of the token path showed where the time goes: aiohttp's request parsing and response
building cost more than everything metaemu does, so no handler trimming gets past a bare aiohttp
handler. ``FastPathProtocol`` is each connection's first protocol. When a read holds exactly one
complete request head that ``FastAnswers.answer`` can prove is an exact, well-formed GET of a hot
leaf whose answer is in memory, it writes that answer, byte for byte what aiohttp and
``MetadataHandler`` would write (tests/server/test_fast_path_differential.py sends the same corpus
to a server with and without it). On anything else — a partial read, a pipelined second request,
a body, an unknown header, a second copy of a header, a target spelled any other way, a token not
cached, write back-pressure: any doubt at all — it hands the connection, with the bytes it read, to
the full aiohttp protocol for good (``transport.set_protocol``), which then sees exactly the
connection it would have seen from the start.

What the fast path may answer, under ``/computeMetadata/`` only:
- ``token`` of the default account's path (``default`` or its email) with no query: the cached
  token for the default scopes;
- ``identity?audience=A`` with A of URL-safe characters only, for an audience already cached;
- every static leaf and directory listing, without a query (email, project id, numeric project id,
  aliases, scopes, zone, ...).
In sidecar mode for its one context; in node mode for the caller the full path identified at the
connection's peer address (``NodeAgent.fast_caller``: forgotten when the pod watch reports any
change to that address), within the per-pod rate limit and the concurrency cap.

It keeps what the full path guarantees: the read-header deadline (SEC-24) until the first request,
aiohttp's keep-alive timeout after each answer, the request metrics and token-cache counts of the
full handler (plain integers, published at scrape time), and a graceful stop.

Written by hand because no library answers HTTP/1.1 this way; the parser accepts a strict subset of
what aiohttp accepts, and everything outside it goes to aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from aiohttp.helpers import rfc822_formatted_time

from metaemu.cache.credentials import CachedCredentials, IdTokenKey
from metaemu.clock import Clock
from metaemu.credentials.tokens import AccessToken, IdentityToken
from metaemu.metrics import Metrics
from metaemu.pods.identity import transport_peer_ip
from metaemu.pods.objects import normalize_ip
from metaemu.server.context import RequestContext
from metaemu.server.deadline import HEADER_DEADLINE_S, HeaderDeadline
from metaemu.server.limits import RateLimiter
from metaemu.server.metadata_tree import Body
from metaemu.server.responses import JSON, TEXT, Responder
from metaemu.server.rules import HostAllowList

#: A longer head goes to aiohttp (real clients send about 300 bytes): well inside aiohttp's own
#: limits (protocol.py), so a head the fast path answers is never one aiohttp would refuse.
MAX_HEAD_BYTES = 4096
#: Any byte outside printable ASCII, CR, LF and HT: hand over (obs-text, NUL, bare CR are aiohttp's).
_UNUSUAL = re.compile(rb"[^\x20-\x7e\r\n\t]")
#: An audience the fast path takes as is: no percent-encoding, '+', '&', ';' or '=' to decode.
_PLAIN_AUDIENCE = re.compile(rb"[A-Za-z0-9._~:/-]{1,512}")
_IDENTITY_QUERY = b"?audience="
#: Header fields the full handler never reads on a GET of these paths: repeatable, any value.
_IGNORED = frozenset({b"user-agent", b"accept", b"accept-encoding", b"accept-language", b"x-goog-api-client",
                      b"cache-control"})
_HOST, _FLAVOR, _CONNECTION = b"host", b"metadata-flavor", b"connection"
_KEEP_ALIVE = frozenset({b"keep-alive", b"Keep-Alive"})
_OWS = b" \t"
#: Memo sizes (Host values seen; whole request heads judged fast-path material): hostile input
#: cannot grow them further, and real clients use a handful of each.
_MEMO_LIMIT = 256
MAX_REMEMBERED_HEADS = 256  # at most MAX_HEAD_BYTES each: 1 MiB
#: Node mode remembers a few heads per identified pod (a pod's clients send one or two), of at
#: most 1 KiB: 8 KiB per pod, whatever its containers send.
MAX_HEADS_PER_POD = 8
MAX_CONTEXT_HEAD_BYTES = 1024


@dataclass(slots=True)
class _Leaf:
    """A static answer: everything but the Date header is fixed."""

    route: str
    head: bytes  # status line and headers up to "Date: "
    tail: bytes  # the rest: end of headers and the body
    second: int = -1
    rendered: bytes = b""

    def ready(self, now_ts: float) -> bool:
        return True

    def render(self, answers: FastAnswers, now_ts: float) -> bytes:
        second = int(time.time())
        if self.second != second:
            self.rendered = self.head + rfc822_formatted_time().encode() + self.tail
            self.second = second
        return self.rendered


@dataclass(slots=True)
class _Token:
    """The default token's answer, rebuilt when the token, its whole seconds left or Date change."""

    route: str
    credentials: CachedCredentials
    token: AccessToken | None = None
    expires_in: int = -1
    second: int = -1
    rendered: bytes = b""
    found: object = None  # what ready() found, for render()

    def ready(self, now_ts: float) -> bool:
        self.found = self.credentials.access.servable(self.credentials.default_scopes, now_ts)
        return self.found is not None

    def render(self, answers: FastAnswers, now_ts: float) -> bytes:
        token = self.credentials.access.served(self.found)  # found by ready(), this loop iteration
        expires_in = token.expires_in_at(now_ts)
        second = int(time.time())
        if self.token is not token or self.expires_in != expires_in or self.second != second:
            # The same text MetadataHandler._token_body renders (SA-06).
            body = (b'{"access_token":' + json.dumps(token.value).encode() + b',"expires_in":'
                    + str(expires_in).encode() + b',"token_type":"Bearer"}')
            self.rendered = answers.dynamic_response(JSON, body)
            self.token, self.expires_in, self.second = token, expires_in, second
        return self.rendered


@dataclass(slots=True)
class _IdToken:
    """An ID token's answer for one audience, rebuilt when the token or Date change."""

    route: str
    credentials: CachedCredentials
    key: IdTokenKey
    token: IdentityToken | None = None
    second: int = -1
    rendered: bytes = b""
    found: object = None  # what ready() found, for render()

    def ready(self, now_ts: float) -> bool:
        self.found = self.credentials.identity.servable(self.key, now_ts)
        return self.found is not None

    def render(self, answers: FastAnswers, now_ts: float) -> bytes:
        token = self.credentials.identity.served(self.found)  # found by ready(), this loop iteration
        second = int(time.time())
        if self.token is not token or self.second != second:
            self.rendered = answers.dynamic_response(TEXT, token.value.encode())
            self.token, self.second = token, second
        return self.rendered


_Slot = _Leaf | _Token | _IdToken


@dataclass(frozen=True, slots=True)
class _Want:
    """What a judged head asks for: a path as sent, and for ``identity`` the audience."""

    path: str
    audience: str | None = None


class ContextAnswers:
    """The fast answers of one request context (sidecar's one; one per pod in node mode), built on
    first use from the context's own tree and credentials."""

    __slots__ = ("_answers", "_credentials", "_index", "_slots", "by_head", "max_heads")

    def __init__(self, answers: FastAnswers, context: RequestContext, *, max_heads: int) -> None:
        self._answers = answers
        self._index = context.index
        self._credentials = context.credentials
        self._slots: dict[_Want, _Slot | None] = {}
        #: Head bytes -> their answer here (judged heads only; bounded like the judged-head memo).
        self.by_head: dict[bytes, _Slot] = {}
        self.max_heads = max_heads

    def slot(self, want: _Want) -> _Slot | None:
        try:
            return self._slots[want]
        except KeyError:
            slot = self._build(want)
            if len(self._slots) < self.max_heads * 4:  # answers kept: leaves, the token, some audiences
                self._slots[want] = slot
            return slot

    def _build(self, want: _Want) -> _Slot | None:
        entry = self._index.get(want.path)
        if entry is None or not want.path.startswith("/computeMetadata/"):
            return None  # unknown here; and outside /computeMetadata the rules differ (no flavor needed)
        creds = self._credentials
        if entry.kind == "dynamic":
            if want.audience is None:
                return _Token(route=entry.route, credentials=creds) if entry.dynamic == "token" else None
            if entry.dynamic != "identity" or creds.service_account is None:
                return None
            return _IdToken(route=entry.route, credentials=creds,
                            key=IdTokenKey(audience=want.audience, format="standard", licenses=False))
        if want.audience is not None or entry.plain is None:
            return None
        return self._answers.leaf(entry.route, entry.plain)


class CallerLookup(Protocol):
    """Node mode's memo of identified callers (``NodeAgent``), as the fast path needs it."""

    def fast_caller(self, ip: str) -> FastCaller | None:
        """The caller at ``ip`` if the full path identified it and nothing it depends on has
        changed since (its pod, its service account, its principal); no counting."""

    def count_found(self) -> None:
        """Count one lookup the way the full path counts an identified caller."""


class FastCaller(Protocol):
    context: RequestContext
    fast_answers: ContextAnswers | None


class FastAnswers:
    """Decides whether one complete request head is fast-path material and renders its answer.

    A head that passed every check is remembered (byte for byte, up to ``MAX_REMEMBERED_HEADS``)
    with what it asks for: real clients send the same bytes on every request, and the same bytes
    are always judged the same (the checks depend on nothing else), so a repeat costs one lookup.

    Sidecar mode answers for its one context. Node mode asks ``callers`` who the connection's peer
    is (the full path's memo, dropped by the pod watch), keeps the per-pod rate limit and the
    concurrency cap, and hands over whatever the memo does not know.
    """

    def __init__(self, *, static: RequestContext | None, callers: CallerLookup | None, responder: Responder,
                 metrics: Metrics, clock: Clock, hosts: HostAllowList, limiter: RateLimiter | None = None,
                 at_capacity: Callable[[], bool] | None = None) -> None:
        self._metrics = metrics
        self._clock = clock
        self._hosts = hosts
        self._callers = callers
        self._limiter = limiter
        self._at_capacity = at_capacity
        self._hosts_seen: set[bytes] = set()
        self._base = b"".join(f"{k}: {v}\r\n".encode() for k, v in responder.base_headers.items())
        self._heads: dict[bytes, _Want] = {}
        self._static = ContextAnswers(self, static, max_heads=MAX_REMEMBERED_HEADS) if static is not None else None
        #: Requests answered here (plain integer; the request metrics count them as well).
        self.served = 0
        #: Set when the server drains (issue #11): every request goes to the full path, which
        #: answers it with ``Connection: close``.
        self.closing = False

    @property
    def enabled(self) -> bool:
        return self._static is not None or self._callers is not None

    def leaf(self, route: str, body: Body) -> _Leaf:
        head = (b"HTTP/1.1 200 OK\r\n" + self._base + f"Content-Type: {body.content_type}\r\nETag: {body.etag}\r\n"
                f"Content-Length: {len(body.data)}\r\nDate: ".encode())
        return _Leaf(route=route, head=head, tail=b"\r\n\r\n" + body.data)

    def dynamic_response(self, content_type: str, body: bytes) -> bytes:
        return (b"HTTP/1.1 200 OK\r\n" + self._base + f"Content-Type: {content_type}\r\nContent-Length: {len(body)}"
                f"\r\nDate: {rfc822_formatted_time()}\r\n\r\n".encode() + body)

    def answer(self, data: bytes, started: float, peer: str | None) -> bytes | None:
        """The complete response to ``data`` (one read ending in a blank line) from ``peer`` (the
        connection's normalised peer address), or None when the full handler must answer it.
        Nothing is counted or taken unless it answers; then it counts what the full path would."""
        if self.closing:
            return None
        caller = None
        answers = self._static
        if answers is None:  # node mode: the full path's memo of who is at this address
            if self._callers is None or peer is None or (self._at_capacity is not None and self._at_capacity()):
                return None
            caller = self._callers.fast_caller(peer)
            if caller is None:
                return None
            answers = caller.fast_answers
            if answers is None:
                answers = caller.fast_answers = ContextAnswers(self, caller.context, max_heads=MAX_HEADS_PER_POD)
        slot = answers.by_head.get(data)  # a head this context answered before: straight to its answer
        if slot is None:
            want = self._heads.get(data)
            if want is None:
                want = self._judge(data)
                if want is None:
                    return None
                if len(self._heads) < MAX_REMEMBERED_HEADS:
                    self._heads[data] = want
            slot = answers.slot(want)
            if slot is None:
                return None
            if len(answers.by_head) < answers.max_heads and len(data) <= MAX_CONTEXT_HEAD_BYTES:
                answers.by_head[data] = slot
        return self._serve(slot, started, caller)

    def _serve(self, slot: _Slot, started: float, caller: FastCaller | None) -> bytes | None:
        now_ts = self._clock.time()
        if not slot.ready(now_ts):
            return None
        if caller is not None:
            rate_key = caller.context.rate_key
            if self._limiter is not None and rate_key is not None and not self._limiter.take(rate_key):
                return None  # the full path answers 429 (and decides as if asked alone: RateLimiter.take)
            assert self._callers is not None
            self._callers.count_found()
        out = slot.render(self, now_ts)
        self._metrics.requests.record(slot.route, 200, time.perf_counter() - started)
        self.served += 1
        return out

    def _judge(self, data: bytes) -> _Want | None:
        """What ``data`` asks for, when it is exactly one strictly well-formed GET head with plain
        headers and a target without a query (or ``identity``'s one plain audience); else None."""
        if (len(data) > MAX_HEAD_BYTES or not data.startswith(b"GET /") or data.find(b"\r\n\r\n") != len(data) - 4
                or _UNUSUAL.search(data) is not None):
            return None
        lines = data[:-4].split(b"\r\n")
        if data.count(b"\n") != len(lines) + 1 or data.count(b"\r") != len(lines) + 1:
            return None  # a bare CR or LF somewhere: aiohttp's to judge
        request_line = lines[0]
        if not request_line.endswith(b" HTTP/1.1") or not self._headers_are_plain(lines):
            return None
        target = request_line[4:-9]
        path, sep, audience = target.partition(_IDENTITY_QUERY)
        if not sep:
            return None if b"?" in target or b"#" in target else _Want(path=target.decode("ascii"))
        if b"?" in path or not path.endswith(b"/identity") or _PLAIN_AUDIENCE.fullmatch(audience) is None:
            return None
        return _Want(path=path.decode("ascii"), audience=audience.decode("ascii"))

    def _headers_are_plain(self, lines: list[bytes]) -> bool:
        """Exactly one allowed Host, exactly one ``Metadata-Flavor: Google``, an optional
        ``Connection: keep-alive`` and otherwise only fields the handler ignores."""
        host = flavor = connection = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                return False
            name = name.lower()  # the name has no whitespace: a padded name matches nothing here
            value = value.strip(_OWS)
            if name in _IGNORED:
                continue
            if name == _HOST:
                if host or not self._host_allowed(value):
                    return False
                host = True
            elif name == _FLAVOR:
                if flavor or value != b"Google":
                    return False
                flavor = True
            elif name == _CONNECTION:
                if connection or value not in _KEEP_ALIVE:
                    return False
                connection = True
            else:
                return False  # X-Forwarded-For, Content-Length, Transfer-Encoding, anything else
        return host and flavor

    def _host_allowed(self, value: bytes) -> bool:
        if value in self._hosts_seen:
            return True
        if not value or not self._hosts.allows(value.decode("ascii")):
            return False
        if len(self._hosts_seen) < _MEMO_LIMIT:
            self._hosts_seen.add(value)
        return True


class FastPathProtocol(asyncio.Protocol):
    """One connection of the metadata listener while the fast path answers it."""

    __slots__ = ("_answers", "_full", "_header_timer", "_idle_s", "_idle_timer", "_idle_until", "_loop", "_open",
                 "_opened_at", "_paused", "_peer", "_transport")

    def __init__(self, *, answers: FastAnswers, full: Callable[[], asyncio.Protocol],
                 open_connections: set[FastPathProtocol], idle_timeout_s: float) -> None:
        self._answers = answers
        self._full = full
        self._open = open_connections
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._opened_at = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_until = 0.0
        self._idle_s = idle_timeout_s
        self._paused = False
        self._peer: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both have the same methods.
        self._transport = cast(asyncio.Transport, transport)
        # SECURITY: the kernel's peer address, once per connection (node mode's only identity input).
        peer = transport_peer_ip(transport)
        self._peer = normalize_ip(peer) if peer is not None else None
        self._open.add(self)
        self._opened_at = self._loop.time()
        # SEC-24: the first request's head must arrive within the deadline, as on the full path.
        self._header_timer = self._loop.call_at(self._opened_at + HEADER_DEADLINE_S, self._close)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if not self._paused and data.endswith(b"\r\n\r\n"):
            out = self._answers.answer(data, time.perf_counter(), self._peer)
            if out is not None:
                if self._header_timer is not None:
                    self._header_timer.cancel()
                    self._header_timer = None
                transport.write(out)
                # aiohttp's keep-alive timeout from the last answer; one timer, moved lazily.
                self._idle_until = self._loop.time() + self._idle_s
                if self._idle_timer is None:
                    self._idle_timer = self._loop.call_at(self._idle_until, self._idle_check)
                return
        self._hand_over(transport, data)

    def _hand_over(self, transport: asyncio.Transport, data: bytes) -> None:
        """Give the connection, and what was read, to the full protocol; this one is done."""
        first_request = self._header_timer is not None
        self._forget()
        inner = self._full()
        if first_request:  # no request answered yet: the read-header deadline still runs
            remaining = max(0.0, self._opened_at + HEADER_DEADLINE_S - self._loop.time())
            inner = HeaderDeadline(inner, deadline_s=remaining)
        transport.set_protocol(inner)
        inner.connection_made(transport)
        if self._paused:
            inner.pause_writing()
        inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None  # idle (every answer is written at once): close, as aiohttp does when idle

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()

    def pause_writing(self) -> None:
        self._paused = True  # the next request goes to aiohttp, which waits for the drain

    def resume_writing(self) -> None:
        self._paused = False

    def close_idle(self) -> None:
        """Graceful stop: nothing is ever in flight here, so close now."""
        self._close()

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self._loop.time() < self._idle_until:
            self._idle_timer = self._loop.call_at(self._idle_until, self._idle_check)
        else:
            self._close()

    def _close(self) -> None:
        self._header_timer = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _forget(self) -> None:
        self._open.discard(self)
        for timer in (self._header_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._idle_timer = None
