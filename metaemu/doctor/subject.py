"""What a subject token says, for the doctor: its claims decoded (never its value), and whether it
is present, unexpired and aimed at the provider (upstream.md §1.1, §6).

SECURITY: only claims and the header's ``kid``/``alg`` leave this module; the token itself and its
signature never do.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import jwt

from metaemu.credentials.tokens import AWS_TOKEN_TYPE, ID_TOKEN_TYPE, JWT_TOKEN_TYPE, SubjectToken

#: A subject token this close to expiry is reported: STS allows a little skew, a refresh does not wait.
EXPIRY_WARNING_S = 60
_JWT_TYPES = (JWT_TOKEN_TYPE, ID_TOKEN_TYPE)


@dataclass(frozen=True, slots=True, kw_only=True)
class SubjectFacts:
    """The decoded, printable facts of a subject token (``None`` where the token does not say)."""

    token_type: str
    issuer: str | None = None
    subject: str | None = None
    audiences: tuple[str, ...] = ()
    expiry: dt.datetime | None = None
    key_id: str | None = None
    problem: str | None = None  # why the token is unusable (not a JWT, expired), None when usable

    def details(self, now: dt.datetime) -> dict[str, str]:
        out = {"type": self.token_type}
        for key, value in (("issuer", self.issuer), ("subject", self.subject), ("kid", self.key_id)):
            if value is not None:
                out[key] = value
        if self.audiences:
            out["audience"] = ", ".join(self.audiences)
        if self.expiry is not None:
            left = int((self.expiry - now).total_seconds())
            when = f"in {left} s" if left >= 0 else f"{-left} s ago"
            out["expires"] = f"{self.expiry:%Y-%m-%dT%H:%M:%SZ} ({when})"
        return out


def describe(token: SubjectToken, *, now: dt.datetime) -> SubjectFacts:
    """The facts of ``token`` and its first problem, judged at ``now``."""
    if token.token_type == AWS_TOKEN_TYPE:
        return SubjectFacts(token_type="aws4_request (a signed GetCallerIdentity; no claims to decode)")
    if token.token_type not in _JWT_TYPES:
        return SubjectFacts(token_type=token.token_type, expiry=token.expiry)
    try:
        header = jwt.get_unverified_header(token.value)
        claims = jwt.decode(token.value, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        return SubjectFacts(token_type="jwt", problem=f"the subject token is not a JWT ({type(exc).__name__})")
    aud = claims.get("aud")
    audiences = (aud,) if isinstance(aud, str) else tuple(str(a) for a in aud) if isinstance(aud, list) else ()
    exp = claims.get("exp")
    expiry = (dt.datetime.fromtimestamp(exp, dt.UTC) if isinstance(exp, int | float) and not isinstance(exp, bool)
              else None)
    facts = SubjectFacts(token_type="jwt", issuer=_text(claims.get("iss")), subject=_text(claims.get("sub")),
                         audiences=audiences, expiry=expiry, key_id=_text(header.get("kid")))
    problem = _problem(facts, now)
    return facts if problem is None else _with_problem(facts, problem)


def aimed_at(facts: SubjectFacts, audience: str) -> bool:
    """Whether the token names ``audience`` (or its ``https:`` form): STS's default allowed
    audience when the provider lists none (upstream.md §1.1)."""
    return not facts.audiences or audience in facts.audiences or f"https:{audience}" in facts.audiences


def _problem(facts: SubjectFacts, now: dt.datetime) -> str | None:
    if facts.expiry is None:
        return "the subject token has no exp claim (STS requires one)"
    if facts.expiry <= now:
        return "the subject token has expired"
    if facts.subject is None:
        return "the subject token has no sub claim (STS requires one)"
    if facts.issuer is None:
        return "the subject token has no iss claim"
    return None


def _with_problem(facts: SubjectFacts, problem: str) -> SubjectFacts:
    return SubjectFacts(token_type=facts.token_type, issuer=facts.issuer, subject=facts.subject,
                        audiences=facts.audiences, expiry=facts.expiry, key_id=facts.key_id, problem=problem)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
