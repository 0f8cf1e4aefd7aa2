"""A read-header deadline for the metadata listener (security.md SEC-24, recommendation 7).

aiohttp's server has an idle keep-alive timeout but no limit on how long a client may take to send
its first request headers, so a client can hold a connection (and a slot of the concurrency cap)
by sending nothing or a byte at a time. ``HeaderDeadline`` wraps aiohttp's request handler
protocol: it forwards every event unchanged and closes the transport if the end of the first
request's headers (a blank line) has not arrived ``deadline_s`` after the connection opened.
Written by hand because no option of aiohttp (or a small library) provides it.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

#: Every real client sends its headers in one segment, within milliseconds; 10 s leaves room for a
#: loaded node while cutting slowloris-style holders off quickly.
HEADER_DEADLINE_S = 10.0
_END_OF_HEADERS = b"\r\n\r\n"


class HeaderDeadline(asyncio.Protocol):
    def __init__(self, inner: asyncio.Protocol, *, deadline_s: float = HEADER_DEADLINE_S) -> None:
        self._inner = inner
        self._deadline_s = deadline_s
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._deadline_s, self._expire)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            seen = self._tail + data
            if _END_OF_HEADERS in seen:
                self._timer.cancel()
                self._timer = None
                # Done: hand the connection to aiohttp directly, so keep-alive traffic pays nothing.
                # (uvloop's transports are not asyncio.Transport subclasses, but have set_protocol.)
                cast(asyncio.Transport, self._transport).set_protocol(self._inner)
            else:
                self._tail = seen[-(len(_END_OF_HEADERS) - 1):]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def __getattr__(self, name: str) -> Any:  # anything else aiohttp asks of its protocol
        return getattr(self._inner, name)
