"""The one seam between the credential pipeline and the network.

The pipeline depends only on ``HttpClient.send(HttpRequest) -> HttpResponse`` (frozen values, like
google-auth's ``transport.Request`` and httpx's ``BaseTransport``). ``AiohttpClient`` is the only
place that imports the aiohttp client; tests route requests to plain handler functions instead.

Transport failures (connection refused, DNS, timeout) raise ``TransportFailure`` so callers can turn
them into an ``UpstreamError`` with ``status=0`` that names the service.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlencode

import aiohttp

#: Default per-request deadline for upstream calls. Google STS and IAM answer in well under a
#: second; 10 s bounds a stalled connection while leaving room for a slow cold TLS handshake.
DEFAULT_TIMEOUT_S = 10.0
#: Cap on an upstream response body. Token responses are < 4 KiB; an error page is < 100 KiB.
MAX_RESPONSE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRequest:
    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def form(cls, url: str, fields: Mapping[str, str], *, headers: Mapping[str, str] | None = None,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> HttpRequest:
        """A POST with an ``application/x-www-form-urlencoded`` body (RFC 6749 / RFC 8693)."""
        hdrs = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        return cls(method="POST", url=url, headers=hdrs, body=urlencode(fields).encode(), timeout_s=timeout_s)

    @classmethod
    def json(cls, url: str, payload: Any, *, headers: Mapping[str, str] | None = None,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> HttpRequest:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        return cls(method="POST", url=url, headers=hdrs, body=json.dumps(payload).encode(), timeout_s=timeout_s)

    def __repr__(self) -> str:  # SECURITY: bodies and headers carry tokens; never print them.
        return f"HttpRequest(method={self.method!r}, url={self.url!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def decoded(self) -> Any:
        """The body as JSON when it parses, else as text (for error reporting)."""
        text = self.body.decode("utf-8", errors="replace")
        try:
            return json.loads(text)
        except ValueError:
            return text

    def __repr__(self) -> str:  # SECURITY: response bodies carry tokens.
        return f"HttpResponse(status={self.status})"


class TransportFailure(Exception):
    """No HTTP response: connection refused, reset, DNS failure or deadline exceeded."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"{url}: {detail}")
        self.url = url
        self.detail = detail


class HttpClient(Protocol):
    async def send(self, request: HttpRequest) -> HttpResponse:
        """Send one request; raise ``TransportFailure`` when no response arrives."""


class AiohttpClient:
    """``HttpClient`` over one shared ``aiohttp.ClientSession`` (connection pooling, TLS reuse).

    The session is created on first use, inside the running loop (aiohttp requires that), so the
    client can be built while the application is being assembled.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        #: None: the system trust store. The Kubernetes client passes the cluster's CA bundle.
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # trust_env=False: an HTTP(S)_PROXY meant for the app must not silently reroute token
            # exchanges carrying credentials.
            self._session = aiohttp.ClientSession(trust_env=False, raise_for_status=False)
        return self._session

    async def send(self, request: HttpRequest) -> HttpResponse:
        timeout = aiohttp.ClientTimeout(total=request.timeout_s)
        try:
            async with self._get_session().request(
                request.method, request.url, headers=dict(request.headers),
                data=request.body or None, timeout=timeout, allow_redirects=False, ssl=self._ssl,
            ) as resp:
                # read(n) returns what has arrived so far, not n bytes: collect chunks until EOF
                # (or the cap), so a body split across TCP segments is never truncated.
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) >= MAX_RESPONSE_BYTES:
                        break
                return HttpResponse(status=resp.status, headers=dict(resp.headers),
                                    body=bytes(body[:MAX_RESPONSE_BYTES]))
        except TimeoutError:
            raise TransportFailure(request.url, f"no response within {request.timeout_s:g}s") from None
        except aiohttp.ClientError as exc:
            raise TransportFailure(request.url, f"{type(exc).__name__}: {exc}") from exc
