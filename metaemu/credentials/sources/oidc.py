"""Subject tokens from an OAuth 2.0 / OIDC token endpoint such as ServiceAuthCentral (upstream.md §7).

Owns the ``oidc`` source kind: its configuration (``parse_config``), the form-encoded token request
(RFC 6749 §4.4 ``client_credentials``, or RFC 7523 ``jwt-bearer`` with an assertion such as a
projected Kubernetes token), parsing ``{"access_token", "token_type", "expires_in"}`` (UP-17), and a
per-source cache of the issuer's JWT, which is the STS subject token (``…:token-type:jwt``) until
shortly before its own expiry. Concurrent fetches share one request (single-flight).

The client secret and the assertion are read from files on every request (rotation needs no
restart), in a worker thread, and never appear in logs, reprs or error text. Error bodies of both
shapes, RFC 6749 (``error``, ``error_description``) and ServiceAuthCentral's (``error``,
``messages``, ``details``, ``status``), become the ``UpstreamError`` reason, so they reach logs,
metrics (``metaemu_upstream_errors_total{backend="oidc"}``) and the 403/503 text.

Not owned here: the STS exchange that follows (``credentials/sts.py``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from metaemu.clock import Clock
from metaemu.credentials.sources.file import live_jwt_expiry, read_bounded
from metaemu.credentials.tokens import JWT_TOKEN_TYPE, SubjectToken, jwt_expiry
from metaemu.credentials.upstream import UpstreamCaller
from metaemu.errors import BODY_EXCERPT_CHARS, ConfigError, CredentialError, SourceError, UpstreamError
from metaemu.metrics import Metrics
from metaemu.transport import HttpClient, HttpRequest

if TYPE_CHECKING:
    from metaemu.credentials.sources import SourceContext

log = logging.getLogger(__name__)

#: The label of this source in logs, metrics (``backend``) and ``UpstreamError.service``.
BACKEND = "oidc"
GrantType = Literal["client_credentials", "jwt_bearer"]
#: Config value -> the RFC 6749 §4.4 / RFC 7523 §2.1 ``grant_type`` sent (upstream.md §7).
GRANT_TYPES: Mapping[str, str] = {"client_credentials": "client_credentials",
                                  "jwt_bearer": "urn:ietf:params:oauth:grant-type:jwt-bearer"}
#: A cached token is replaced when less than this is left: STS must still find it unexpired after a
#: network round trip and clock skew between issuer, metaemu and Google (the fake STS allows 10 s).
MIN_REFRESH_MARGIN_S = 60.0
#: ...or less than this share of its lifetime, whichever margin is larger (errs early, like
#: kubelet's 80 % rotation of projected tokens).
REFRESH_MARGIN_FRACTION = 0.1
#: Secrets and assertions are < 4 KiB (a projected token ~1 KiB); larger files are refused unread.
MAX_CREDENTIAL_FILE_BYTES = 64 * 1024
#: Statuses worth retrying soon (RFC 9110 timeouts and throttling, plus 5xx). Other 4xx are
#: denials (``invalid_client``, ``access_denied``, ``invalid_grant``): permanent.
_TRANSIENT_STATUSES = frozenset({0, 408, 425, 429})
_CONFIG_KEYS = frozenset({"type", "token_url", "client_id", "grant_type", "client_secret_file", "assertion_file",
                          "audience", "scope"})
_REDACTED = "[REDACTED]"


@dataclass(frozen=True, slots=True, kw_only=True)
class OidcSourceConfig:
    """``workload_identity.source`` with ``type: oidc``. Paths only: secrets never enter config."""

    token_url: str
    client_id: str
    grant_type: GrantType
    client_secret_file: Path | None = None
    assertion_file: Path | None = None
    #: The ``audience`` form field; None means the workload identity provider's audience.
    audience: str | None = None
    #: Space-delimited scopes (RFC 6749 §3.3); None sends no ``scope``.
    scope: str | None = None
    kind: Literal["oidc"] = "oidc"

    def __post_init__(self) -> None:
        if self.grant_type not in GRANT_TYPES:
            raise ConfigError("grant_type", f"must be one of {', '.join(GRANT_TYPES)}")
        needed, other = (("client_secret_file", "assertion_file") if self.grant_type == "client_credentials"
                         else ("assertion_file", "client_secret_file"))
        if getattr(self, needed) is None:
            raise ConfigError(needed, f"required with grant_type {self.grant_type}")
        if getattr(self, other) is not None:
            raise ConfigError(other, f"not used with grant_type {self.grant_type}; remove it")


def parse_config(raw: Mapping[str, Any], *, prefix: str, base_dir: Path) -> OidcSourceConfig:
    """``OidcSourceConfig`` from the YAML mapping; ``ConfigError`` names the offending key."""
    for key in raw:
        if key not in _CONFIG_KEYS:
            raise ConfigError(prefix + str(key), f"unknown key (known: {', '.join(sorted(_CONFIG_KEYS))})")
    token_url = _required_string(raw, "token_url", prefix)
    if not token_url.startswith(("https://", "http://")):
        raise ConfigError(prefix + "token_url", "must be an http(s) URL")
    grant = _required_string(raw, "grant_type", prefix)
    if grant not in GRANT_TYPES:
        raise ConfigError(prefix + "grant_type", f"must be one of {', '.join(GRANT_TYPES)}, got {grant!r}")
    scope = raw.get("scope")
    if isinstance(scope, list) and all(isinstance(s, str) for s in scope):
        scope = " ".join(scope)
    elif scope is not None and not isinstance(scope, str):
        raise ConfigError(prefix + "scope", "must be a string or a list of strings")
    secret_file, assertion_file = (_string(raw, k, prefix) for k in ("client_secret_file", "assertion_file"))
    client_id = _required_string(raw, "client_id", prefix)
    audience = _string(raw, "audience", prefix)
    try:
        return OidcSourceConfig(token_url=token_url, client_id=client_id,
                                grant_type=grant,  # type: ignore[arg-type]  # checked above
                                audience=audience, scope=scope or None,
                                client_secret_file=base_dir / secret_file if secret_file else None,
                                assertion_file=base_dir / assertion_file if assertion_file else None)
    except ConfigError as exc:
        raise ConfigError(prefix + exc.key, exc.problem) from None


def build(config: OidcSourceConfig, context: SourceContext) -> OidcSource:
    return OidcSource(config, clock=context.clock, http=context.http, metrics=context.metrics,
                      audience=config.audience or context.audience)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Cached:
    token: SubjectToken
    refresh_at: dt.datetime


class OidcSource:
    """The issuer's access token as the subject token, cached until shortly before its expiry.

    ``fetch`` is safe to call concurrently: one request is in flight at a time, and callers that
    waited on a request that failed get its error instead of sending another.
    """

    kind = BACKEND

    def __init__(self, config: OidcSourceConfig, *, clock: Clock, http: HttpClient, metrics: Metrics,
                 audience: str) -> None:
        self._config = config
        self._clock = clock
        self._caller = UpstreamCaller(http=http, metrics=metrics, backend=BACKEND)
        self._audience = audience
        self._cached: _Cached | None = None
        self._lock = asyncio.Lock()
        self._completed = 0  # requests finished, so a waiter can tell that the one it awaited ended
        self._last_error: CredentialError | None = None

    def __repr__(self) -> str:  # SECURITY: no secret, assertion or token, only where they come from.
        c = self._config
        return f"OidcSource(token_url={c.token_url!r}, client_id={c.client_id!r}, grant_type={c.grant_type!r})"

    async def fetch(self) -> SubjectToken:
        """The cached token while fresh, else a new one; raises ``SourceError`` / ``UpstreamError``."""
        if (token := self._fresh()) is not None:
            return token
        completed = self._completed
        async with self._lock:
            if (token := self._fresh()) is not None:
                return token
            if completed != self._completed and self._last_error is not None:
                raise self._last_error  # the request we queued behind just failed: share its answer
            try:
                cached = await self._request_token()
            except CredentialError as exc:
                self._last_error = exc
                raise
            finally:
                self._completed += 1
            self._last_error = None
            if cached.refresh_at > self._clock.now():
                self._cached = cached
            return cached.token

    def _fresh(self) -> SubjectToken | None:
        cached = self._cached
        return cached.token if cached is not None and self._clock.now() < cached.refresh_at else None

    async def _request_token(self) -> _Cached:
        c = self._config
        path = c.client_secret_file or c.assertion_file  # exactly one is set (__post_init__)
        if path is None:
            raise ConfigError("client_secret_file", "required")
        if c.grant_type == "client_credentials":
            credential_field, credential = "client_secret", await _read_credential(path, "client secret file")
        else:
            credential_field, credential = "assertion", await _read_credential(path, "assertion file")
            self._check_assertion(credential, path)
        fields = {"grant_type": GRANT_TYPES[c.grant_type], "client_id": c.client_id,
                  credential_field: credential, "audience": self._audience}
        if c.scope:
            fields["scope"] = c.scope
        request = HttpRequest.form(c.token_url, fields, headers={"Accept": "application/json"})
        now = self._clock.now()  # before sending, so the computed expiry errs early
        try:
            body = await self._caller.call_json(request)
        except UpstreamError as exc:
            raise _classified(exc, secret=credential) from None
        return self._parse(body, now=now)

    def _check_assertion(self, assertion: str, path: Path) -> None:
        """Refuse an assertion that is not a JWT or has expired before the issuer does: the
        message can then name the file (kubelet may have stopped rotating it)."""
        live_jwt_expiry(assertion, now=self._clock.now(), path=path, what="assertion file")

    def _parse(self, body: Mapping[str, Any], *, now: dt.datetime) -> _Cached:
        """UP-17: ``{"access_token", "token_type", "expires_in"}``; the JWT's ``exp`` bounds the expiry."""
        where = self._config.token_url
        value = body.get("access_token")
        if not isinstance(value, str) or not value:
            raise SourceError(f"{where} answered without an access_token (keys: {', '.join(sorted(body))})")
        try:
            expiry = jwt_expiry(value)
        except ValueError as exc:
            raise SourceError(f"{where} issued an access_token that is not a JWT ({exc}); Google STS accepts "
                              "only JWTs from an OIDC provider", permanent=True) from None
        expires_in = _expires_in(body.get("expires_in"))
        if expires_in is not None:
            expiry = min(expiry, now + dt.timedelta(seconds=expires_in))
        lifetime_s = (expiry - now).total_seconds()
        if lifetime_s <= 0:
            raise SourceError(f"{where} issued a token that expired at {expiry:%Y-%m-%dT%H:%M:%SZ}; "
                              "is its clock or metaemu's wrong?")
        margin_s = max(MIN_REFRESH_MARGIN_S, REFRESH_MARGIN_FRACTION * lifetime_s)
        log.debug("oidc subject token obtained", extra={"client_id": self._config.client_id,
                                                        "lifetime_s": int(lifetime_s)})
        return _Cached(token=SubjectToken(value=value, token_type=JWT_TOKEN_TYPE, expiry=expiry),
                       refresh_at=expiry - dt.timedelta(seconds=margin_s))


