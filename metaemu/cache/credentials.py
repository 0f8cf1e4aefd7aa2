"""The cached credentials of one identity: what the metadata handlers ask for.

Three ``TokenCache`` s over one ``Pipeline``: the federated STS token (used only as the bearer for
impersonation, fetched on demand and not kept warm: at most about one STS exchange per hour), access
tokens per scope set (the default set pinned and kept warm from start-up), and ID tokens per
(audience, format, licenses) (T-07), kept warm only while requested and bounded by LRU.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from metaemu.cache.refresher import Refresher
from metaemu.cache.token_cache import TokenCache
from metaemu.clock import Clock
from metaemu.credentials.pipeline import Pipeline
from metaemu.credentials.tokens import AccessToken, FederatedToken, IdentityToken
from metaemu.metrics import Metrics

#: Distinct scope sets seen from real clients are few (cloud-platform, devstorage.*, ...).
ACCESS_CACHE_SIZE = 64
#: Bounds memory under an audience flood (~1.5 KiB per cached ID token → ~1.5 MiB at the cap).
ID_CACHE_SIZE = 1024
#: A background fetch may wait this long for the federated token it needs (above the STS timeout).
FEDERATED_WAIT_S = 30.0

ScopeKey = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class IdTokenKey:
    audience: str
    format: str  # "standard" | "full"
    licenses: bool


class CachedCredentials:
    def __init__(self, *, pipeline: Pipeline, clock: Clock, metrics: Metrics, refresher: Refresher,
                 rng: random.Random | None = None) -> None:
        self._pipeline = pipeline
        self.default_scopes: ScopeKey = scope_key(pipeline.identity.default_scopes)
        #: Set by ``retire``: node mode dropped this principal (its remembered callers are stale).
        self.retired = False
        common = {"clock": clock, "metrics": metrics, "on_schedule_change": refresher.wake, "rng": rng}
        self.federated: TokenCache[None, FederatedToken] = TokenCache(
            kind="federated", fetch=self._fetch_federated, maxsize=1, **common)  # type: ignore[arg-type]
        self.access: TokenCache[ScopeKey, AccessToken] = TokenCache(
            kind="access_token", fetch=self._fetch_access, maxsize=ACCESS_CACHE_SIZE, **common)  # type: ignore[arg-type]
        self.identity: TokenCache[IdTokenKey, IdentityToken] = TokenCache(
            kind="id_token", fetch=self._fetch_identity, maxsize=ID_CACHE_SIZE, **common)  # type: ignore[arg-type]
        self._refresher = refresher
        for cache in (self.access, self.identity):  # the federated cache is fetched on demand only
            refresher.add(cache)
        self.access.pin(self.default_scopes)

    def retire(self) -> None:
        """Stop keeping this identity's tokens warm (node mode: its last pod left the node)."""
        self.retired = True
        for cache in (self.access, self.identity):
            self._refresher.remove(cache)

    @property
    def service_account(self) -> str | None:
        return self._pipeline.identity.service_account

    def ready(self) -> bool:
        """The default access token is cached and servable (readiness, issue §6)."""
        return self.access.peek(self.default_scopes) is not None

    def access_key(self, scopes: Sequence[str] | None) -> ScopeKey:
        """The cache key for a token request. Without impersonation the federated token is served
        whatever scopes are asked (SA-09: a server may ignore them), so one token is kept warm."""
        return scope_key(scopes) if scopes and self._pipeline.impersonates else self.default_scopes

    async def access_token(self, key: ScopeKey, *, wait_s: float) -> AccessToken:
        return await self.access.get(key, wait_s=wait_s)

    async def id_token(self, key: IdTokenKey, *, wait_s: float) -> IdentityToken:
        return await self.identity.get(key, wait_s=wait_s)

    async def _fetch_federated(self, _: None) -> FederatedToken:
        return await self._pipeline.federated_token()

    async def _federated(self) -> FederatedToken:
        # Not registered with the refresher: renewed only when a derived token needs it.
        return await self.federated.get(None, wait_s=FEDERATED_WAIT_S)

    async def _fetch_access(self, scopes: ScopeKey) -> AccessToken:
        if not self._pipeline.impersonates:
            return await self._pipeline.access_token(scopes, federated=await self._pipeline.federated_token())
        return await self._pipeline.access_token(scopes, federated=await self._federated())

    async def _fetch_identity(self, key: IdTokenKey) -> IdentityToken:
        return await self._pipeline.id_token(key.audience, include_email=key.format == "full",
                                             federated=await self._federated())


def scope_key(scopes: Sequence[str]) -> ScopeKey:
    return tuple(sorted({s.strip() for s in scopes if s.strip()}))
