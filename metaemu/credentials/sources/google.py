"""The ``google`` source: a developer's own Google credentials (application default credentials).

For local development: every file gcloud writes for ADC (``google_adc.SUPPORTED_TYPES``): a user
login (``authorized_user``), a service-account key, a workforce identity federation login
(``external_account_authorized_user``: an STS refresh token), or an ``impersonated_service_account``
file wrapping one of those three. Unlike every other kind this one does not produce a subject token
for STS: its credential *is* a Google access token, so ``GoogleSource`` also implements
``federated_token()`` and the pipeline uses that token where it would use the STS one: served as is
without a service account, or as the bearer for generateAccessToken / generateIdToken with one.

An impersonated file's chain (target and delegates) is read once, at assembly, and offered through
``impersonation()``: the pipeline impersonates that account through metaemu's own IAM Credentials
client (so ``endpoints.iam_credentials``, the caller's scopes and generateIdToken all apply; the
URL's host in the file is not used) and serves its email. A refresh that finds another chain in the
file refuses (restart to serve the new account); the refresh itself is of the inner credentials.

google-auth does the OAuth refresh, in a worker thread (its transport is blocking ``requests``),
with its own ``Credentials`` object built per refresh, so concurrent refreshes share nothing. Failures
become ``UpstreamError`` (service ``oauth``) carrying the token endpoint's status and error body, or
``SourceError`` when the file is missing or unusable.

Not owned here: reading and classifying the file (``google_adc``), caching and refresh scheduling
(``metaemu.cache``), impersonation (``impersonation.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import google.auth.exceptions
import google.auth.external_account_authorized_user
import google.oauth2.credentials
import google.oauth2.service_account
import requests

from metaemu.credentials.impersonation import Impersonation
from metaemu.credentials.sources.google_adc import AdcFile, read_adc
from metaemu.credentials.tokens import ACCESS_TOKEN_TYPE, FederatedToken, SubjectToken
from metaemu.errors import ConfigError, CredentialError, SourceError, UpstreamError
from metaemu.metrics import Metrics
from metaemu.transport import DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from metaemu.clock import Clock
    from metaemu.credentials.sources import SourceContext

#: The scope gcloud's ADC consent grants and that IAM Credentials accepts from a caller
#: (iamcredentials discovery document); a user refresh token cannot be widened beyond it.
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
#: google-auth defaults to a 120 s timeout per token-endpoint call; a metadata client gives up after
#: a few seconds, so bound it like every other upstream call (transport.DEFAULT_TIMEOUT_S).
TOKEN_ENDPOINT_TIMEOUT_S = DEFAULT_TIMEOUT_S
#: Google OAuth access tokens last one hour; used only when the endpoint omits ``expires_in``.
DEFAULT_LIFETIME_S = 3600
#: Google access tokens last at most 12 h; a longer ``expires_in`` is garbage (as sts.MAX_EXPIRES_IN_S).
MAX_LIFETIME_S = 12 * 3600
#: The ``backend`` label of upstream metrics for the OAuth token endpoint.
BACKEND = "oauth"
#: gcloud writes ADC here (``CLOUDSDK_CONFIG`` overrides the directory), as google-auth looks it up.
GCLOUD_ADC_FILENAME = "application_default_credentials.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class GoogleSourceConfig:
    """``credentials_file`` None means the ADC lookup: ``GOOGLE_APPLICATION_CREDENTIALS``, then
    gcloud's well-known file. ``quota_project`` overrides the file's ``quota_project_id``.
    ``token_url`` replaces the OAuth token endpoint (a Private Service Connect endpoint, a local
    stand-in); None keeps the credentials' own: https://oauth2.googleapis.com/token for a user
    login, whose file's ``token_uri`` google-auth deliberately ignores, or a key's ``token_uri``."""

    credentials_file: Path | None = None
    quota_project: str | None = None
    token_url: str | None = None
    kind: Literal["google"] = "google"


def parse_config(raw: Mapping[str, Any], *, prefix: str, base_dir: Path) -> GoogleSourceConfig:
    known = {"type", "credentials_file", "quota_project", "token_url"}
    for key in raw:
        if key not in known:
            raise ConfigError(prefix + str(key), f"unknown key (known: {', '.join(sorted(known))})")
    path, quota, url = raw.get("credentials_file"), raw.get("quota_project"), raw.get("token_url")
    if path is not None and (not isinstance(path, str) or not path.strip()):
        raise ConfigError(prefix + "credentials_file", "must be a non-empty path")
    if quota is not None and (not isinstance(quota, str) or not quota.strip()):
        raise ConfigError(prefix + "quota_project", "must be a non-empty project ID")
    if url is not None and (not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url)):
        raise ConfigError(prefix + "token_url", f"must be an http(s) URL, got {url!r}")
    return GoogleSourceConfig(credentials_file=base_dir / path.strip() if path else None,
                              quota_project=quota.strip() if quota else None, token_url=url)


def build(config: GoogleSourceConfig, context: SourceContext) -> GoogleSource:
    # The ADC lookup reads the environment once, at assembly, as google.auth.default() would;
    # the file itself is re-read at every refresh (gcloud rewrites it on login).
    path = config.credentials_file or adc_path(os.environ)
    return GoogleSource(path=path, quota_project=config.quota_project, token_url=config.token_url,
                        clock=context.clock, metrics=context.metrics, impersonation=declared_impersonation(path))


def declared_impersonation(path: Path) -> Impersonation | None:
    """The chain an impersonated_service_account file at ``path`` names; None for any other file,
    and when it cannot be read now (the first refresh reports why)."""
    with contextlib.suppress(SourceError):
        return read_adc(path).impersonation
    return None


def adc_path(environ: Mapping[str, str]) -> Path:
    """Where google-auth finds application default credentials, without its GCE metadata fallback
    (SECURITY: that fallback would ask the metadata server — possibly this very metaemu)."""
    if environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return Path(environ["GOOGLE_APPLICATION_CREDENTIALS"])
    if environ.get("CLOUDSDK_CONFIG"):
        return Path(environ["CLOUDSDK_CONFIG"]) / GCLOUD_ADC_FILENAME
    if os.name == "nt" and environ.get("APPDATA"):
        return Path(environ["APPDATA"]) / "gcloud" / GCLOUD_ADC_FILENAME
    return Path.home() / ".config" / "gcloud" / GCLOUD_ADC_FILENAME


class GoogleSource:
    """Application default credentials as a source: ``federated_token()`` is the ADC access token
    (an impersonated file's source credentials' token); ``fetch()`` offers the same token as an RFC
    8693 ``access_token`` subject token; ``impersonation()`` the chain an impersonated file names."""

    kind = "google"

    def __init__(self, *, path: Path, quota_project: str | None, token_url: str | None, clock: Clock,
                 metrics: Metrics, impersonation: Impersonation | None = None) -> None:
        self._path = path
        self._quota_project = quota_project
        self._token_url = token_url
        self._clock = clock
        self._metrics = metrics
        self._impersonation = impersonation

    def impersonation(self) -> Impersonation | None:
        """The account (and delegates) the file impersonates, as read at assembly."""
        return self._impersonation

    async def fetch(self) -> SubjectToken:
        token = await self.federated_token()
        return SubjectToken(value=token.value, token_type=ACCESS_TOKEN_TYPE, expiry=token.expiry)

    async def federated_token(self) -> FederatedToken:
        """A freshly refreshed ADC access token (one OAuth call per invocation; callers cache).

        Raises ``UpstreamError`` (service ``oauth``) for token-endpoint failures, permanent on a
        denial such as ``invalid_grant`` (revoked login); ``SourceError`` when the file is missing
        or unusable. Safe to call concurrently: each call refreshes its own credentials object.
        """
        sent_at = self._clock.now()
        token, expiry, expires_in_s, quota_project = await asyncio.to_thread(self._refresh)
        # google-auth dates expiry from when the answer arrived; measured from before sending, it
        # errs early instead (the later of the two is never served).
        measured = sent_at + dt.timedelta(seconds=expires_in_s or DEFAULT_LIFETIME_S)
        expiry = min(expiry, measured) if expiry is not None else measured
        if expiry <= self._clock.now():
            raise SourceError(f"the token endpoint for {self._path} returned an already expired token")
        return FederatedToken(value=token, expiry=expiry, quota_project=quota_project)

    def _refresh(self) -> tuple[str, dt.datetime | None, int | None, str | None]:
        """Blocking: load the file, refresh over google-auth. Runs in a worker thread.
        Returns the token, google-auth's expiry (made aware), the answer's ``expires_in`` and the
        quota project (``quota_project``, else the file's ``quota_project_id``)."""
        credentials = self._load()
        request = _MeteredRequest(self._metrics)
        try:
            credentials.refresh(request)
        except google.auth.exceptions.TransportError as exc:
            raise UpstreamError(service=BACKEND, url=request.url or "token endpoint", status=0,
                                body=_cause(exc), retryable=True, message=_cause(exc)) from exc
        except (google.auth.exceptions.RefreshError, google.auth.exceptions.OAuthError) as exc:
            # OAuthError: google-auth's STS client (external_account_authorized_user) on a non-200.
            raise _refresh_failure(exc, request, self._path) from exc
        except (ValueError, TypeError, KeyError) as exc:
            # google-auth's STS client parses a 200 without checking it (json.loads, expires_in).
            raise SourceError(f"the token endpoint for {self._path} answered 200 with a malformed token "
                              f"response ({type(exc).__name__})") from None
        finally:
            request.close()
        token = credentials.token
        if not isinstance(token, str) or not token:
            raise SourceError(f"the token endpoint for {self._path} returned no access token")
        expiry = credentials.expiry  # naive UTC, as google-auth keeps it
        aware = expiry.replace(tzinfo=dt.UTC) if isinstance(expiry, dt.datetime) else None
        quota = credentials.quota_project_id
        return token, aware, _expires_in_s(request.body), quota if isinstance(quota, str) and quota else None

    def _load(self) -> Any:
        adc = read_adc(self._path)
        if adc.impersonation != self._impersonation:
            raise SourceError(
                f"{self._path} now impersonates {_describe(adc.impersonation)}, but metaemu serves "
                f"{_describe(self._impersonation)} as read at start: restart it to serve the new account",
                permanent=True)
        try:
            credentials = _credentials(adc)
        except (ValueError, KeyError, google.auth.exceptions.InvalidOperation) as exc:
            # google-auth's "not in the expected format" / "missing fields to refresh"
            raise SourceError(f"{self._path} is not a usable {adc.kind} credentials file: {exc}",
                              permanent=True) from None
        if self._quota_project:
            credentials = credentials.with_quota_project(self._quota_project)
        if self._token_url:
            credentials = credentials.with_token_uri(self._token_url)
        return credentials


def _credentials(adc: AdcFile) -> Any:
    """google-auth's credentials for ``adc``'s refreshable part, as ``google.auth.default`` would
    build them, asking a user or key for cloud-platform (what IAM Credentials accepts)."""
    if adc.kind == "authorized_user":
        return google.oauth2.credentials.Credentials.from_authorized_user_info(  # type: ignore[no-untyped-call]
            adc.info, scopes=[CLOUD_PLATFORM_SCOPE])
    if adc.kind == "service_account":
        return google.oauth2.service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            adc.info, scopes=[CLOUD_PLATFORM_SCOPE])
    # external_account_authorized_user: the STS refresh grant carries no scope; the login's apply.
    return google.auth.external_account_authorized_user.Credentials.from_info(adc.info)  # type: ignore[no-untyped-call]


