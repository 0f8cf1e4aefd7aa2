"""``FaultyKube``: the faults a real Kubernetes API server cannot be made to show on cue, put in front
of one.

Node-mode unit tests talk to the real kube-apiserver of the test bed (issue #10): objects, RBAC,
TokenRequest, admission policies, JSON patches and watches are the real server's. What it cannot do
on a test's command is what this transport adds, between ``KubeClient`` and the real adapter
(``KubeHttp``): record each call (for "made one call" assertions), answer it with a queued error,
hold it until released (a stalled server), refuse every call (an outage), end or break open watch
streams (a server-side ``timeoutSeconds``, a reset connection), insert lines into them (a bookmark
now, a malformed event), and put plain requests on the test's clock (a stalled call times out when
the test advances a ``FakeClock``, as ``AiohttpClient`` times out in real time).

``quiet()`` lets a test advance virtual time only while no forwarded call is on the wire, so a real
round trip never "takes" virtual seconds.

Not owned here: any Kubernetes behaviour (no objects, no authorization; a call that is not faulted
is forwarded unchanged and answered by the real server).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from metaemu.clock import Clock
from metaemu.pods.stream import KubeTransport, LineStream
from metaemu.testing.faults import FaultInjector
from metaemu.transport import HttpRequest, HttpResponse, TransportFailure

#: ``list`` / ``watch``: pods; ``sa_list`` / ``sa_watch``: the cluster's service accounts.
Endpoint = Literal["list", "watch", "get", "token", "node_get", "node_patch", "sa_list", "sa_watch", "other"]
_NODE = re.compile(r"^/api/v1/nodes/[^/]+$")
_TOKEN = re.compile(r"^/api/v1/namespaces/[^/]+/serviceaccounts/[^/]+/token$")
_GET = re.compile(r"^/api/v1/namespaces/[^/]+/(pods|serviceaccounts)/[^/]+$")
_PODS = re.compile(r"^/api/v1(/namespaces/[^/]+)?/pods$")
_ACCOUNTS = re.compile(r"^/api/v1/serviceaccounts$")
_JSON = {"Content-Type": "application/json"}
_END, _BROKEN = object(), object()


@dataclass(frozen=True, slots=True, kw_only=True)
class KubeCall:
    """One request as it arrived (before any fault)."""

    endpoint: Endpoint
    method: str
    path: str
    query: Mapping[str, str]
    body: Any  # decoded JSON, or None
    bearer: str = field(repr=False)  # the credential it carried (tests compare it; never printed)


@dataclass(frozen=True, slots=True, kw_only=True)
class KubeAnswer:
    call: KubeCall
    #: The status it got (the real server's unless faulted); 0 when the transport failed.
    status: int
    #: ``clock.time()`` when the answer arrived.
    at: float


def endpoint_of(method: str, path: str, query: Mapping[str, str]) -> Endpoint:
    if _NODE.match(path):
        return "node_get" if method == "GET" else "node_patch" if method == "PATCH" else "other"
    if _TOKEN.match(path) and method == "POST":
        return "token"
    if _PODS.match(path) and method == "GET":
        return "watch" if query.get("watch") in ("1", "true") else "list"
    if _ACCOUNTS.match(path) and method == "GET":
        return "sa_watch" if query.get("watch") in ("1", "true") else "sa_list"
    return "get" if _GET.match(path) and method == "GET" else "other"


def kube_status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A ``Status`` body as the API server writes it."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class _OpenWatch:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.queue: asyncio.Queue[object] = asyncio.Queue()


class FaultyKube:
    """``HttpClient`` + ``HttpStreamClient`` in front of ``inner``. One event loop; not thread-safe."""

    def __init__(self, inner: KubeTransport, *, clock: Clock) -> None:
        self._inner = inner
        self._clock = clock
        self._faults = FaultInjector()
        self._outage: Literal["refuse", "error"] | None = None
        self._watches: set[_OpenWatch] = set()
        self._in_flight = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._before: dict[Endpoint, Callable[[], Awaitable[None]]] = {}
        self.calls: Counter[Endpoint] = Counter()
        self.requests: list[KubeCall] = []
        self.answers: list[KubeAnswer] = []

    # -- faults ------------------------------------------------------------------------------------

    def fail(self, endpoint: Endpoint, *, status_code: int, times: int = 1, body: Any = None,
             reason: str = "InternalError") -> None:
        """Answer the next ``times`` calls to ``endpoint`` with ``status_code`` (a Status body by default)."""
        payload = body if body is not None else kube_status(status_code, reason, f"injected {status_code}")
        self.answer(endpoint, status_code=status_code, body=json.dumps(payload).encode(), times=times)

    def answer(self, endpoint: Endpoint, *, status_code: int, body: bytes, times: int = 1) -> None:
        """Answer the next ``times`` calls to ``endpoint`` with ``body`` (a watch streams its lines)."""
        self._faults.queue(endpoint, HttpResponse(status=status_code, headers=_JSON, body=body), times=times)

    def stall(self, endpoint: Endpoint) -> asyncio.Event:
        """Hold calls to ``endpoint`` until the returned event is set (or ``unstall``)."""
        return self._faults.stall(endpoint)

    def unstall(self, endpoint: Endpoint) -> None:
        self._faults.unstall(endpoint)

    def before(self, endpoint: Endpoint, hook: Callable[[], Awaitable[None]] | None) -> None:
        """Run ``hook`` before each call to ``endpoint`` reaches the server (a concurrent writer)."""
        if hook is None:
            self._before.pop(endpoint, None)
        else:
            self._before[endpoint] = hook

    def outage(self, mode: Literal["refuse", "error"] = "refuse") -> None:
        """The API server goes away: ``refuse`` fails every call as a refused connection, ``error``
        answers 503. Open watches break either way."""
        self._outage = mode
        self.break_watches()

    def restore(self) -> None:
        self._outage = None
        self._faults.clear()

    def end_watches(self, endpoint: Endpoint | None = None) -> None:
        """Every open watch (of ``endpoint``) ends cleanly, as when its ``timeoutSeconds`` is up."""
        for watch in self._open(endpoint):
            watch.queue.put_nowait(_END)

    def break_watches(self, endpoint: Endpoint | None = None) -> None:
        """Every open watch's (of ``endpoint``) connection resets mid-stream."""
        for watch in self._open(endpoint):
            watch.queue.put_nowait(_BROKEN)

    def inject(self, line: bytes, endpoint: Endpoint = "watch") -> None:
        """Deliver ``line`` on every open watch of ``endpoint`` (pods by default) after the events
        already received."""
        for watch in self._open(endpoint):
            watch.queue.put_nowait(line)

    def watches(self, endpoint: Endpoint = "watch") -> int:
        """Watch streams of ``endpoint`` currently open to the caller."""
        return len(self._open(endpoint))

    @property
    def watch_count(self) -> int:
        """Pod watch streams currently open to the caller."""
        return self.watches("watch")

    def _open(self, endpoint: Endpoint | None) -> list[_OpenWatch]:
        return [w for w in self._watches if endpoint is None or w.endpoint == endpoint]

    @property
    def in_flight(self) -> int:
        """Calls forwarded to the real server and not yet answered (open watches excluded)."""
        return self._in_flight

    async def quiet(self) -> None:
        """Wait until no forwarded call is on the wire."""
        await self._quiet.wait()

    # -- HttpClient / HttpStreamClient -------------------------------------------------------------

    async def send(self, request: HttpRequest) -> HttpResponse:
        call = self._arrive(request)
        done = asyncio.Event()
        task = asyncio.create_task(self._answer(call, request), name=f"faulty kube {request.method} {request.url}")
        task.add_done_callback(lambda _: done.set())
        try:
            # The deadline is on the test's clock: a stalled call times out when the test advances it.
            if not await self._clock.sleep(request.timeout_s, until=done):
                raise TransportFailure(request.url, f"no response within {request.timeout_s:g}s")
            response = task.result()
        except TransportFailure:
            self._record(call, 0)
            raise
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransportFailure):
                    await task
        self._record(call, response.status)
        return response

    @contextlib.asynccontextmanager
    async def open(self, request: HttpRequest) -> AsyncIterator[LineStream]:
        call = self._arrive(request)
        try:
            faulted = await self._fault(call, request)
        except TransportFailure:
            self._record(call, 0)
            raise
        if faulted is not None:
            self._record(call, faulted.status)
            yield LineStream(status=faulted.status, headers=faulted.headers, lines=_body_lines(faulted.body))
            return
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with self._forwarded():
                    stream = await stack.enter_async_context(self._inner.open(request))
            except TransportFailure:
                self._record(call, 0)
                raise
            self._record(call, stream.status)
            watch = _OpenWatch(call.endpoint)
            self._watches.add(watch)
            pump = asyncio.create_task(_pump(stream.lines, watch.queue), name="faulty kube watch pump")
            lines = _lines(watch.queue, url=request.url)
            try:
                yield LineStream(status=stream.status, headers=stream.headers, lines=lines)
            finally:
                self._watches.discard(watch)
                await lines.aclose()
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransportFailure):
                    await pump

    # -- internals ---------------------------------------------------------------------------------

    def _arrive(self, request: HttpRequest) -> KubeCall:
        url = urlsplit(request.url)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            body = json.loads(request.body) if request.body else None
        except ValueError:
            body = None
        call = KubeCall(endpoint=endpoint_of(request.method, url.path, query), method=request.method, path=url.path,
                        query=query, body=body, bearer=headers.get("authorization", "").removeprefix("Bearer "))
        self.calls[call.endpoint] += 1
        self.requests.append(call)
        return call

    def _record(self, call: KubeCall, status: int) -> None:
        self.answers.append(KubeAnswer(call=call, status=status, at=self._clock.time()))

    async def _fault(self, call: KubeCall, request: HttpRequest) -> HttpResponse | None:
        if self._outage == "refuse":
            raise TransportFailure(request.url, "connection refused")
        if self._outage == "error":
            return HttpResponse(status=503, headers=_JSON, body=json.dumps(kube_status(
                503, "ServiceUnavailable", "the server is unable to handle the request")).encode())
        injected = await self._faults.intercept(call.endpoint)
        if injected is None and (hook := self._before.get(call.endpoint)) is not None:
            await hook()
        return injected

    async def _answer(self, call: KubeCall, request: HttpRequest) -> HttpResponse:
        faulted = await self._fault(call, request)
        if faulted is not None:
            return faulted
        async with self._forwarded():
            return await self._inner.send(request)

    @contextlib.asynccontextmanager
    async def _forwarded(self) -> AsyncIterator[None]:
        self._in_flight += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._quiet.set()


async def _pump(source: AsyncIterator[bytes], queue: asyncio.Queue[object]) -> None:
    """Copy the real stream's lines into ``queue``, then its end (or its failure)."""
    try:
        async for line in source:
            queue.put_nowait(line)
    except TransportFailure as exc:
        queue.put_nowait(exc)
        return
    queue.put_nowait(_END)


async def _lines(queue: asyncio.Queue[object], *, url: str) -> AsyncGenerator[bytes, None]:
    while True:
        item = await queue.get()
        if item is _END:
            return
        if item is _BROKEN:
            raise TransportFailure(url, "connection reset by peer")
        if isinstance(item, TransportFailure):
            raise item
        assert isinstance(item, bytes)
        yield item


async def _body_lines(body: bytes) -> AsyncIterator[bytes]:
    for line in body.splitlines():
        if line.strip():
            yield line
