"""The metadata listener's HTTP/1.1 protocol: aiohttp's ``RequestHandler`` with the limits of a
metadata request and HTTP's own answers when a request breaks them (security.md SEC-24).

aiohttp answers every unparseable request with a generic 400 whose body echoes the offending bytes,
under its own ``Server`` header, and logs a traceback for each. In node mode the callers are
untrusted pods, so here a request target over ``MAX_TARGET_BYTES`` gets 414 (RFC 9112 §3: "URI Too
Long"), a header field over ``MAX_FIELD_BYTES`` or more than ``MAX_FIELDS`` fields gets 431 (RFC
6585 §5), anything else malformed (smuggling shapes, bad chunks, obs-fold) 400; each with the
profile's headers, a short fixed body, a close, and a count in ``metaemu_blocked_requests_total``
instead of a traceback. Everything else is aiohttp's, untouched. Written as a subclass because
aiohttp has no option for the status of a parse error.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from aiohttp.web_server import Server

from metaemu.metrics import Metrics
from metaemu.server.responses import Responder

log = logging.getLogger(__name__)

#: Longest request target. Real clients send well under 1 KiB (the longest is an identity request
#: with a URL audience); 8 KiB is what most servers allow. It must differ from MAX_FIELD_BYTES:
#: the limit in ``LineTooLong`` is how a too-long target is told from a too-long field.
MAX_TARGET_BYTES = 8192
#: Longest header field, name and value together (aiohttp's default; Go's whole-head limit is 1 MiB
#: but no metadata client sends a field of even 1 KiB).
MAX_FIELD_BYTES = 8190
#: Most header fields in one request: real clients send under 15.
MAX_FIELDS = 100


class MetadataRequestHandler(RequestHandler):
    """One connection of the metadata listener. Construct with the listener's ``Server``."""

    def __init__(self, manager: Server, *, responder: Responder, metrics: Metrics, **kwargs: Any) -> None:
        # lingering_time=0: after answering a request whose body has not all arrived, close rather
        # than read it for up to 10 s (aiohttp's default). No metadata request has a body, so the
        # linger only ever served a client holding the connection open with a slow one.
        super().__init__(manager, max_line_size=MAX_TARGET_BYTES, max_field_size=MAX_FIELD_BYTES,
                         max_headers=MAX_FIELDS, lingering_time=0, **kwargs)
        self._responder = responder
        self._metrics = metrics
        #: Set once the client has ended its side or the connection is lost: a long poll ends
        #: then and frees its slot (an EOF is all a server sees of a client that closed).
        self.client_gone = asyncio.Event()
        self._close_when_drained = False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.client_gone.set()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio.Protocol allows True
        """The client ended its side (``printf ... | nc -N``, a shutdown after the request).
        aiohttp closes at once, dropping the answer to a request already received; here that
        request is answered (and every pipelined one before it) and then the connection closes,
        as Go's server does (RFC 9112 §9.6 lets a client half-close). Idle between requests (or
        inside an unfinished head), close at once as before. (Reads two attributes of aiohttp's
        protocol: no public API says whether it is idle; ``start()`` waits on ``_waiter`` exactly
        when it has no request to handle.)"""
        self.client_gone.set()
        waiter = self._waiter
        if not self._messages and waiter is not None and not waiter.done():
            return None
        if self._messages:  # pipelined requests received before the EOF: answer each, then close
            self._close_when_drained = True
        else:
            self.close()  # the request in hand is the last: answer it, then close
        return True

    async def _handle_request(self, request: BaseRequest, start_time: float | None,
                              request_handler: Any) -> tuple[StreamResponse, bool]:
        """aiohttp's, but after a client's EOF the last request it sent closes the connection
        once answered; the ones before it are answered too (aiohttp's ``close()`` drops them)."""
        if self._close_when_drained and not self._messages:
            self.close()
        result: tuple[StreamResponse, bool] = await super()._handle_request(request, start_time, request_handler)
        return result

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> StreamResponse:
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)  # a handler's own failure
        if request.writer.output_size > 0:
            raise ConnectionError("a response is already on the wire")  # as aiohttp does
        code, reason, text = _refusal(exc)
        self._metrics.blocked.labels(reason).inc()
        log.debug("malformed request refused", extra={"status": code, "reason": reason})
        response = self._responder.text(code, text, extra={"Connection": "close"})
        response.force_close()
        return response


def _refusal(exc: HttpProcessingError) -> tuple[int, str, str]:
    """(status, metric reason, body) for a request aiohttp's parser refused."""
    if isinstance(exc, LineTooLong):
        # args: (the line's start, the limit it broke, its size); the two limits differ.
        if exc.args[1:2] == (MAX_TARGET_BYTES,):
            return 414, "oversized", "414 URI Too Long\n"
        return 431, "oversized", "431 Request Header Fields Too Large\n"
    # aiohttp raises a plain BadHttpMessage for this one; its text is the only thing that tells.
    if str(exc.message).startswith("Too many headers"):
        return 431, "oversized", "431 Request Header Fields Too Large\n"
    return 400, "malformed", "400 Bad Request\n"
