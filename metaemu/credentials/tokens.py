"""Token values and their expiry arithmetic.

Every token records ``expiry`` as aware UTC, computed from the wall time taken *before* the request
that produced it was sent, so a computed expiry is never later than the real one (it errs early).
Values are excluded from ``repr`` so a token never reaches a log line by accident.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

import jwt

from metaemu.transport import ClientCertificate

#: RFC 8693 token-type URNs used with Google STS (upstream.md §1.1).
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
AWS_TOKEN_TYPE = "urn:ietf:params:aws:token-type:aws4_request"
#: X.509 workload identity federation: the subject token is the certificate chain and the exchange
#: runs over mTLS with the leaf (STS REST reference, ``subject_token``; issue #14).
MTLS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:mtls"


@dataclass(frozen=True, slots=True, kw_only=True)
class Token:
    value: str = field(repr=False)
    expiry: dt.datetime
    #: ``expiry`` as a Unix timestamp, for float arithmetic on the request hot path.
    expiry_ts: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "expiry_ts", self.expiry.timestamp())

    def remaining_s(self, now: dt.datetime) -> float:
        return (self.expiry - now).total_seconds()

    def expires_in(self, now: dt.datetime) -> int:
        """Whole seconds left, rounded down so it never overstates the lifetime (T-01, SEC-28)."""
        return self.expires_in_at(now.timestamp())

    def expires_in_at(self, now_ts: float) -> int:
        """``expires_in`` for a Unix-timestamp ``now``."""
        return max(0, math.floor(self.expiry_ts - now_ts))


@dataclass(frozen=True, slots=True, kw_only=True)
class SubjectToken:
    """An external credential for STS: a JWT, an AWS aws4_request, ... (``token_type`` URN).

    ``expiry`` is None when the token is opaque (an aws4_request has no readable expiry).
    ``client_certificate`` is the proof of possession a certificate-bound token needs: STS must be
    called over mTLS with it (the ``mtls`` type, whose value names the same leaf).
    """

    value: str = field(repr=False)
    token_type: str
    expiry: dt.datetime | None = None
    client_certificate: ClientCertificate | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class FederatedToken(Token):
    """A Google STS access token for the workload's federated principal (or, from the ``google``
    source, the developer's own). ``quota_project`` is the project IAM calls made with it bill
    (``x-goog-user-project``), as google-auth sends for end-user credentials."""

    quota_project: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessToken(Token):
    """A Google OAuth2 access token as served on ``…/token`` (SA-06)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityToken(Token):
    """A Google-signed OIDC ID token as served on ``…/identity`` (SA-12)."""


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a compact JWT, without checking its signature.

    Used only to read ``exp`` from tokens that a verifier downstream (Google STS, the client)
    checks anyway. Raises ``ValueError`` when ``token`` is not a JWT with a JSON object payload.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise ValueError(f"not a JWT: {type(exc).__name__}") from None
    if not isinstance(claims, dict):
        raise ValueError("JWT payload is not a JSON object")
    return claims


def jwt_expiry(token: str) -> dt.datetime:
    """``exp`` of a compact JWT as aware UTC; ``ValueError`` when missing or not a number."""
    exp = unverified_claims(token).get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise ValueError("JWT has no numeric exp claim")
    try:
        return dt.datetime.fromtimestamp(exp, dt.UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError("JWT exp claim is out of range") from None
