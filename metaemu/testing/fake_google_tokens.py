"""What the fake Google issues and later recognises.

- ``IssuedTokens``: the opaque ``ya29.`` access tokens minted by the fake STS (federated) and the
  fake IAM Credentials (service account), each remembered with its principal, scopes and expiry so
  later calls (IAM, a fake GCS) can authenticate them against the injected clock.
- ``GoogleSigner``: the RSA key "accounts.google.com" signs ID tokens with, and its JWKS.

Not owned here: deciding whether to issue (the STS and IAM stand-ins verify first).
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from metaemu.clock import Clock

#: RSA modulus size for fake signing keys: what Google and Kubernetes use (RS256 over 2048 bits).
RSA_KEY_BITS = 2048

TokenKind = Literal["federated", "service_account", "user"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenInfo:
    """What the fake knows about an access token it issued.

    ``principal`` is ``principal://iam.googleapis.com/...`` for a federated token and
    ``serviceAccount:EMAIL`` for a service-account token; ``email`` is the service account an
    impersonated token acts as (None for federated tokens).
    """

    kind: TokenKind
    principal: str
    email: str | None
    scopes: tuple[str, ...]
    expiry: dt.datetime

    def is_live(self, now: dt.datetime) -> bool:
        return now < self.expiry


class IssuedTokens:
    """Opaque access tokens, random and unguessable like Google's, with their metadata."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._tokens: dict[str, TokenInfo] = {}

    def issue(self, *, prefix: str, info: TokenInfo) -> str:
        # 48 random bytes: in the range of real ya29 tokens' length and far beyond guessing.
        token = f"{prefix}{secrets.token_urlsafe(48)}"
        self._tokens[token] = info
        return token

    def lookup(self, token: str) -> TokenInfo | None:
        """The token's metadata, expired or not; None when this fake never issued it."""
        return self._tokens.get(token)

    def live(self, token: str) -> TokenInfo | None:
        """The token's metadata when it was issued here and is unexpired by the clock."""
        info = self._tokens.get(token)
        return info if info is not None and info.is_live(self._clock.now()) else None


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)


def public_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    """The public half of ``key`` as a JWK for RS256 signatures (RFC 7517)."""
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


@dataclass(slots=True, kw_only=True)
class GoogleSigner:
    """Google's ID-token signing key. Generated on first use: most tests never mint ID tokens,
    and an RSA-2048 key costs ~50 ms."""

    kid: str = field(default_factory=lambda: uuid.uuid4().hex)
    _key: rsa.RSAPrivateKey | None = field(default=None, repr=False)

    @property
    def key(self) -> rsa.RSAPrivateKey:
        if self._key is None:
            self._key = new_rsa_key()
        return self._key

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(dict(claims), self.key, algorithm="RS256", headers={"kid": self.kid})

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(self.key, self.kid)]}
