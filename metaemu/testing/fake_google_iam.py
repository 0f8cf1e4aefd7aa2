"""A stand-in for IAM Credentials v1 ``generateAccessToken`` and ``generateIdToken`` (upstream.md §2).

Owns the service-account registry, the Token Creator grants, and the checks IAM makes, in the
order a Google front end makes them: bearer token (401 UNAUTHENTICATED), its OAuth scopes (403
ACCESS_TOKEN_SCOPE_INSUFFICIENT), the JSON body (400 INVALID_ARGUMENT), the account (404), then the
grant along the delegation chain (403 IAM_PERMISSION_DENIED, exactly §2.2). Issued access tokens
carry whole-second ``expireTime`` (google-auth rejects fractions, §2.3); ID tokens are signed by
``GoogleSigner`` with the claims of gce-metadata.md SA-15 for IAM (no ``google.compute_engine``).

Not owned here: routing, faults, recording (``fake_google.FakeGoogle``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from metaemu.clock import Clock
from metaemu.errors import ConfigError
from metaemu.testing.fake_google_errors import (
    account_disabled,
    insufficient_scopes,
    invalid_argument,
    invalid_json,
    json_response,
    permission_denied,
    rpc_error,
    unauthenticated,
)
from metaemu.testing.fake_google_tokens import GoogleSigner, IssuedTokens, TokenInfo
from metaemu.testing.inprocess import get_header
from metaemu.transport import HttpRequest, HttpResponse

IAM_SERVICE = "iamcredentials.googleapis.com"
ACCESS_TOKEN_PERMISSION = "iam.serviceAccounts.getAccessToken"
ID_TOKEN_PERMISSION = "iam.serviceAccounts.getOpenIdToken"
#: A caller's token must carry one of these scopes to call IAM Credentials (its discovery doc).
IAM_SCOPES = frozenset({"https://www.googleapis.com/auth/iam",
                        "https://www.googleapis.com/auth/cloud-platform"})
#: generateAccessToken allows at most 1 h without the lifetime-extension org policy (§2.1).
MAX_ACCESS_TOKEN_LIFETIME_S = 3600
DEFAULT_ACCESS_TOKEN_LIFETIME_S = 3600
#: Google ID tokens expire one hour after issue (gce-metadata.md SA-15).
ID_TOKEN_LIFETIME_S = 3600
GOOGLE_ISSUER = "https://accounts.google.com"
SERVICE_ACCOUNT_TOKEN_PREFIX = "ya29.sa-"

_ACCESS_TOKEN_FIELDS = frozenset({"delegates", "scope", "lifetime"})
_ID_TOKEN_FIELDS = frozenset({"delegates", "audience", "includeEmail"})
#: google.protobuf.Duration in JSON: decimal seconds with up to nine fractional digits and an "s".
_DURATION = re.compile(r"^(\d+)(\.\d{1,9})?s$")
_DELEGATE = re.compile(r"^projects/-/serviceAccounts/([^/]+)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceAccount:
    email: str
    #: The 21-digit numeric ID that is ``sub`` and ``azp`` of the account's ID tokens.
    unique_id: str


class _Refusal(Exception):
    """Carries the error response of the first failed check out of nested helpers."""

    def __init__(self, response: HttpResponse) -> None:
        super().__init__(response.status)
        self.response = response


class IamService:
    """The IAM Credentials endpoints for accounts registered here."""

    def __init__(self, *, clock: Clock, tokens: IssuedTokens, signer: GoogleSigner) -> None:
        self._clock = clock
        self._tokens = tokens
        self._signer = signer
        self._accounts: dict[str, ServiceAccount] = {}
        self._grants: dict[str, set[str]] = {}
        self._disabled: set[str] = set()

    def add_service_account(self, email: str, unique_id: str | None = None) -> ServiceAccount:
        # A stable ID derived from the email keeps assertions on ``sub`` reproducible.
        uid = unique_id or str(10**20 + int(hashlib.sha256(email.encode()).hexdigest(), 16) % 10**20)
        account = ServiceAccount(email=email, unique_id=uid)
        self._accounts[email] = account
        self._grants.setdefault(email, set())
        return account

    def grant(self, email: str, principal: str) -> None:
        """Give ``principal`` (``principal://…``, ``principalSet://…/*`` or ``serviceAccount:E``)
        Token Creator on ``email``; ``ConfigError`` when the account is not registered."""
        self._grants_of(email).add(principal)

    def revoke(self, email: str, principal: str) -> None:
        self._grants_of(email).discard(principal)

    def set_disabled(self, email: str, disabled: bool) -> None:
        """Disable (or re-enable) ``email``, as ``gcloud iam service-accounts disable`` does: callers
        with the permission then get 400 FAILED_PRECONDITION (``account_disabled``)."""
        self._grants_of(email)
        (self._disabled.add if disabled else self._disabled.discard)(email)

    def _grants_of(self, email: str) -> set[str]:
        if email not in self._grants:
            raise ConfigError("service_account", f"{email} is not registered with the fake IAM")
        return self._grants[email]

    async def generate_access_token(self, request: HttpRequest, account_ref: str) -> HttpResponse:
        now = self._clock.now()
        try:
            caller = self._authenticate(request, method="GenerateAccessToken")
            body = _json_object(request, _ACCESS_TOKEN_FIELDS)
            scopes, lifetime_s = _scopes(body), _lifetime_s(body)
            target = self._authorize(caller, account_ref, body, permission=ACCESS_TOKEN_PERMISSION)
        except _Refusal as refusal:
            return refusal.response
        # Whole seconds: Google emits them and google-auth parses nothing else (upstream.md §2.3).
        expiry = (now + dt.timedelta(seconds=lifetime_s)).replace(microsecond=0)
        info = TokenInfo(kind="service_account", principal=f"serviceAccount:{target.email}",
                         email=target.email, scopes=scopes, expiry=expiry)
        token = self._tokens.issue(prefix=SERVICE_ACCOUNT_TOKEN_PREFIX, info=info)
        return json_response(200, {"accessToken": token, "expireTime": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")})

    async def generate_id_token(self, request: HttpRequest, account_ref: str) -> HttpResponse:
        now = self._clock.now()
        try:
            caller = self._authenticate(request, method="GenerateIdToken")
            body = _json_object(request, _ID_TOKEN_FIELDS)
            audience, include_email = _audience(body), _include_email(body)
            target = self._authorize(caller, account_ref, body, permission=ID_TOKEN_PERMISSION)
        except _Refusal as refusal:
            return refusal.response
        issued_at = int(now.timestamp())
        claims: dict[str, Any] = {"aud": audience, "azp": target.unique_id, "exp": issued_at + ID_TOKEN_LIFETIME_S,
                                  "iat": issued_at, "iss": GOOGLE_ISSUER, "sub": target.unique_id}
        if include_email:
            claims |= {"email": target.email, "email_verified": True}
        return json_response(200, {"token": self._signer.sign(claims)})

    def _authenticate(self, request: HttpRequest, *, method: str) -> TokenInfo:
        """The caller's live token with an IAM-capable scope, else a 401 or 403 refusal."""
        full_method = f"google.iam.credentials.v1.IAMCredentials.{method}"
        scheme, _, token = (get_header(request, "Authorization") or "").partition(" ")
        if not token:
            raise _Refusal(unauthenticated("CREDENTIALS_MISSING", service=IAM_SERVICE, method=full_method))
        info = self._tokens.lookup(token.strip()) if scheme.lower() == "bearer" else None
        if info is None:
            raise _Refusal(unauthenticated("ACCESS_TOKEN_TYPE_UNSUPPORTED", service=IAM_SERVICE,
                                           method=full_method))
        if not info.is_live(self._clock.now()):
            raise _Refusal(unauthenticated("ACCESS_TOKEN_EXPIRED", service=IAM_SERVICE, method=full_method))
        if not IAM_SCOPES.intersection(info.scopes):
            raise _Refusal(insufficient_scopes(service=IAM_SERVICE, method=full_method))
        return info

    def _authorize(self, caller: TokenInfo, account_ref: str, body: dict[str, Any], *,
                   permission: str) -> ServiceAccount:
        """The target account when each hop of caller -> delegates... -> target holds a grant."""
        target = self._account(account_ref)
        chain = [self._account(ref) for ref in _delegates(body)]
        principal = caller.principal
        for hop in [*chain, target]:
            if not _granted(self._grants.get(hop.email, set()), principal):
                raise _Refusal(permission_denied(permission))
            if hop.email in self._disabled:  # only after the grant: a stranger learns nothing
                raise _Refusal(account_disabled())
            principal = f"serviceAccount:{hop.email}"
        return target

    def _account(self, ref: str) -> ServiceAccount:
        ref = unquote(ref)
        account = self._accounts.get(ref) or next(
            (a for a in self._accounts.values() if a.unique_id == ref), None)
        if account is None:
            raise _Refusal(rpc_error(404, f"Not found; Gaia id not found for email {ref}"))
        return account


def _granted(grants: set[str], principal: str) -> bool:
    if principal in grants:
        return True
    # principalSet://iam.googleapis.com/<pool>/* grants every identity in the pool.
    for grant in grants:
        if grant.startswith("principalSet://") and grant.endswith("/*"):
            pool = grant.removeprefix("principalSet://").removesuffix("/*")
            if principal.startswith(f"principal://{pool}/subject/"):
                return True
    return False


def _json_object(request: HttpRequest, allowed: frozenset[str]) -> dict[str, Any]:
    try:
        payload = json.loads(request.body or b"{}")
    except ValueError:
        raise _Refusal(invalid_json("Unexpected token.")) from None
    if not isinstance(payload, dict):
        raise _Refusal(invalid_json("Root element must be a message."))
    for name in payload:
        if name not in allowed:
            raise _Refusal(invalid_json(f'Unknown name "{name}": Cannot find field.'))
    return payload


def _scopes(body: dict[str, Any]) -> tuple[str, ...]:
    scope = body.get("scope")
    if not isinstance(scope, list) or not scope or not all(isinstance(s, str) and s for s in scope):
        raise _Refusal(invalid_argument("scope", "At least one scope must be requested."))
    return tuple(scope)


def _lifetime_s(body: dict[str, Any]) -> float:
    raw = body.get("lifetime")
    if raw is None:
        return DEFAULT_ACCESS_TOKEN_LIFETIME_S
    match = _DURATION.match(raw) if isinstance(raw, str) else None
    if match is None:
        raise _Refusal(invalid_argument("lifetime", f"Invalid duration {raw!r}; expected e.g. \"3600s\"."))
    seconds = float(match[0][:-1])
    if not 0 < seconds <= MAX_ACCESS_TOKEN_LIFETIME_S:
        raise _Refusal(invalid_argument(
            "lifetime", f"The lifetime must be greater than 0s and at most {MAX_ACCESS_TOKEN_LIFETIME_S}s "
            "(longer needs constraints/iam.allowServiceAccountCredentialLifetimeExtension)."))
    return seconds


def _delegates(body: dict[str, Any]) -> list[str]:
    # google-auth sends "delegates": null (upstream.md §2.3); an empty list means the same.
    delegates = body.get("delegates")
    if delegates is None:
        return []
    if not isinstance(delegates, list):
        raise _Refusal(invalid_argument("delegates", "delegates must be a list of resource names."))
    refs = []
    for item in delegates:
        match = _DELEGATE.match(item) if isinstance(item, str) else None
        if match is None:
            raise _Refusal(invalid_argument("delegates", f"Invalid delegate {item!r}; expected "
                                            "projects/-/serviceAccounts/EMAIL_OR_ID."))
        refs.append(match[1])
    return refs


def _audience(body: dict[str, Any]) -> str:
    audience = body.get("audience")
    if not isinstance(audience, str) or not audience:
        raise _Refusal(invalid_argument("audience", "The audience is required."))
    return audience


def _include_email(body: dict[str, Any]) -> bool:
    value = body.get("includeEmail", False)
    if not isinstance(value, bool):
        raise _Refusal(invalid_json(f'Invalid value at \'include_email\' (TYPE_BOOL), {json.dumps(value)}'))
    return value
