"""``credential_source`` with ``environment_id: "aws1"`` of a Google ``external_account`` file: the
``creds.json`` that ``gcloud iam workload-identity-pools create-cred-config --aws`` writes, with the
same semantics as google-auth's default AWS supplier (``google/auth/aws.py``).

- Credentials: ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``) when set,
  else IMDS: the role name from ``url``, then ``url/<role>``.
- Region: ``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else ``region_url`` (an availability zone,
  whose trailing letter is dropped); resolved once, as google-auth does.
- With ``imdsv2_session_token_url`` every IMDS call carries an IMDSv2 session token (one ``PUT`` per
  fetch); without it, IMDSv1.

IMDS is plain HTTP on a link-local address, so it goes through the pipeline's ``HttpClient`` (async,
no thread). Not owned here: signing (``aws_sigv4``), the botocore-chain source (``aws``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from metaemu.clock import Clock
from metaemu.credentials.sources.aws_sigv4 import AwsCredentials, sign_caller_identity, validate_verification_url
from metaemu.credentials.tokens import AWS_TOKEN_TYPE, SubjectToken
from metaemu.errors import ConfigError, SourceError
from metaemu.metrics import Metrics
from metaemu.transport import HttpClient, HttpRequest, TransportFailure

#: IMDS answers in milliseconds from the instance. 2 s bounds a pod that cannot reach it (EKS sets
#: the IMDSv2 hop limit to 1, so packets from a pod network are dropped, not refused).
IMDS_TIMEOUT_S = 2.0
#: google-auth asks for a 300 s IMDSv2 session (``_IMDSV2_SESSION_TOKEN_TTL_SECONDS``); one fetch
#: needs it for a few requests only.
IMDSV2_SESSION_TTL_S = 300
_ENVIRONMENT_ID = re.compile(r"^aws(\d+)$")
_KNOWN = {"environment_id", "region_url", "url", "imdsv2_session_token_url", "regional_cred_verification_url"}
_HINT = ("; on EKS, IMDS is unreachable from pods (hop limit 1): use IRSA or EKS Pod Identity with "
         "source type 'aws' instead")


@dataclass(frozen=True, slots=True, kw_only=True)
class AwsImdsSourceConfig:
    """The ``aws1`` credential source; URLs as written in the credential configuration."""

    #: ``url``: lists the instance profile role; ``<url>/<role>`` returns its credentials.
    credentials_url: str | None = None
    region_url: str | None = None
    session_token_url: str | None = None
    verification_url: str
    kind: Literal["aws"] = "aws"


def parse_imds_source(raw: Mapping[str, Any], *, token_type: str, prefix: str) -> AwsImdsSourceConfig:
    """Validate an ``aws1`` ``credential_source``; ``ConfigError`` names the key (``prefix`` + key)."""
    for key in raw:
        if key not in _KNOWN:
            raise ConfigError(prefix + str(key), f"unknown key (known: {', '.join(sorted(_KNOWN))})")
    env_id = raw.get("environment_id")
    match = _ENVIRONMENT_ID.match(env_id) if isinstance(env_id, str) else None
    if match is None:
        raise ConfigError(prefix + "environment_id", f"expected 'aws1', got {env_id!r}")
    if match.group(1) != "1":
        raise ConfigError(prefix + "environment_id", f"aws version {match.group(1)!r} is not supported (only 1)")
    if token_type != AWS_TOKEN_TYPE:
        raise ConfigError(prefix + "environment_id", f"an AWS credential source needs subject_token_type "
                          f"{AWS_TOKEN_TYPE!r}, not {token_type!r}")
    verification = raw.get("regional_cred_verification_url")
    if not isinstance(verification, str) or not verification:
        raise ConfigError(prefix + "regional_cred_verification_url", "required for environment_id aws1")
    urls = {key: _http_url(raw, key, prefix) for key in ("url", "region_url", "imdsv2_session_token_url")}
    return AwsImdsSourceConfig(
        credentials_url=urls["url"], region_url=urls["region_url"], session_token_url=urls["imdsv2_session_token_url"],
        verification_url=validate_verification_url(verification, prefix + "regional_cred_verification_url"))


class AwsImdsSource:
    """Signs GetCallerIdentity with environment or EC2 instance-profile credentials (``aws1``)."""

    kind = "aws"

    def __init__(self, config: AwsImdsSourceConfig, *, clock: Clock, http: HttpClient, metrics: Metrics,
                 audience: str, environ: Mapping[str, str]) -> None:
        self._config = config
        self._clock = clock
        self._http = http
        self._metrics = metrics
        self._audience = audience
        self._environ = dict(environ)
        self._region: str | None = None

    async def fetch(self) -> SubjectToken:
        session = _ImdsSession(http=self._http, metrics=self._metrics, token_url=self._config.session_token_url)
        region = self._region or await self._resolve_region(session)
        credentials = self._env_credentials() or await self._imds_credentials(session)
        return sign_caller_identity(credentials, region=region, url_template=self._config.verification_url,
                                    target_resource=self._audience, now=self._clock.now())

    async def _resolve_region(self, session: _ImdsSession) -> str:
        region = self._environ.get("AWS_REGION") or self._environ.get("AWS_DEFAULT_REGION")
        if not region:
            if not self._config.region_url:
                raise SourceError("cannot determine the AWS region: set AWS_REGION or AWS_DEFAULT_REGION, or "
                                  "region_url in the credential configuration", permanent=True)
            zone = (await session.get(self._config.region_url, "region")).strip()
            # region_url names an availability zone (us-east-2b); google-auth drops its last character.
            region = zone[:-1] if zone[-1:].isalpha() else zone
        if not region:
            raise SourceError(f"the AWS instance metadata service returned no region at {self._config.region_url}")
        self._region = region
        return region

    def _env_credentials(self) -> AwsCredentials | None:
        """Environment keys take precedence over IMDS, as in google-auth."""
        env = self._environ
        key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret:
            return None
        return AwsCredentials(access_key_id=key_id, secret_access_key=secret,
                              session_token=env.get("AWS_SESSION_TOKEN") or None)

    async def _imds_credentials(self, session: _ImdsSession) -> AwsCredentials:
        url = self._config.credentials_url
        if not url:
            raise SourceError("no AWS credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are not set and the "
                              "credential configuration has no IMDS 'url'", permanent=True)
        roles = (await session.get(url, "role name")).split()
        if not roles:
            raise SourceError(f"the AWS instance metadata service lists no instance profile role at {url}")
        body = await session.get(f"{url.rstrip('/')}/{roles[0]}", "role credentials")
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        fields = [data.get(k) if isinstance(data, dict) else None for k in ("AccessKeyId", "SecretAccessKey")]
        if not all(isinstance(f, str) and f for f in fields):
            # SECURITY: the body may hold a secret; say what is missing, never echo it.
            raise SourceError(f"the AWS instance metadata service returned no usable credentials for role "
                              f"{roles[0]!r} (expected JSON with AccessKeyId and SecretAccessKey)")
        token = data.get("Token") if isinstance(data, dict) else None
        return AwsCredentials(access_key_id=str(fields[0]), secret_access_key=str(fields[1]),
                              session_token=token if isinstance(token, str) and token else None)


class _ImdsSession:
    """The IMDS requests of one fetch, sharing one IMDSv2 session token (requested on first use)."""

    def __init__(self, *, http: HttpClient, metrics: Metrics, token_url: str | None) -> None:
        self._http = http
        self._metrics = metrics
        self._token_url = token_url
        self._token: str | None = None

    async def get(self, url: str, what: str) -> str:
        headers: dict[str, str] = {}
        token_url = self._token_url
        if token_url:
            if self._token is None:
                self._token = (await self._send(HttpRequest(
                    method="PUT", url=token_url, timeout_s=IMDS_TIMEOUT_S,
                    headers={"X-aws-ec2-metadata-token-ttl-seconds": str(IMDSV2_SESSION_TTL_S)}),
                    "IMDSv2 session token")).strip()
            headers["X-aws-ec2-metadata-token"] = self._token
        return await self._send(HttpRequest(method="GET", url=url, headers=headers, timeout_s=IMDS_TIMEOUT_S), what)

    async def _send(self, request: HttpRequest, what: str) -> str:
        try:
            response = await self._http.send(request)
        except TransportFailure as exc:
            raise self._failure(request.url, what, status=0, detail=f"unreachable: {exc.detail}") from None
        if response.status != 200:
            # IMDS error bodies are short HTML/text ("Not Found"); credentials come only with a 200.
            excerpt = " ".join(response.body.decode("utf-8", errors="replace").split())[:200]
            raise self._failure(request.url, what, status=response.status,
                                detail=f"HTTP {response.status} {excerpt}".strip())
        return response.body.decode("utf-8", errors="replace")

    def _failure(self, url: str, what: str, *, status: int, detail: str) -> SourceError:
        self._metrics.upstream_errors.labels("aws_imds", str(status)).inc()
        hint = _HINT if status == 0 else ""
        return SourceError(f"the AWS instance metadata service failed to return the {what} ({url}): {detail}{hint}")


def _http_url(raw: Mapping[str, Any], key: str, prefix: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(prefix + key, f"must be an http(s) URL, got {value!r}")
    return str(value)
