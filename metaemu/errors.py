"""Every error metaemu raises on purpose, in one hierarchy.

::

    MetaemuError
    ├── ConfigError            a configuration key is missing or invalid (names the key)
    └── CredentialError        no credential could be produced for a request
        ├── SourceError        the subject-token source failed (file missing, not a JWT, ...)
        ├── UpstreamError      Google STS / IAM Credentials (or another upstream) said no or failed
        └── NotConfiguredError the request needs something the configuration does not provide

A ``CredentialError`` says whether it is *permanent* (a denial that retrying will not fix soon:
STS ``invalid_grant``, IAM 403) and carries a short, token-free ``reason`` that is safe to put in
an HTTP response body and a log line. Callers branch on attributes, never on message text.
"""

from __future__ import annotations

import json
from typing import Any

#: Upstream bodies are truncated to this many characters in logs and reasons: enough for a
#: Google error envelope (ERR-06 bodies are ~300 chars), bounded against a hostile upstream.
BODY_EXCERPT_CHARS = 600


class MetaemuError(Exception):
    """Base of everything metaemu raises deliberately."""


class ConfigError(MetaemuError):
    """A configuration key is missing or invalid.

    ``key`` is the dotted path of the offending key (``workload_identity.audience``).
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class CredentialError(MetaemuError):
    """No credential could be produced.

    ``permanent`` is True for denials (retrying right away will not help, answer 403);
    False for transient failures (answer 503 and retry with backoff).
    """

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


class SourceError(CredentialError):
    """The subject-token source could not produce a token."""


class NotConfiguredError(CredentialError):
    """The request needs something the configuration lacks (e.g. an ID token without a
    service account to impersonate, GKE-06)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, permanent=True)


class UpstreamError(CredentialError):
    """An upstream HTTP service failed or refused.

    Keeps what upstream said: ``service`` (``sts``, ``iam``, ...), ``url``, HTTP ``status``
    (0 when no response arrived: connection error or timeout), the decoded ``body`` (JSON when it
    parsed, else text), and ``retryable``. ``error_code`` is the machine-readable code from either
    envelope: RFC 6749 ``error`` (STS) or AIP-193 ``error.status`` (IAM).
    """

    def __init__(
        self,
        *,
        service: str,
        url: str,
        status: int,
        body: Any,
        retryable: bool,
        message: str | None = None,
    ) -> None:
        self.service = service
        self.url = url
        self.status = status
        self.body = body
        self.retryable = retryable
        self.error_code = _error_code(body)
        detail = message or _error_message(body) or f"HTTP {status}"
        where = f"{service} returned {status}" if status else f"{service} unreachable"
        super().__init__(f"{where}: {_excerpt(detail)}", permanent=not retryable)


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    if len(text) <= BODY_EXCERPT_CHARS:
        return text
    return text[:BODY_EXCERPT_CHARS] + "…(truncated)"


def _error_code(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    err = body.get("error")
    if isinstance(err, str):  # RFC 6749 (STS, OAuth issuers)
        return err
    if isinstance(err, dict) and isinstance(err.get("status"), str):  # AIP-193 (IAM)
        return str(err["status"])
    return None


def _error_message(body: Any) -> str | None:
    """The human part of an RFC 6749, AIP-193 or ServiceAuthCentral error body."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        parts = [str(body[k]) for k in ("error", "error_description") if isinstance(body.get(k), str)]
        messages = body.get("messages")
        if isinstance(messages, list):
            parts.extend(str(m) for m in messages)
        if parts:
            return ": ".join(parts)
        return json.dumps(body)[:BODY_EXCERPT_CHARS]
    if isinstance(body, str) and body.strip():
        return body
    return None