def _expires_in(value: Any) -> float | None:
    """RFC 6749 §5.1 ``expires_in`` (recommended, so optional); some issuers send a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _classified(exc: UpstreamError, *, secret: str) -> UpstreamError:
    """``exc`` with token-endpoint semantics: 4xx denials are permanent (``UpstreamCaller`` retries
    401 because a Google bearer may expire; here 401 means bad client credentials), the reason
    names RFC 6749 or SAC fields, and the secret is scrubbed should the endpoint echo it."""
    if 200 <= exc.status < 300:
        return exc  # a 2xx that was not JSON: keep the caller's message
    retryable = exc.status in _TRANSIENT_STATUSES or exc.status >= 500
    body = _scrub(exc.body, secret)
    message = _oauth_error_message(body)
    return UpstreamError(service=exc.service, url=exc.url, status=exc.status, body=body, retryable=retryable,
                         message=message)


def _oauth_error_message(body: Any) -> str | None:
    """``error: description`` from RFC 6749 (``error_description``) or SAC (``messages``,
    ``details``) bodies; the raw text for anything else."""
    if isinstance(body, str):
        return body.strip()[:BODY_EXCERPT_CHARS] or None
    if not isinstance(body, dict):
        return None
    parts = [str(body["error"])] if isinstance(body.get("error"), str) else []
    if isinstance(body.get("error_description"), str):
        parts.append(body["error_description"])
    messages = body.get("messages")
    if isinstance(messages, list):
        parts.extend(str(m) for m in messages)
    if isinstance(body.get("details"), str) and body["details"] not in parts:
        parts.append(f"({body['details']})")
    return ": ".join(parts) or None


def _scrub(body: Any, secret: str) -> Any:
    """``body`` with every occurrence of ``secret`` replaced (SECURITY: an endpoint that echoes
    request fields must not put the client secret into logs or the 403 text)."""
    if not secret:
        return body
    if isinstance(body, str):
        return body.replace(secret, _REDACTED)
    if isinstance(body, dict):
        return {k: _scrub(v, secret) for k, v in body.items()}
    if isinstance(body, list):
        return [_scrub(v, secret) for v in body]
    return body


async def _read_credential(path: Path, what: str) -> str:
    """The stripped content of a secret or assertion file, read off the event loop.
    ``SourceError`` names the file, never its content."""
    return await asyncio.to_thread(_read_bounded, path, what)


def _read_bounded(path: Path, what: str) -> str:
    text = read_bounded(path, what=what, limit=MAX_CREDENTIAL_FILE_BYTES).strip()
    if not text:
        raise SourceError(f"{what} {path} is empty")
    return text


def _string(raw: Mapping[str, Any], key: str, prefix: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(prefix + key, f"must be a string, got {type(value).__name__}")
    return value.strip() or None


def _required_string(raw: Mapping[str, Any], key: str, prefix: str) -> str:
    value = _string(raw, key, prefix)
    if value is None:
        raise ConfigError(prefix + key, "required")
    return value
