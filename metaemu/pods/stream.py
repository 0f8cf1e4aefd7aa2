"""The streaming extension of the transport seam, for Kubernetes watches, and the aiohttp adapter
that talks to a Kubernetes API server (cluster CA, no proxies).

Why a stream and not repeated ``?watch=1&timeoutSeconds=N`` requests read whole: a watch read whole
delivers its events only when the server closes it, so the pod index would lag by up to N seconds.
That lag is exactly the window in which a deleted pod's IP can be handed to a new pod while the index
still names the old one (SEC-10; kiam #499), and in which a new pod waits for its identity (SEC-09).
Small N instead turns the watch into polling. So watches are read line by line as events arrive.

The extension is one method, ``HttpStreamClient.open(HttpRequest)``, an async context manager
yielding a ``LineStream`` (status, headers, and an async iterator over newline-delimited body lines).
Ordinary requests keep using ``HttpClient.send``. ``KubeHttp`` implements both over aiohttp; the
tests' fault-injecting transport (``metaemu.testing.kube_faults``) wraps it in front of a real API
server.

Not owned here: what the lines mean (``kube_client``), deadlines on virtual time (``watch``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from metaemu.transport import MAX_RESPONSE_BYTES, AiohttpClient, HttpClient, HttpRequest, TransportFailure

#: Cap on one watch event line. The API server stores objects of at most 1.5 MiB (etcd's request
#: limit); a pod with managedFields stays far below. A longer line is a broken stream, not a pod.
MAX_LINE_BYTES = 4 << 20
#: Connecting to the API server on the cluster network takes milliseconds; 10 s bounds a dead one.
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LineStream:
    """A streaming response: status and headers at once, then the body one line at a time
    (without the trailing newline; empty lines are skipped)."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    lines: AsyncIterator[bytes] = field(repr=False)

    async def read_body(self, limit: int = MAX_RESPONSE_BYTES) -> bytes:
        """The rest of the body joined with newlines, up to ``limit`` bytes (for error statuses)."""
        body = bytearray()
        async for line in self.lines:
            body += line + b"\n"
            if len(body) >= limit:
                break
        return bytes(body[:limit])


class HttpStreamClient(Protocol):
    def open(self, request: HttpRequest) -> contextlib.AbstractAsyncContextManager[LineStream]:
        """Send ``request`` and stream its response; raise ``TransportFailure`` when no response
        arrives or the connection breaks mid-stream. Leaving the context closes the connection."""


class KubeTransport(HttpClient, HttpStreamClient, Protocol):
    """What ``KubeClient`` sends through: ``KubeHttp``, or something in front of it."""


async def split_lines(chunks: AsyncIterator[bytes], *, url: str) -> AsyncIterator[bytes]:
    """Newline-delimited lines from arbitrary chunks; raises ``TransportFailure`` on an oversized line."""
    pending = bytearray()
    async for chunk in chunks:
        pending += chunk
        while (end := pending.find(b"\n")) >= 0:
            line = bytes(pending[:end]).strip()
            del pending[:end + 1]
            if line:
                yield line
        if len(pending) > MAX_LINE_BYTES:
            raise TransportFailure(url, f"stream line longer than {MAX_LINE_BYTES} bytes")
    if tail := bytes(pending).strip():
        yield tail


class KubeHttp(AiohttpClient):
    """``HttpClient`` and ``HttpStreamClient`` for one Kubernetes API server: ``AiohttpClient``
    (verified against the cluster's own CA bundle, proxy environment ignored so a bearer token for
    the API server is never rerouted) plus ``open`` for streamed watches."""

    @contextlib.asynccontextmanager
    async def open(self, request: HttpRequest) -> AsyncIterator[LineStream]:
        # A watch legitimately stays open for its whole timeoutSeconds, so there is no total
        # deadline; ``timeout_s`` bounds the wait for each read instead (and callers add their own).
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=request.timeout_s)
        resp = await self._request(request, timeout)
        try:
            lines = split_lines(_chunks(resp, request.url), url=request.url)
            yield LineStream(status=resp.status, headers=dict(resp.headers), lines=lines)
        finally:
            _finish(resp)

    async def _request(self, request: HttpRequest, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        try:
            return await self._get_session().request(
                request.method, request.url, headers=dict(request.headers), data=request.body or None,
                timeout=timeout, allow_redirects=False, ssl=self._ssl)
        except TimeoutError:
            raise TransportFailure(request.url, f"no response within {request.timeout_s:g}s") from None
        except aiohttp.ClientError as exc:
            raise TransportFailure(request.url, f"{type(exc).__name__}: {exc}") from exc


def _finish(resp: aiohttp.ClientResponse) -> None:
    """Return a fully read connection to the pool; close one left mid-body (a watch cut short
    would otherwise keep writing events into the next request's response)."""
    if resp.content.at_eof():
        resp.release()
    else:
        resp.close()


async def _chunks(resp: aiohttp.ClientResponse, url: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
    except TimeoutError:
        raise TransportFailure(url, "stream stalled") from None
    except aiohttp.ClientError as exc:
        raise TransportFailure(url, f"{type(exc).__name__}: {exc}") from exc
