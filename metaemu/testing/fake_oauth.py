"""``FakeOAuth``: a ServiceAuthCentral-like OAuth 2.0 token endpoint, for tests and the demo.

Owns the client registry (client ids with secrets, trusted jwt-bearer assertion issuers, the
authorizations of a client for an audience with their scopes), the token endpoint's checks and its
error envelope, the RS256 signing key (a ``FakeIssuer``) with the discovery document and JWKS that a
Google WIF provider trusts, the record of what was asked, and fault injection. Behaviour follows
ServiceAuthCentral's ``TokenService`` and ``GlobalExceptionHandler`` (upstream.md §7)::

    POST /v1/token                          client_credentials | urn:ietf:params:oauth:grant-type:jwt-bearer
    GET  /.well-known/openid-configuration  discovery (issuer, jwks_uri, token_endpoint)
    GET  /.well-known/jwks.json             the public signing key

Errors use SAC's envelope ``{"error", "messages", "details", "status"}`` (not RFC 6749's
``error_description``): 400 ``invalid_request``, 401 ``access_denied`` (unknown client, bad secret),
403 ``invalid_client`` (audience, authorization, assertion), 500 ``server_error``.

Not owned here: Google's side (``fake_google``), minting the assertions a workload presents
(``fake_issuer``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
from aiohttp import web

from metaemu.clock import Clock, SystemClock
from metaemu.errors import ConfigError
from metaemu.testing.fake_google import RecordedRequest
from metaemu.testing.fake_issuer import FakeIssuer
from metaemu.testing.faults import FaultInjector, garbage_response
from metaemu.testing.inprocess import InProcessClient, get_header, handler_app
from metaemu.transport import HttpRequest, HttpResponse

TOKEN_PATH = "/v1/token"
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/.well-known/jwks.json"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_ISSUER = "https://sac.example.test"
#: SAC's access tokens live one hour (``TokenService.buildToken``: ``validSeconds = 3600``).
TOKEN_LIFETIME_S = 3600
#: SAC's ``InputPatterns.CLIENT_ID`` (upstream.md §7): accepts ``//iam.googleapis.com/...`` audiences.
CLIENT_ID_PATTERN = re.compile(r"^((https:)?//[a-zA-Z0-9-_.:/]{1,248}|[a-zA-Z0-9-_.:]{1,255})$")
#: Leeway for an assertion's ``exp``/``nbf``/``iat``. SAC does not document one; 10 s matches the
#: fake STS (``fake_google_jwt.CLOCK_SKEW_S``) while rejection tests are off by minutes.
CLOCK_SKEW_S = 10
_JSON = "application/json"
_ERROR_CODES: Mapping[int, str] = {400: "invalid_request", 401: "access_denied", 403: "invalid_client",
                                   404: "invalid_client", 415: "invalid_request"}


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtBearerTrust:
    """One ``jwtBearer`` entry of a SAC client: an assertion whose ``iss``, ``sub`` and ``aud`` equal
    these (an ``aud`` list must contain ``audience``), signed by a key in ``jwks``, authenticates
    the client."""

    issuer: str
    subject: str
    audience: str
    jwks: Mapping[str, Any] = field(repr=False)


@dataclass(slots=True, kw_only=True)
class _Client:
    client_id: str
    secret: str | None = field(default=None, repr=False)
    jwt_bearer: tuple[JwtBearerTrust, ...] = ()
    #: Scopes this client offers when it is the audience.
    scopes: frozenset[str] = frozenset()
    #: audience -> scopes this client may request for it (SAC's Authorization records).
    authorizations: dict[str, frozenset[str]] = field(default_factory=dict)


class SacRejection(Exception):
    """The endpoint refuses; becomes SAC's error envelope with ``status``."""

    def __init__(self, status: int, message: str, *, details: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


def sac_error_body(status: int, *messages: str, details: str | None = None) -> dict[str, Any]:
    """SAC's ``ErrorResponse`` (null fields omitted, as its ``@JsonInclude(NON_NULL)`` does)."""
    body: dict[str, Any] = {"error": _ERROR_CODES.get(status, "server_error"), "messages": list(messages),
                            "status": status}
    if details is not None:
        body["details"] = details
    return body


class FakeOAuth:
    """A ServiceAuthCentral token endpoint. Time (token ``iat``/``exp``, assertion checks) comes from
    ``clock``. Single event loop; the registry may change between requests."""

    def __init__(self, *, issuer: str = DEFAULT_ISSUER, clock: Clock | None = None,
                 token_lifetime_s: int = TOKEN_LIFETIME_S) -> None:
        self.clock: Clock = clock or SystemClock()
        self.token_lifetime_s = token_lifetime_s
        self.calls: Counter[str] = Counter()
        self.requests: list[RecordedRequest] = []
        self._signer = FakeIssuer(issuer=issuer, clock=self.clock)
        self._clients: dict[str, _Client] = {}
        self._faults = FaultInjector()

    @property
    def issuer(self) -> str:
        """``sac.issuer``: the ``iss`` of every token; assignable once a server has bound a port."""
        return self._signer.issuer

    @issuer.setter
    def issuer(self, value: str) -> None:
        self._signer.issuer = value

    # -- registry -------------------------------------------------------------------------------

    def add_client(self, client_id: str, *, secret: str | None = None,
                   jwt_bearer: Sequence[JwtBearerTrust] = (), scopes: Sequence[str] = ()) -> None:
        """Register ``client_id`` (also what makes it usable as an ``audience``)."""
        if not CLIENT_ID_PATTERN.match(client_id):
            raise ConfigError("client_id", f"{client_id!r} does not match SAC's client id pattern")
        self._clients[client_id] = _Client(client_id=client_id, secret=secret, jwt_bearer=tuple(jwt_bearer),
                                           scopes=frozenset(scopes))

    def authorize(self, client_id: str, audience: str, *, scopes: Sequence[str] = ()) -> None:
        """Let ``client_id`` obtain tokens for ``audience`` (both registered), with ``scopes``."""
        for name in (client_id, audience):
            if name not in self._clients:
                raise ConfigError("client_id", f"{name!r} is not a registered client")
        self._clients[client_id].authorizations[audience] = frozenset(scopes)

    def revoke(self, client_id: str, audience: str) -> None:
        self._clients[client_id].authorizations.pop(audience, None)

    def jwks(self) -> dict[str, Any]:
        """The JWK Set that verifies this endpoint's access tokens (upload it to a WIF provider)."""
        return self._signer.jwks()

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer, "jwks_uri": f"{self.issuer}{JWKS_PATH}",
            "token_endpoint": f"{self.issuer}{TOKEN_PATH}",
            "grant_types_supported": ["client_credentials", JWT_BEARER_GRANT],
            "response_types_supported": ["token"], "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_post"],
        }

    # -- fault injection ------------------------------------------------------------------------

    def fail(self, *, status: int, body: Any = None, times: int = 1) -> None:
        """Answer the next ``times`` token requests with ``status`` and ``body`` (None: SAC's
        envelope for that status; ``str``/``bytes`` verbatim; anything else as JSON)."""
        if body is None:
            body = sac_error_body(status, "injected fault")
        if isinstance(body, bytes | str):
            raw, content_type = (body.encode() if isinstance(body, str) else body), "text/plain; charset=UTF-8"
        else:
            raw, content_type = json.dumps(body).encode(), _JSON
        self._faults.queue("token", HttpResponse(status=status, headers={"Content-Type": content_type}, body=raw),
                           times=times)

    def garbage(self, times: int = 1) -> None:
        """Answer the next ``times`` token requests with 200 and an HTML body."""
        self._faults.queue("token", garbage_response(), times=times)

    def stall(self) -> asyncio.Event:
        """Hold token requests (after recording them) until the event is set or ``unstall()``."""
        return self._faults.stall("token")

    def unstall(self) -> None:
        self._faults.unstall("token")

    def clear_faults(self) -> None:
        self._faults.clear()

    # -- serving --------------------------------------------------------------------------------

    async def handle(self, request: HttpRequest) -> HttpResponse:
        path = urlsplit(request.url).path
        if request.method == "GET" and path == DISCOVERY_PATH:
            self.calls["discovery"] += 1
            return _json(200, self.discovery())
        if request.method == "GET" and path == JWKS_PATH:
            self.calls["jwks"] += 1
            return _json(200, self.jwks())
        endpoint = "token" if (request.method, path) == ("POST", TOKEN_PATH) else "unknown"
        self.calls[endpoint] += 1
        self.requests.append(RecordedRequest.of(request, endpoint=endpoint, account=None))
        if endpoint == "unknown":
            return _json(404, sac_error_body(404, f"No route for {request.method} {path}."))
        injected = await self._faults.intercept("token")
        if injected is not None:
            return injected
        try:
            return _json(200, self._token(request))
        except SacRejection as rejection:
            return _json(rejection.status, sac_error_body(rejection.status, rejection.message,
                                                          details=rejection.details))

    def client(self, *, clock: Clock | None = None) -> InProcessClient:
        return InProcessClient(self.handle, clock=clock)

    def app(self) -> web.Application:
        return handler_app(self.handle)

    # -- the token endpoint (TokenService) ------------------------------------------------------

    def _token(self, request: HttpRequest) -> dict[str, Any]:
        form = _form(request)
        grant = form.get("grant_type")
        for unexpected in ("code", "redirect_uri", "code_verifier"):
            if unexpected in form:
                raise SacRejection(400, f"The request has unexpected parameter '{unexpected}'.")
        if grant == "client_credentials":
            client = self._client_credentials(form)
        elif grant == JWT_BEARER_GRANT:
            client = self._jwt_bearer(form)
        else:
            raise SacRejection(400, "The request 'grant_type' provided is not supported.")
        audience = form["audience"]
        if audience not in self._clients:
            raise SacRejection(403, "The specified 'audience' is invalid.")
        allowed = client.authorizations.get(audience)
        if allowed is None:
            raise SacRejection(403, "The client is not authorized for the specified audience.")
        scopes = sorted(set(form["scope"].split(" "))) if "scope" in form else []
        for scope in scopes:
            if scope not in allowed or scope not in self._clients[audience].scopes:
                raise SacRejection(403, f"The specified scope '{scope}' is invalid.")
        token = self._signer.mint(sub=client.client_id, audience=audience, lifetime_s=self.token_lifetime_s,
                                  claims={"scope": " ".join(scopes)} if scopes else None,
                                  headers={"typ": "JWT"})
        return {"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime_s}

    def _client_credentials(self, form: Mapping[str, str]) -> _Client:
        _require(form, "audience", "client_secret")
        if "assertion" in form:
            raise SacRejection(400, "The request has unexpected parameter 'assertion'.")
        client = self._clients.get(form.get("client_id", ""))
        if client is None:
            raise SacRejection(401, "The request has invalid 'client_id'.")
        if client.secret is None or not hmac.compare_digest(client.secret.encode(), form["client_secret"].encode()):
            raise SacRejection(401, "The request has invalid 'client_id' or 'client_secret.")
        return client

    def _jwt_bearer(self, form: Mapping[str, str]) -> _Client:
        _require(form, "audience", "assertion")
        assertion = form["assertion"]
        try:
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise SacRejection(400, "The request has an invalid 'assertion'.") from None
        if "client_secret" in form:
            raise SacRejection(400, "The request has unexpected parameter 'client_secret'.")
        client = self._clients.get(form.get("client_id", ""))
        if client is None:
            raise SacRejection(401, "The request has invalid 'client_id'.")
        if not client.jwt_bearer:
            raise SacRejection(403, "The client not configured for jwt-bearer.")
        trust = next((t for t in client.jwt_bearer if _matches(t, claims)), None)
        if trust is None:
            raise SacRejection(403, "The client no matching jwt-bearer.")
        problem = self._verify_assertion(assertion, trust)
        if problem is not None:
            raise SacRejection(403, "Invalid assertion jwt.", details=problem)
        return client

    def _verify_assertion(self, assertion: str, trust: JwtBearerTrust) -> str | None:
        """None when ``assertion`` is signed by ``trust.jwks`` and current; else why not."""
        try:
            kid = jwt.get_unverified_header(assertion).get("kid")
            key = jwt.PyJWKSet.from_dict(dict(trust.jwks))[str(kid)]
            claims = jwt.decode(assertion, key=key, algorithms=["RS256"], options={
                "verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False})
        except KeyError:
            return "no key in the trusted JWKS matches the assertion's kid"
        except jwt.PyJWTError as exc:
            return f"signature verification failed ({type(exc).__name__})"
        now = self.clock.now().timestamp()
        exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat", 0))
        if not isinstance(exp, int | float) or exp <= now - CLOCK_SKEW_S:
            return "the assertion has expired" if isinstance(exp, int | float) else "the assertion has no exp"
        if isinstance(nbf, int | float) and nbf > now + CLOCK_SKEW_S:
            return "the assertion is not yet valid"
        return None


def _matches(trust: JwtBearerTrust, claims: Mapping[str, Any]) -> bool:
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    return claims.get("iss") == trust.issuer and claims.get("sub") == trust.subject and trust.audience in audiences


def _form(request: HttpRequest) -> dict[str, str]:
    content_type = (get_header(request, "Content-Type") or "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        # SAC's controller consumes form bodies only (upstream.md §7).
        raise SacRejection(415, f"Content-Type '{content_type or '(none)'}' is not supported; send "
                           "application/x-www-form-urlencoded.")
    pairs = parse_qsl(request.body.decode("utf-8", errors="replace"), keep_blank_values=True)
    form = dict(pairs)
    if len(form) != len(pairs):
        raise SacRejection(400, "A request parameter is included more than once.")
    return form


def _require(form: Mapping[str, str], *names: str) -> None:
    for name in names:
        if not form.get(name, "").strip():
            raise SacRejection(400, f"The request is missing the required parameter '{name}'.")


def _json(status: int, payload: Any) -> HttpResponse:
    return HttpResponse(status=status, headers={"Content-Type": _JSON}, body=json.dumps(payload).encode())


def token_claims(token: str, jwks: Mapping[str, Any], *, now: dt.datetime | None = None) -> dict[str, Any]:
    """The verified claims of a token this endpoint issued (tests' oracle); PyJWT raises otherwise.
    ``now`` (default: real time) is when ``exp`` is checked."""
    key = jwt.PyJWKSet.from_dict(dict(jwks))[str(jwt.get_unverified_header(token).get("kid"))]
    claims: dict[str, Any] = jwt.decode(token, key=key, algorithms=["RS256"], options={
        "verify_aud": False, "verify_exp": now is None, "verify_iat": False, "verify_nbf": False})
    if now is not None and claims["exp"] <= now.timestamp():
        raise jwt.ExpiredSignatureError("token expired")
    return claims