def _describe(chain: Impersonation | None) -> str:
    if chain is None:
        return "no service account"
    via = f" via {', '.join(chain.delegates)}" if chain.delegates else ""
    return f"{chain.service_account}{via}"


class _MeteredRequest:
    """The transport google-auth refreshes through (its ``transport.Request`` contract: a callable
    returning ``status``, ``headers``, ``data``; ``TransportError`` when no response), over
    ``requests``, bounded by a timeout, recording the last response for error reporting and the
    upstream metrics.

    SECURITY: not google-auth's own requests adapter, which logs request bodies at DEBUG and hashes
    only some fields (a service-account JWT assertion, a bearer credential, goes out as is); and
    no proxy from the environment, as ``AiohttpClient`` (token requests carry secrets).
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._session = requests.Session()
        self._session.trust_env = False
        self.url: str | None = None
        self.status: int | None = None
        self.body: bytes = b""

    def __call__(self, url: str, method: str = "GET", body: bytes | None = None,
                 headers: Mapping[str, str] | None = None, timeout: float | None = None,
                 **kwargs: Any) -> _Response:
        self.url, self.status, self.body = url, None, b""
        started = time.perf_counter()
        try:
            response = self._session.request(method, url, data=body, headers=dict(headers or {}),
                                             timeout=TOKEN_ENDPOINT_TIMEOUT_S, allow_redirects=False)
        except requests.RequestException as exc:
            self._metrics.upstream_errors.labels(BACKEND, "0").inc()
            raise google.auth.exceptions.TransportError(exc) from exc  # type: ignore[no-untyped-call]
        finally:
            self._metrics.upstream_duration.labels(BACKEND).observe(time.perf_counter() - started)
        self.status, self.body = response.status_code, response.content
        if response.status_code >= 400:
            self._metrics.upstream_errors.labels(BACKEND, str(response.status_code)).inc()
        return _Response(status=response.status_code, headers=dict(response.headers), data=response.content)

    def close(self) -> None:
        self._session.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class _Response:
    """``google.auth.transport.Response``: what google-auth reads from an answer."""

    status: int
    headers: Mapping[str, str]
    data: bytes = field(repr=False)


def _refresh_failure(exc: Exception, request: _MeteredRequest, path: Path) -> CredentialError:
    retryable = bool(getattr(exc, "retryable", False))
    if request.status is None or request.status < 400:
        # No error answer to report (google-auth refused a 200, or never sent). Only its message:
        # the exception's second argument is the response body, which may hold tokens.
        words = exc.args[0] if exc.args and isinstance(exc.args[0], str) else type(exc).__name__
        return SourceError(f"cannot refresh the credentials in {path}: {words}", permanent=not retryable)
    try:
        body: Any = json.loads(request.body)
    except ValueError:
        body = request.body.decode("utf-8", errors="replace")
    return UpstreamError(service=BACKEND, url=request.url or "token endpoint", status=request.status,
                         body=body, retryable=retryable or request.status >= 500 or request.status == 429)


def _expires_in_s(body: bytes) -> int | None:
    """``expires_in`` of a token answer (a number or numeric string, RFC 6749 §5.1), if sane."""
    try:
        value = json.loads(body).get("expires_in")
        seconds = int(value)
    except (ValueError, TypeError, AttributeError, OverflowError):
        return None
    return seconds if 0 < seconds <= MAX_LIFETIME_S else None


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}"
