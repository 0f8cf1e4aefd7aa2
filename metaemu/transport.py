"""The one seam between the credential pipeline and the network.

The pipeline depends only on ``HttpClient.send(HttpRequest) -> HttpResponse`` (frozen values, like
google-auth's ``transport.Request`` and httpx's ``BaseTransport``). ``AiohttpClient`` is the only
place that imports the aiohttp client; tests route requests to plain handler functions instead.

Transport failures (connection refused, DNS, timeout) raise ``TransportFailure`` so callers can turn
them into an ``UpstreamError`` with ``status=0`` that names the service.

A request may carry a ``ClientCertificate`` (mutual TLS, RFC 8705 §2): the X.509 workload identity
source needs its STS exchange sent with the workload's own certificate (issue #14). That is the only
per-request TLS setting; the adapter turns each distinct certificate into one cached ``SSLContext``,
so a rotated certificate gets a new context (and a new connection) on its first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlencode

import aiohttp

#: Default per-request deadline for upstream calls. Google STS and IAM answer in well under a
#: second; 10 s bounds a stalled connection while leaving room for a slow cold TLS handshake.
DEFAULT_TIMEOUT_S = 10.0
#: Cap on an upstream response body. Token responses are < 4 KiB; an error page is < 100 KiB.
MAX_RESPONSE_BYTES = 1 << 20
#: Client-certificate contexts kept: the current certificate and the one it replaced (a rotation
#: in flight); more would only hold retired private keys in memory.
MAX_CLIENT_CONTEXTS = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientCertificate:
    """A TLS client certificate for one request: the PEM chain (leaf first) and its private key,
    as read together from the workload's files, so a request never pairs a new certificate with an
    old key. ``fingerprint`` (SHA-256 over both) identifies it for context caching and logs."""

    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    fingerprint: str = field(init=False, default="")

    def __post_init__(self) -> None:
        digest = hashlib.sha256(self.cert_pem + b"\0" + self.key_pem).hexdigest()
        object.__setattr__(self, "fingerprint", digest)  # derived once; the instance is frozen


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRequest:
    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    timeout_s: float = DEFAULT_TIMEOUT_S
    #: Present the certificate in the TLS handshake (mTLS); None: no client certificate.
    client_certificate: ClientCertificate | None = None

    @classmethod
    def form(cls, url: str, fields: Mapping[str, str], *, headers: Mapping[str, str] | None = None,
             timeout_s: float = DEFAULT_TIMEOUT_S, client_certificate: ClientCertificate | None = None
             ) -> HttpRequest:
        """A POST with an ``application/x-www-form-urlencoded`` body (RFC 6749 / RFC 8693)."""
        hdrs = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        return cls(method="POST", url=url, headers=hdrs, body=urlencode(fields).encode(), timeout_s=timeout_s,
                   client_certificate=client_certificate)

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

    A request with a ``client_certificate`` uses a context made by ``client_context`` (default: the
    system trust store, which honours ``SSL_CERT_FILE``) with that certificate loaded; contexts are
    cached by fingerprint (``MAX_CLIENT_CONTEXTS``). aiohttp pools connections per context, so a
    connection opened with one certificate is never reused for another.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None,
                 client_context: Callable[[], ssl.SSLContext] = ssl.create_default_context) -> None:
        #: None: the system trust store. The Kubernetes client passes the cluster's CA bundle.
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._client_context = client_context
        self._client_contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
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

    async def _ssl_for(self, request: HttpRequest) -> ssl.SSLContext | bool:
        cert = request.client_certificate
        if cert is None:
            return self._ssl
        context = self._client_contexts.get(cert.fingerprint)
        if context is None:
            try:
                context = await asyncio.to_thread(_load_client_context, self._client_context(), cert)
            except (ssl.SSLError, ValueError, OSError) as exc:
                raise TransportFailure(request.url, f"cannot use the client certificate: {exc}") from None
            self._client_contexts[cert.fingerprint] = context
            while len(self._client_contexts) > MAX_CLIENT_CONTEXTS:
                self._client_contexts.popitem(last=False)
        self._client_contexts.move_to_end(cert.fingerprint)
        return context

    async def send(self, request: HttpRequest) -> HttpResponse:
        timeout = aiohttp.ClientTimeout(total=request.timeout_s)
        tls = await self._ssl_for(request)
        try:
            async with self._get_session().request(
                request.method, request.url, headers=dict(request.headers),
                data=request.body or None, timeout=timeout, allow_redirects=False, ssl=tls,
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


def _load_client_context(context: ssl.SSLContext, cert: ClientCertificate) -> ssl.SSLContext:
    """``context`` with ``cert`` loaded (blocking: run in a worker thread). ``load_cert_chain``
    reads only files, so the PEM goes through a file that only this process can read."""
    with _private_file(cert.cert_pem) as cert_path, _private_file(cert.key_pem) as key_path:
        context.load_cert_chain(cert_path, key_path)
    return context


@contextlib.contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    # SECURITY: the private key is copied for the moment of loading only: into an anonymous memory
    # file where Linux offers one (never on disk), else a 0600 temporary file removed at once.
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("metaemu-client-cert", os.MFD_CLOEXEC)
        try:
            _write_all(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="metaemu-client-cert-")
    try:
        _write_all(fd, data)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
