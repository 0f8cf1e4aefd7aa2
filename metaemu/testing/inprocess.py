"""Serving one request handler two ways: in process, and on a socket.

A stand-in is written once as ``async handle(HttpRequest) -> HttpResponse``. ``InProcessClient``
is an ``HttpClient`` that calls it directly (pipeline tests: no sockets, no patching), and
``handler_app`` adapts it to an aiohttp application (functional tests, google-auth as an oracle,
``metaemu demo``), so both paths run the same checks.

Not owned here: the real client (``metaemu.transport.AiohttpClient``) and any routing; handlers
route on the request path themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from metaemu.clock import Clock
from metaemu.transport import MAX_RESPONSE_BYTES, HttpRequest, HttpResponse, TransportFailure

Handler = Callable[[HttpRequest], Coroutine[Any, Any, HttpResponse]]


def get_header(request: HttpRequest, name: str) -> str | None:
    """A request header by case-insensitive name (HTTP/1.1 field names are case-insensitive,
    RFC 9110 §5.1; aiohttp and requests preserve the sender's spelling)."""
    return CIMultiDict(request.headers).get(name)


class InProcessClient:
    """``HttpClient`` that hands each request to ``handler`` without a socket.

    With a ``clock``, a handler that runs longer than ``request.timeout_s`` on that clock is
    cancelled and ``TransportFailure`` raised, as ``AiohttpClient`` does on a real deadline; with a
    ``FakeClock`` a stalled upstream therefore times out when the test advances time. Without a
    clock no deadline is enforced (and nothing registers as a sleeper on a test's clock).
    """

    def __init__(self, handler: Handler, *, clock: Clock | None = None) -> None:
        self._handler = handler
        self._clock = clock

    async def send(self, request: HttpRequest) -> HttpResponse:
        if self._clock is None:
            response = await self._handler(request)
        else:
            response = await self._send_with_deadline(request, self._clock)
        # Mirror AiohttpClient's cap so tests see what production would see.
        if len(response.body) > MAX_RESPONSE_BYTES:
            response = HttpResponse(status=response.status, headers=response.headers,
                                    body=response.body[:MAX_RESPONSE_BYTES])
        return response

    async def _send_with_deadline(self, request: HttpRequest, clock: Clock) -> HttpResponse:
        done = asyncio.Event()
        task = asyncio.create_task(self._handler(request), name=f"inprocess {request.method} {request.url}")
        task.add_done_callback(lambda _: done.set())
        try:
            if not await clock.sleep(request.timeout_s, until=done):
                raise TransportFailure(request.url, f"no response within {request.timeout_s:g}s")
            return task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def handler_app(handler: Handler) -> web.Application:
    """An aiohttp application that answers every method and path with ``handler``."""

    async def adapt(request: web.Request) -> web.Response:
        body = await request.read()
        reply = await handler(HttpRequest(method=request.method, url=str(request.url),
                                          headers=dict(request.headers), body=body))
        return web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", adapt)
    return app
