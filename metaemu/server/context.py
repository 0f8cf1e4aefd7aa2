"""Who a request is for: the tree it sees and the credentials it gets.

In sidecar mode there is one identity, so the context is constant (and the handler may serve from
its fast path). In node mode the context is resolved per request from the TCP peer address only
(``metaemu.pods.agent.NodeAgent``); a caller that cannot be identified gets a ``Refusal``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from metaemu.cache.credentials import CachedCredentials
from metaemu.pods.identity import Refusal
from metaemu.server.metadata_tree import Entry


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestContext:
    index: Mapping[str, Entry]
    credentials: CachedCredentials
    #: Per-caller rate-limit bucket (the pod UID in node mode; None: not limited).
    rate_key: str | None = None


class ContextProvider(Protocol):
    #: The one context of sidecar mode; None when contexts are resolved per request.
    static: RequestContext | None
    #: The identity-free tree: ``/``, discovery listings and 404s outside ``/computeMetadata``.
    default_index: Mapping[str, Entry]

    async def context_for(self, request: web.Request) -> RequestContext | Refusal: ...

    def ready(self) -> str | None:
        """None when ready to serve; otherwise the reason (for /readyz)."""

    async def warm(self) -> None:
        """Return once what the first requests will ask for is in memory (node mode: before a
        successor takes over a running agent's address; issue #11)."""


class SidecarContext:
    def __init__(self, context: RequestContext) -> None:
        self.static: RequestContext | None = context
        self.default_index = context.index
        self._context = context

    async def context_for(self, request: web.Request) -> RequestContext | Refusal:
        return self._context

    def ready(self) -> str | None:
        return None if self._context.credentials.ready() else "no default access token cached yet"

    async def warm(self) -> None:
        """Nothing to wait for: a sidecar never shares its address with another metaemu."""
