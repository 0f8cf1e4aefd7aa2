"""``FakeGoogle``: Google STS v1 and IAM Credentials v1 in one stand-in, for tests and the demo.

Owns routing (method + path; scheme and host are ignored so it works behind any base URL), the
record of what was asked (``calls``, ``requests``), fault injection, injected latency (``latency_s``), and
the three ways to reach it:
``handle`` (a plain coroutine), ``client()`` (an in-process ``HttpClient``) and ``app()`` (aiohttp,
for sockets and google-auth). The checks themselves live in ``fake_google_sts``,
``fake_google_jwt`` and ``fake_google_iam``; what was issued lives in ``fake_google_tokens``.

Routes::

    POST /v1/token                                                       STS exchange ("sts")
    POST /v1/projects/-/serviceAccounts/{EMAIL_OR_ID}:generateAccessToken  IAM ("generateAccessToken")
    POST /v1/projects/-/serviceAccounts/{EMAIL_OR_ID}:generateIdToken      IAM ("generateIdToken")

Anything else is counted as ``"unknown"`` and answered 404.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from metaemu.clock import Clock, SystemClock
from metaemu.credentials.tokens import ID_TOKEN_TYPE, JWT_TOKEN_TYPE, MTLS_TOKEN_TYPE
from metaemu.testing.fake_google_errors import (
    JSON_CONTENT_TYPE,
    default_sts_error_body,
    rpc_error,
    rpc_error_body,
)
from metaemu.testing.fake_google_iam import IamService, ServiceAccount
from metaemu.testing.fake_google_jwt import verify_jwt_subject
from metaemu.testing.fake_google_sts import StsService, SubjectVerifier, WorkloadIdentityProvider
from metaemu.testing.fake_google_tokens import GoogleSigner, IssuedTokens, TokenInfo
from metaemu.testing.fake_google_x509 import verify_mtls_subject
from metaemu.testing.faults import FaultInjector, garbage_response
from metaemu.testing.inprocess import InProcessClient, get_header, handler_app
from metaemu.transport import HttpRequest, HttpResponse

Backend = Literal["sts", "iam"]

_IAM_PATH = re.compile(r"^/v1/projects/-/serviceAccounts/(?P<account>[^/:]+)"
                       r":(?P<method>generateAccessToken|generateIdToken)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedRequest:
    """One request as the fake received it, parsed for assertions.

    ``endpoint`` is ``sts``, ``generateAccessToken``, ``generateIdToken`` or ``unknown``;
    ``account`` the service-account reference from an IAM path. ``form`` holds the fields of a
    form body after one decode (a double-encoded ``options`` is still percent-encoded there),
    ``json`` the parsed JSON body; each is empty/None when the body is not of that kind.
    """

    endpoint: str
    method: str
    path: str
    account: str | None = None
    headers: Mapping[str, str] = field(repr=False)
    form: Mapping[str, str] = field(repr=False)
    json: Any = field(repr=False, default=None)
    body: bytes = field(repr=False, default=b"")

    @classmethod
    def of(cls, request: HttpRequest, *, endpoint: str, account: str | None) -> RecordedRequest:
        content_type = (get_header(request, "Content-Type") or "").split(";")[0].strip().lower()
        text = request.body.decode("utf-8", errors="replace")
        form: dict[str, str] = {}
        payload: Any = None
        if content_type == "application/x-www-form-urlencoded":
            form = dict(parse_qsl(text, keep_blank_values=True))
        elif content_type == "application/json":
            try:
                payload = json.loads(text)
            except ValueError:
                payload = None
        return cls(endpoint=endpoint, method=request.method, path=urlsplit(request.url).path,
                   account=account, headers=CIMultiDictProxy(CIMultiDict(request.headers)),
                   form=form, json=payload, body=request.body)


class FakeGoogle:
    """Google STS + IAM Credentials that verify what the real services verify.

    Time (token expiry, subject-token ``iat``/``exp``) comes from ``clock``. ``latency_s`` delays
    every answer of a backend by that many seconds on ``clock`` (after the call is counted and
    recorded, before faults and the real logic), standing in for the round trip to Google from a
    distant region; concurrent calls wait it out side by side, as on a real network. Single event
    loop; the registry may be changed between requests at any time.
    """

    def __init__(self, *, clock: Clock | None = None, latency_s: Mapping[Backend, float] | None = None) -> None:
        if any(seconds < 0 for seconds in (latency_s or {}).values()):
            raise ValueError("latency_s must not be negative")
        self.clock: Clock = clock or SystemClock()
        self._latency_s: dict[Backend, float] = dict(latency_s or {})
        self.calls: Counter[str] = Counter()
        self.requests: list[RecordedRequest] = []
        self._tokens = IssuedTokens(self.clock)
        self._signer = GoogleSigner()
        self._faults = FaultInjector()
        self._sts = StsService(clock=self.clock, tokens=self._tokens)
        self._iam = IamService(clock=self.clock, tokens=self._tokens, signer=self._signer)
        for token_type in (JWT_TOKEN_TYPE, ID_TOKEN_TYPE):
            self._sts.register_subject_verifier(token_type, verify_jwt_subject)
        self._sts.register_subject_verifier(MTLS_TOKEN_TYPE, verify_mtls_subject)

    # -- registry -------------------------------------------------------------------------------

    def add_provider(self, provider: WorkloadIdentityProvider) -> None:
        self._sts.add_provider(provider)

    def register_subject_verifier(self, token_type: str, verifier: SubjectVerifier) -> None:
        """Verify subject tokens of ``token_type`` with ``verifier`` (replacing any earlier one)."""
        self._sts.register_subject_verifier(token_type, verifier)

    def add_service_account(self, email: str, unique_id: str | None = None) -> ServiceAccount:
        return self._iam.add_service_account(email, unique_id)

    def grant(self, email: str, principal: str) -> None:
        """Let ``principal`` mint tokens for ``email`` (roles/iam.serviceAccountTokenCreator)."""
        self._iam.grant(email, principal)

    def revoke(self, email: str, principal: str) -> None:
        self._iam.revoke(email, principal)

    def disable_service_account(self, email: str, *, disabled: bool = True) -> None:
        """Disable ``email`` (``disabled=False`` enables it again): IAM then refuses to mint for it."""
        self._iam.set_disabled(email, disabled)

    def principal_for(self, audience: str, sub: str) -> str:
        """``principal://iam.googleapis.com/<pool>/subject/<sub>`` for the provider ``audience``."""
        return self._sts.principal_for(audience, sub)

    # -- what was issued ------------------------------------------------------------------------

    def issue_access_token(self, *, principal: str, scopes: Sequence[str], expiry: dt.datetime, prefix: str) -> str:
        """Record an access token minted elsewhere (e.g. a user's OAuth login) so that IAM accepts it as
        a caller with ``principal`` (``user:EMAIL``)."""
        info = TokenInfo(kind="user", principal=principal, email=None, scopes=tuple(scopes),
                         expiry=expiry.replace(microsecond=0))
        return self._tokens.issue(prefix=prefix, info=info)

    def token_info(self, access_token: str) -> TokenInfo | None:
        """What this fake issued as ``access_token``; None when unknown or expired by the clock."""
        return self._tokens.live(access_token)

    def google_jwks(self) -> dict[str, Any]:
        """The JWKS that verifies ID tokens from ``generateIdToken``."""
        return self._signer.jwks()

    # -- fault injection ------------------------------------------------------------------------

    def fail(self, backend: Backend, *, status: int, body: Any = None, times: int = 1,
             headers: Mapping[str, str] | None = None) -> None:
        """Answer the next ``times`` calls to ``backend`` with ``status`` and ``body``.

        ``body`` None means Google's usual error for that status (RFC 6749 for STS 400/401/403,
        AIP-193 otherwise); ``bytes``/``str`` are sent verbatim; anything else as JSON.
        """
        if body is None:
            body = default_sts_error_body(status) if backend == "sts" else rpc_error_body(status)
        if isinstance(body, bytes | str):
            raw, content_type = (body.encode() if isinstance(body, str) else body), "text/plain; charset=UTF-8"
        else:
            raw, content_type = json.dumps(body).encode(), JSON_CONTENT_TYPE
        response = HttpResponse(status=status, headers={"Content-Type": content_type, **(headers or {})},
                                body=raw)
        self._faults.queue(backend, response, times=times)

    def garbage(self, backend: Backend, times: int = 1) -> None:
        """Answer the next ``times`` calls to ``backend`` with 200 and an HTML (non-JSON) body."""
        self._faults.queue(backend, garbage_response(), times=times)

    def stall(self, backend: Backend) -> asyncio.Event:
        """Hold calls to ``backend`` (after counting and recording them) until the returned
        ``asyncio.Event`` is set or ``unstall(backend)`` is called."""
        return self._faults.stall(backend)

    def unstall(self, backend: Backend) -> None:
        self._faults.unstall(backend)

    def clear_faults(self) -> None:
        self._faults.clear()

    # -- serving --------------------------------------------------------------------------------

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Answer one request as STS or IAM Credentials would."""
        endpoint, account = _route(request)
        self.calls[endpoint] += 1
        self.requests.append(RecordedRequest.of(request, endpoint=endpoint, account=account))
        if endpoint == "unknown":
            return rpc_error(404, f"The requested URL {urlsplit(request.url).path} was not found.")
        backend: Backend = "sts" if endpoint == "sts" else "iam"
        if latency_s := self._latency_s.get(backend):
            await self.clock.sleep(latency_s)
        injected = await self._faults.intercept(backend)
        if injected is not None:
            return injected
        if account is None:  # only the STS route carries no account
            return await self._sts.exchange(request)
        if endpoint == "generateAccessToken":
            return await self._iam.generate_access_token(request, account)
        return await self._iam.generate_id_token(request, account)

    def client(self, *, clock: Clock | None = None) -> InProcessClient:
        """An ``HttpClient`` calling ``handle`` directly; with ``clock``, request deadlines are
        enforced on it (see ``InProcessClient``)."""
        return InProcessClient(self.handle, clock=clock)

    def app(self) -> web.Application:
        return handler_app(self.handle)


def _route(request: HttpRequest) -> tuple[str, str | None]:
    """(endpoint name, service-account reference for IAM routes)."""
    path = urlsplit(request.url).path
    if request.method != "POST":
        return "unknown", None
    if path == "/v1/token":
        return "sts", None
    if match := _IAM_PATH.match(path):
        return match["method"], match["account"]
    return "unknown", None
