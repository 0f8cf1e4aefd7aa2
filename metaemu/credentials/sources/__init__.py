"""Subject-token sources: where the workload's own identity comes from.

A ``SubjectTokenSource`` produces a ``SubjectToken`` (value, RFC 8693 type, expiry when known) on
each call; the pipeline calls it once per STS exchange and never branches on the kind. One module per
kind; ``build_source`` is the only place that knows the kinds.
"""

from __future__ import annotations

from typing import Protocol

from metaemu.clock import Clock
from metaemu.credentials.sources.config import FileSourceConfig, KubernetesSourceConfig, SourceConfig
from metaemu.credentials.tokens import SubjectToken


class SubjectTokenSource(Protocol):
    #: A short, bounded label for logs and metrics (``kubernetes``, ``file``, ...).
    kind: str

    async def fetch(self) -> SubjectToken:
        """A fresh subject token; raises ``SourceError`` (never returns a stale or empty one)."""


def build_source(config: SourceConfig, *, clock: Clock) -> SubjectTokenSource:
    from metaemu.credentials.sources.file import FileSource

    match config:
        case KubernetesSourceConfig():
            return FileSource.kubernetes(config.token_file, clock=clock)
        case FileSourceConfig():
            return FileSource(config, clock=clock)
