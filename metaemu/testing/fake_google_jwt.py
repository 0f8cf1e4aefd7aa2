"""The fake STS's verifier for OIDC subject tokens (``…:token-type:jwt`` and ``…:id_token``).

Checks what the STS REST reference lists for JWT subject tokens (upstream.md §1.1, UP-18): a
``kid`` header and an RS256/ES256 signature by that key in the provider's uploaded JWKS (PyJWT,
not ``google.auth.jwt``, which rejects list audiences, §8), ``iss`` equal to the provider's
issuer, an ``aud`` (string or list) naming an accepted audience, ``iat`` in the past, ``exp`` in
the future and less than 48 h after ``iat``, ``nbf`` (when present) in the past, and ``sub``.
Times come from the fake's injected clock, never from PyJWT's real-time checks.

Not owned here: the request itself and the registry (``fake_google_sts``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import jwt

from metaemu.testing.fake_google_sts import (
    ATTRIBUTE_CONDITION_REJECTED,
    StsRejection,
    SubjectCheck,
    WorkloadIdentityProvider,
)

#: Signature algorithms STS accepts for OIDC subject tokens (REST reference; upstream.md §1.1).
ACCEPTED_ALGORITHMS = ("RS256", "ES256")
#: STS requires ``exp`` less than 48 h after ``iat`` (upstream.md §1.1).
MAX_SUBJECT_LIFETIME_S = 48 * 3600
#: Clock-skew allowance for ``iat``/``nbf``/``exp``. Google does not publish its value; 10 s absorbs
#: whole-second rounding and loopback latency, while tests of rejection are off by minutes.
CLOCK_SKEW_S = 10.0


async def verify_jwt_subject(check: SubjectCheck) -> str:
    """``sub`` of a valid OIDC subject token; raises ``StsRejection`` (invalid_grant) otherwise."""
    provider = check.provider
    if provider.jwks is None or provider.issuer is None:
        raise StsRejection("invalid_grant", "The provider is not an OIDC provider; it cannot accept a JWT.")
    key = _signing_key(check.subject_token, provider)
    try:
        claims = jwt.decode(check.subject_token, key=key, algorithms=list(ACCEPTED_ALGORITHMS), options={
            "verify_signature": True, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
            "verify_aud": False, "verify_iss": False, "verify_sub": False, "verify_jti": False})
    except jwt.InvalidSignatureError:
        raise StsRejection("invalid_grant", "Invalid ID Token signature.") from None
    except jwt.PyJWTError as exc:
        raise StsRejection("invalid_grant", f"Unable to verify the ID Token: {type(exc).__name__}.") from None
    _check_issuer_and_audience(claims, provider)
    _check_times(claims, check.now)
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise StsRejection("invalid_grant", "The ID Token has no 'sub' claim.")
    if provider.attribute_condition is not None and not provider.attribute_condition(claims):
        raise StsRejection("unauthorized_client", ATTRIBUTE_CONDITION_REJECTED)
    return subject


def _signing_key(token: str, provider: WorkloadIdentityProvider) -> jwt.PyJWK:
    """The JWKS key named by the token's ``kid``, after checking the header's ``kid`` and ``alg``."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise StsRejection("invalid_grant", "Unable to parse the ID Token.") from None
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise StsRejection("invalid_grant", "The ID Token header has no 'kid'.")
    alg = header.get("alg")
    if alg not in ACCEPTED_ALGORITHMS:
        raise StsRejection("invalid_grant", f"The ID Token is signed with alg {alg!r}; expected one of "
                           f"{', '.join(ACCEPTED_ALGORITHMS)}.")
    try:
        key_set = jwt.PyJWKSet.from_dict(dict(provider.jwks or {}))
        return key_set[kid]
    except jwt.PyJWKSetError:
        raise StsRejection("invalid_grant", "The provider's JWKS has no usable keys.") from None
    except KeyError:
        raise StsRejection("invalid_grant", f"No key in the provider's JWKS has kid {kid!r}.") from None


def _check_issuer_and_audience(claims: dict[str, Any], provider: WorkloadIdentityProvider) -> None:
    issuer = claims.get("iss")
    if issuer != provider.issuer:
        raise StsRejection("invalid_grant", f"The issuer in ID Token {issuer} does not match the expected "
                           f"ISSUER {provider.issuer}.")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not any(a in provider.accepted_audiences for a in audiences if isinstance(a, str)):
        shown = ", ".join(str(a) for a in audiences)
        expected = ", ".join(provider.accepted_audiences)
        raise StsRejection("invalid_grant", f"The audience in ID Token [{shown}] does not match the "
                           f"expected audience {expected}.")


def _check_times(claims: dict[str, Any], now: dt.datetime) -> None:
    now_s = now.timestamp()
    issued_at, expires_at = _numeric(claims, "iat"), _numeric(claims, "exp")
    if issued_at > now_s + CLOCK_SKEW_S:
        raise StsRejection("invalid_grant", f"The ID Token was issued in the future (iat {issued_at:.0f}, "
                           f"now {now_s:.0f}).")
    if expires_at <= now_s - CLOCK_SKEW_S:
        raise StsRejection("invalid_grant", f"The ID Token has expired (exp {expires_at:.0f}, now {now_s:.0f}).")
    if expires_at - issued_at >= MAX_SUBJECT_LIFETIME_S:
        raise StsRejection("invalid_grant", "The lifetime of the ID Token (exp - iat) must be less than 48 "
                           f"hours; it is {expires_at - issued_at:.0f} seconds.")
    if "nbf" in claims and _numeric(claims, "nbf") > now_s + CLOCK_SKEW_S:
        raise StsRejection("invalid_grant", "The ID Token is not yet valid (nbf is in the future).")


def _numeric(claims: dict[str, Any], name: str) -> float:
    value = claims.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise StsRejection("invalid_grant", f"The ID Token has no numeric '{name}' claim.")
    return float(value)
