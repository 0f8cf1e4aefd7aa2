"""The ``google`` source: a developer's own Google credentials (application default credentials).

For local development: gcloud's ``authorized_user`` ADC file (``gcloud auth application-default
login``) or a service-account key. Unlike every other kind this one does not produce a subject token
for STS: its credential *is* a Google access token, so ``GoogleSource`` also implements
``federated_token()`` and the pipeline uses that token where it would use the STS one: served as is
without ``service_account``, or as the bearer for generateAccessToken / generateIdToken with it.

google-auth does the OAuth refresh, in a worker thread (its transport is blocking ``requests``),
with its own ``Credentials`` object built per refresh, so concurrent refreshes share nothing. Failures
become ``UpstreamError`` (service ``oauth``) carrying the token endpoint's status and error body, or
``SourceError`` when the file is missing or unusable.

Not owned here: caching and refresh scheduling (``metaemu.cache``), impersonation
(``impersonation.py``).
"""

from __future__ import annotations

import asyncio
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
import google.oauth2.credentials
import google.oauth2.service_account
import requests

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
#: An ADC file is ~2 KiB (a service-account key with its PEM); anything far larger is refused unread.
MAX_CREDENTIALS_FILE_BYTES = 64 * 1024
#: The ``backend`` label of upstream metrics for the OAuth token endpoint.
BACKEND = "oauth"
#: gcloud writes ADC here (``CLOUDSDK_CONFIG`` overrides the directory), as google-auth looks it up.
GCLOUD_ADC_FILENAME = "application_default_credentials.json"
_SUPPORTED_TYPES = ("authorized_user", "service_account")


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
                        clock=context.clock, metrics=context.metrics)


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
    """Application default credentials as a source: ``federated_token()`` is the ADC access token;
    ``fetch()`` offers the same token as an RFC 8693 ``access_token`` subject token."""

    kind = "google"

    def __init__(self, *, path: Path, quota_project: str | None, token_url: str | None, clock: Clock,
                 metrics: Metrics) -> None:
        self._path = path
        self._quota_project = quota_project
        self._token_url = token_url
        self._clock = clock
        self._metrics = metrics

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
        except google.auth.exceptions.RefreshError as exc:
            raise _refresh_failure(exc, request, self._path) from exc
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
        info = _read_json(self._path)
        kind = info.get("type")
        try:
            if kind == "authorized_user":
                credentials = google.oauth2.credentials.Credentials.from_authorized_user_info(  # type: ignore[no-untyped-call]
                    info, scopes=[CLOUD_PLATFORM_SCOPE])
            elif kind == "service_account":
                credentials = google.oauth2.service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                    info, scopes=[CLOUD_PLATFORM_SCOPE])
            else:
                raise SourceError(
                    f"{self._path} holds credentials of type {kind!r}; the google source takes "
                    f"{' or '.join(_SUPPORTED_TYPES)} (for an external_account file use --credential-config; "
                    "to impersonate, set workload_identity.service_account)", permanent=True)
        except (ValueError, KeyError) as exc:  # google-auth's "not in the expected format"
            raise SourceError(f"{self._path} is not a usable {kind} credentials file: {exc}",
                              permanent=True) from None
        if self._quota_project:
            credentials = credentials.with_quota_project(self._quota_project)
        if self._token_url:
            credentials = credentials.with_token_uri(self._token_url)
        return credentials


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CREDENTIALS_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SourceError(f"no Google credentials at {path}: run `gcloud auth application-default login`, "
                          "or set workload_identity.source.credentials_file or GOOGLE_APPLICATION_CREDENTIALS",
                          permanent=True) from None
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}", permanent=True) from None
    if len(data) > MAX_CREDENTIALS_FILE_BYTES:
        raise SourceError(f"{path} is larger than {MAX_CREDENTIALS_FILE_BYTES} bytes", permanent=True)
    try:
        info = json.loads(data)
    except ValueError:
        raise SourceError(f"{path} is not JSON", permanent=True) from None
    if not isinstance(info, dict):
        raise SourceError(f"{path} does not hold a JSON object", permanent=True)
    return info
