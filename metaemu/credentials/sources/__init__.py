"""Subject-token sources: where the workload's own identity comes from.

A ``SubjectTokenSource`` produces a ``SubjectToken`` (value, RFC 8693 type, expiry when known) on
each call; the pipeline calls it once per STS exchange and never branches on the kind. One module per
kind; ``build_source`` is the only place that knows the kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from metaemu.clock import Clock
from metaemu.credentials.impersonation import Impersonation
from metaemu.credentials.sources.config import FileSourceConfig, KubernetesSourceConfig, SourceConfig, source_module
from metaemu.credentials.tokens import FederatedToken, SubjectToken
from metaemu.metrics import Metrics
from metaemu.transport import HttpClient


class SubjectTokenSource(Protocol):
    #: A short, bounded label for logs and metrics (``kubernetes``, ``file``, ...).
    kind: str

    async def fetch(self) -> SubjectToken:
        """A fresh subject token; raises ``SourceError`` (never returns a stale or empty one)."""


@runtime_checkable
class FederatedTokenProvider(Protocol):
    """A source whose credential already is a Google access token (the ``google`` kind): the
    pipeline uses it where it would use the STS token, instead of exchanging a subject token."""

    async def federated_token(self) -> FederatedToken:
        """A fresh Google access token; raises ``CredentialError``."""


@runtime_checkable
class DeclaresImpersonation(Protocol):
    """A source whose credentials name the service account they act as (the ``google`` kind with an
    ``impersonated_service_account`` file): assembly impersonates that account, through its
    delegates, where it would impersonate ``workload_identity.service_account``."""

    def impersonation(self) -> Impersonation | None:
        """The chain, fixed for the source's lifetime; None when the credentials name none."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceContext:
    """What a source may need besides its own configuration."""

    clock: Clock
    http: HttpClient
    metrics: Metrics
    #: The Workload Identity provider audience (AWS signs it into the request; OIDC defaults to it).
    audience: str
    #: The service account to impersonate, if any (executables are told it, AIP-4117).
    service_account: str | None = None


def build_source(config: SourceConfig, context: SourceContext) -> SubjectTokenSource:
    from metaemu.credentials.sources.file import FileSource

    match config:
        case KubernetesSourceConfig():
            return FileSource.kubernetes(config.token_file, clock=context.clock)
        case FileSourceConfig():
            return FileSource(config, clock=context.clock)
    source: SubjectTokenSource = source_module(config.kind, "workload_identity.source.type").build(config, context)
    return source
