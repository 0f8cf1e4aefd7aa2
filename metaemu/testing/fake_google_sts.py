"""A stand-in for Google STS v1 ``POST /v1/token`` (RFC 8693 token exchange, upstream.md §1).

Owns the workload-identity provider registry, the request checks STS makes (no Authorization
header, grant and token types, audience, ``options`` single- or double-encoded, upstream.md §10.2)
and the dispatch to one subject verifier per subject-token type, registered through
``register_subject_verifier`` (the JWT one is ``fake_google_jwt.verify_jwt_subject``; an AWS
``aws4_request`` verifier is added the same way). A type without a verifier is refused.

Not owned here: routing, fault injection, recording (``fake_google.FakeGoogle``); the tokens
themselves (``fake_google_tokens``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

from metaemu.clock import Clock
from metaemu.credentials.tokens import ACCESS_TOKEN_TYPE
from metaemu.errors import ConfigError
from metaemu.testing.fake_google_errors import json_response, oauth_error
from metaemu.testing.fake_google_tokens import IssuedTokens, TokenInfo
from metaemu.testing.inprocess import get_header
from metaemu.transport import HttpRequest, HttpResponse

if TYPE_CHECKING:
    from metaemu.testing.fake_google_x509 import X509Federation

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
#: Federated tokens live 1 h; STS reports 3599 (upstream.md §1.2), the elapsed second rounded off.
FEDERATED_TOKEN_LIFETIME_S = 3600
REPORTED_EXPIRES_IN_S = 3599
#: The serialized ``options`` parameter is limited to 4096 characters (STS REST reference).
MAX_OPTIONS_CHARS = 4096
FEDERATED_TOKEN_PREFIX = "ya29.fed-"

#: What STS answers a credential the provider's attribute condition rejects, as google-auth surfaced
#: it: ``{"error":"unauthorized_client","error_description":"The given credential is rejected by the
#: attribute condition."}`` (reported in circleci/circleci-docs#8541).
ATTRIBUTE_CONDITION_REJECTED = "The given credential is rejected by the attribute condition."
#: What STS answers an audience that is not a provider's full resource name, e.g. a project ID where
#: the project number belongs (reported in google-github-actions/auth#60, error ``invalid_request``).
INVALID_AUDIENCE = ("Invalid value for \"audience\". This value should be the full resource name of the Identity "
                    "Provider. See https://cloud.google.com/iam/docs/reference/sts/rest/v1/TopLevel/token for the "
                    "list of possible formats.")
#: A workload provider name whose project segment is not a project number.
_PROJECT_ID_AUDIENCE = re.compile(r"^//iam\.googleapis\.com/projects/(?![0-9]+/)[^/]+/locations/global/"
                                  r"workloadIdentityPools/")
INVALID_TARGET = ("The target service indicated by the \"audience\" parameters is invalid. This might "
                  "either be because the pool or provider is disabled or deleted or because it doesn't "
                  "exist.")

_WORKLOAD_PROVIDER = re.compile(
    r"^//iam\.googleapis\.com/(?P<pool>projects/[^/]+/locations/global/workloadIdentityPools/[^/]+)"
    r"/providers/[^/]+$")
_WORKFORCE_PROVIDER = re.compile(
    r"^//iam\.googleapis\.com/(?P<pool>locations/global/workforcePools/[^/]+)/providers/[^/]+$")
#: GKE fleet Workload Identity names the pool by its identity namespace (PROJECT.svc.id.goog).
_FLEET_PROVIDER = re.compile(r"^identitynamespace:(?P<ns>(?P<project>[^:]+)\.svc\.id\.goog):https://.+$")
#: The JSON REST form of the request uses camelCase (upstream.md §1.1).
_CAMEL_FIELDS: Mapping[str, str] = {"grantType": "grant_type", "requestedTokenType": "requested_token_type",
                 "subjectToken": "subject_token", "subjectTokenType": "subject_token_type"}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadIdentityProvider:
    """A workload (or workforce) identity pool provider as STS sees it.

    ``audience`` is the provider's full name (``//iam.googleapis.com/projects/N/locations/global/
    workloadIdentityPools/POOL/providers/PROV``) or the fleet form ``identitynamespace:PROJECT.svc.id.goog:
    https://...``; ``jwks`` is the uploaded JWKS of an OIDC provider (None for a non-OIDC provider such
    as AWS); ``allowed_audiences`` empty means the default audience (the full name, with and without
    ``https:``). ``project_number`` names the project in fleet principals (defaults to the project ID).
    """

    audience: str
    issuer: str | None = None
    jwks: Mapping[str, Any] | None = field(default=None, repr=False)
    allowed_audiences: tuple[str, ...] = ()
    project_number: str | None = None
    #: An X.509 provider's trust store and subject mapping (issue #14; ``fake_google_x509``).
    x509: X509Federation | None = field(default=None, repr=False)
    #: The provider's attribute condition (a CEL expression on Google's side), as a predicate over
    #: the verified assertion's claims; None accepts every credential. A rejection answers
    #: ``unauthorized_client`` (ATTRIBUTE_CONDITION_REJECTED).
    attribute_condition: Callable[[Mapping[str, Any]], bool] | None = field(default=None, repr=False,
                                                                            compare=False)
    #: The pool's resource name, ``projects/N/locations/global/workloadIdentityPools/POOL``.
    pool: str = field(init=False, default="")

    def __post_init__(self) -> None:
        pool = self._pool()
        if pool is None:
            raise ConfigError("audience", f"not a workload identity provider name: {self.audience!r}")
        object.__setattr__(self, "pool", pool)  # derived once; the instance is frozen
        if self.jwks is not None and not isinstance(self.jwks.get("keys"), list):
            raise ConfigError("jwks", "must be a JWK Set object with a 'keys' list")
        if self.jwks is not None and not self.issuer:
            raise ConfigError("issuer", "an OIDC provider with a JWKS needs its issuer URL")

    def _pool(self) -> str | None:
        for pattern in (_WORKLOAD_PROVIDER, _WORKFORCE_PROVIDER):
            if match := pattern.match(self.audience):
                return match["pool"]
        if match := _FLEET_PROVIDER.match(self.audience):
            number = self.project_number or match["project"]
            return f"projects/{number}/locations/global/workloadIdentityPools/{match['ns']}"
        return None

    @property
    def accepted_audiences(self) -> tuple[str, ...]:
        if self.allowed_audiences:
            return self.allowed_audiences
        if match := _FLEET_PROVIDER.match(self.audience):
            # Fleet Workload Identity tokens carry the identity namespace as their audience.
            return (match["ns"], self.audience)
        return (self.audience, f"https:{self.audience}")

    def principal(self, subject: str) -> str:
        """The IAM principal for ``google.subject`` = ``subject`` (the default attribute mapping)."""
        return f"principal://iam.googleapis.com/{self.pool}/subject/{subject}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SubjectCheck:
    """Everything a subject verifier may look at. ``now`` is the fake's clock at request time."""

    subject_token: str = field(repr=False)
    subject_token_type: str
    audience: str
    provider: WorkloadIdentityProvider
    headers: Mapping[str, str] = field(repr=False)
    now: dt.datetime


