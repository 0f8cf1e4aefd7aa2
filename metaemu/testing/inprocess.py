"""Serving one request handler two ways: in process, and on a socket.

A stand-in is written once as ``async handle(HttpRequest) -> HttpResponse``. ``InProcessClient``
is an ``HttpClient`` that calls it directly (pipeline tests: no sockets, no patching), and
``handler_app`` adapts it to an aiohttp application (functional tests, google-auth as an oracle,
``metaemu demo``), so both paths run the same checks.

Both paths hand a handler the TLS client certificate the same way, in the ``Client-Cert`` header
of RFC 9440 (what a TLS-terminating front end forwards): from ``HttpRequest.client_certificate`` in
process, from the TLS session on a socket; a ``Client-Cert`` the client sent itself is dropped.

Not owned here: the real client (``metaemu.transport.AiohttpClient``) and any routing; handlers
route on the request path themselves.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from metaemu.clock import Clock
from metaemu.transport import MAX_RESPONSE_BYTES, HttpRequest, HttpResponse, TransportFailure

Handler = Callable[[HttpRequest], Coroutine[Any, Any, HttpResponse]]
#: RFC 9440 §2: the client certificate, an sf-binary (``:base64-DER:``), and the rest of its chain.
CLIENT_CERT_HEADER = "Client-Cert"
_FORWARDED_CERT_HEADERS = frozenset({"client-cert", "client-cert-chain"})


def _first_der(pem: bytes) -> bytes:
    """The DER of the first certificate of a PEM chain: the one a TLS client presents as its own."""
    end = b"-----END CERTIFICATE-----"
    return ssl.PEM_cert_to_DER_cert(pem[:pem.index(end) + len(end)].decode())


def with_client_cert(headers: Mapping[str, str], der: bytes | None) -> dict[str, str]:
    """``headers`` without client-sent RFC 9440 fields, plus ``Client-Cert`` for ``der`` if any.

    SECURITY: RFC 9440 §4 — a front end must drop these fields from the request, or a client
    could claim any certificate."""
    out = {k: v for k, v in headers.items() if k.lower() not in _FORWARDED_CERT_HEADERS}
    if der:
        out[CLIENT_CERT_HEADER] = f":{base64.b64encode(der).decode()}:"
    return out


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
        cert = request.client_certificate
        leaf = _first_der(cert.cert_pem) if cert is not None else None
        request = HttpRequest(method=request.method, url=request.url, body=request.body,
                              headers=with_client_cert(request.headers, leaf), timeout_s=request.timeout_s)
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
        tls = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
        der = tls.getpeercert(binary_form=True) if isinstance(tls, ssl.SSLObject) else None
        reply = await handler(HttpRequest(method=request.method, url=str(request.url),
                                          headers=with_client_cert(request.headers, der), body=body))
        return web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", adapt)
    return app