#: Verifies one subject token; returns ``google.subject`` or raises ``StsRejection``.
SubjectVerifier = Callable[[SubjectCheck], Awaitable[str]]


class StsRejection(Exception):
    """STS refuses the exchange; becomes an RFC 6749 error response (upstream.md §1.3).

    ``error`` is the RFC 6749 code (``invalid_grant``, ``invalid_request``, ``invalid_target``),
    ``description`` the specific reason, as Google words it where known.
    """

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status


@dataclass(frozen=True, slots=True, kw_only=True)
class _Exchange:
    audience: str
    scopes: tuple[str, ...]
    subject_token: str = field(repr=False)
    subject_token_type: str


class StsService:
    """The STS endpoint: provider registry, verifiers, and the exchange itself."""

    def __init__(self, *, clock: Clock, tokens: IssuedTokens) -> None:
        self._clock = clock
        self._tokens = tokens
        self._providers: dict[str, WorkloadIdentityProvider] = {}
        self._verifiers: dict[str, SubjectVerifier] = {}

    def add_provider(self, provider: WorkloadIdentityProvider) -> None:
        self._providers[provider.audience] = provider

    def register_subject_verifier(self, token_type: str, verifier: SubjectVerifier) -> None:
        self._verifiers[token_type] = verifier

    def principal_for(self, audience: str, subject: str) -> str:
        provider = self._providers.get(audience)
        if provider is None:
            raise ConfigError("audience", f"no provider registered for {audience!r}")
        return provider.principal(subject)

    async def exchange(self, request: HttpRequest) -> HttpResponse:
        """Answer one ``POST /v1/token``: the §1.2 success shape or an RFC 6749 error."""
        now = self._clock.now()  # taken first, as a real server would stamp the request
        try:
            exchange = _parse_exchange(request)
            provider = self._providers.get(exchange.audience)
            if provider is None and _PROJECT_ID_AUDIENCE.match(exchange.audience):
                raise StsRejection("invalid_request", INVALID_AUDIENCE)
            if provider is None:
                raise StsRejection("invalid_target", INVALID_TARGET)
            verifier = self._verifiers.get(exchange.subject_token_type)
            if verifier is None:
                raise StsRejection("invalid_request", f"subject_token_type {exchange.subject_token_type!r} is "
                                   "not supported by this fake STS (no verifier registered for it).")
            subject = await verifier(SubjectCheck(
                subject_token=exchange.subject_token, subject_token_type=exchange.subject_token_type,
                audience=exchange.audience, provider=provider, headers=request.headers, now=now))
        except StsRejection as rejection:
            return oauth_error(rejection.error, rejection.description, status=rejection.status)
        info = TokenInfo(kind="federated", principal=provider.principal(subject), email=None,
                         scopes=exchange.scopes, expiry=now + dt.timedelta(seconds=FEDERATED_TOKEN_LIFETIME_S))
        token = self._tokens.issue(prefix=FEDERATED_TOKEN_PREFIX, info=info)
        return json_response(200, {"access_token": token, "issued_token_type": ACCESS_TOKEN_TYPE,
                                   "token_type": "Bearer", "expires_in": REPORTED_EXPIRES_IN_S})


def _parse_exchange(request: HttpRequest) -> _Exchange:
    """The validated request, or ``StsRejection`` naming the first problem."""
    if get_header(request, "Authorization") is not None:
        # STS takes no client authentication for workload identity (upstream.md §1.1).
        raise StsRejection("invalid_request", "The request must not carry an Authorization header.")
    fields = _request_fields(request)
    if fields.get("grant_type") != GRANT_TYPE:
        raise StsRejection("unsupported_grant_type",
                           f"Invalid value for \"grant_type\"; expected {GRANT_TYPE}.")
    if fields.get("requested_token_type") != ACCESS_TOKEN_TYPE:
        raise StsRejection("invalid_request",
                           f"Invalid value for \"requested_token_type\"; expected {ACCESS_TOKEN_TYPE}.")
    for name in ("subject_token_type", "subject_token", "audience"):
        if not fields.get(name):
            raise StsRejection("invalid_request", f"Missing required parameter: {name}.")
    if fields.get("options"):
        _parse_options(fields["options"])
    return _Exchange(audience=fields["audience"], scopes=tuple(fields.get("scope", "").split()),
                     subject_token=fields["subject_token"], subject_token_type=fields["subject_token_type"])


def _request_fields(request: HttpRequest) -> dict[str, str]:
    """Form fields (what google-auth sends), or the camelCase JSON REST body mapped to them."""
    content_type = (get_header(request, "Content-Type") or "").split(";")[0].strip().lower()
    try:
        text = request.body.decode("utf-8")
    except UnicodeDecodeError:
        raise StsRejection("invalid_request", "The request body is not UTF-8.") from None
    if content_type == "application/json":
        try:
            payload = json.loads(text)
        except ValueError:
            raise StsRejection("invalid_request", "The request body is not valid JSON.") from None
        if not isinstance(payload, dict) or not all(isinstance(v, str) for v in payload.values()):
            raise StsRejection("invalid_request", "The request body must be a JSON object of strings.")
        return {_CAMEL_FIELDS.get(str(k), str(k)): str(v) for k, v in payload.items()}
    pairs = parse_qsl(text, keep_blank_values=True)
    fields = dict(pairs)
    if len(fields) != len(pairs):
        # RFC 6749 §3.2: request parameters must not be included more than once.
        raise StsRejection("invalid_request", "A request parameter is included more than once.")
    return fields


def _parse_options(raw: str) -> dict[str, Any]:
    """``options`` as a JSON object. google-auth double-encodes it (upstream.md §1.4), so a value
    still percent-encoded after the form decode is unquoted once more."""
    for candidate in (raw, unquote(raw)):
        if len(candidate) > MAX_OPTIONS_CHARS:
            raise StsRejection("invalid_request", f"options exceeds {MAX_OPTIONS_CHARS} characters.")
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise StsRejection("invalid_request", "The options parameter must be a JSON object.")
