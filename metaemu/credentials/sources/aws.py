"""The ``aws`` subject-token source: EKS / EC2 workloads federating into Google Cloud (issue #3).

Owns the ``workload_identity.source`` keys of ``type: aws``, the AWS credentials (botocore's
credential chain, always in a worker thread: IRSA, EKS Pod Identity, IMDSv2, environment keys) and
the region (configuration → ``AWS_REGION`` → ``AWS_DEFAULT_REGION`` → IMDS, upstream.md §10.3 item 2).
Each fetch signs a fresh ``GetCallerIdentity`` (``aws_sigv4``). The ``external_account``
``environment_id: aws1`` form lives in ``aws_imds``; this module is the registry entry for both.

IRSA is built here rather than left to the chain so that ``sts_endpoint`` applies, the role session
name is stable (it ends up in the Google principal), and no IMDS call is ever needed: on EKS the pod
may not reach IMDS at all (hop limit 1).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import botocore.session
from botocore.config import Config as BotocoreConfig
from botocore.credentials import (
    AssumeRoleWithWebIdentityCredentialFetcher,
    ContainerProvider,
    Credentials,
    DeferredRefreshableCredentials,
)
from botocore.exceptions import BotoCoreError, ClientError
from botocore.utils import ContainerMetadataFetcher, FileWebIdentityTokenLoader, InstanceMetadataRegionFetcher

from metaemu.clock import Clock
from metaemu.credentials.sources import SourceContext, SubjectTokenSource
from metaemu.credentials.sources.aws_imds import (
    IMDS_TIMEOUT_S,
    AwsImdsSource,
    AwsImdsSourceConfig,
    parse_imds_source,
)
from metaemu.credentials.sources.aws_sigv4 import (
    DEFAULT_VERIFICATION_URL,
    AwsCredentials,
    sign_caller_identity,
    validate_verification_url,
)
from metaemu.credentials.tokens import SubjectToken
from metaemu.errors import ConfigError, SourceError
from metaemu.metrics import Metrics
from metaemu.transport import DEFAULT_TIMEOUT_S

log = logging.getLogger(__name__)

#: Session name for IRSA's AssumeRoleWithWebIdentity when neither the config nor
#: ``AWS_ROLE_SESSION_NAME`` names one. It is the last segment of the assumed-role ARN, which is
#: Google's default ``google.subject``; botocore's default (``botocore-session-<unix time>``) would
#: change the Google principal on every restart.
DEFAULT_ROLE_SESSION_NAME = "metaemu"
#: One attempt per AWS call: metaemu's refresher already retries with backoff and jitter, and
#: botocore's own retries (up to 5, with sleeps) would hold a refresh for tens of seconds.
_AWS_CALL = BotocoreConfig(retries={"total_max_attempts": 1}, connect_timeout=DEFAULT_TIMEOUT_S,
                           read_timeout=DEFAULT_TIMEOUT_S)
#: Two attempts at IMDS for the region, as the AWS SDKs make (botocore's default is one).
IMDS_ATTEMPTS = 2
#: A bounded ``backend`` metric label per botocore credential provider.
_BACKENDS: Mapping[str, str] = {"assume-role-with-web-identity": "aws_sts", "container-role": "aws_container",
                                "iam-role": "aws_imds", "env": "aws_env"}
_REGION = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+-\d+$")
_KEYS = {"type", "role_arn", "web_identity_token_file", "role_session_name", "region", "sts_endpoint",
         "regional_cred_verification_url"}
_NO_CREDENTIALS = ("no AWS credentials found: configure IRSA (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE, or "
                   "role_arn + web_identity_token_file), EKS Pod Identity (AWS_CONTAINER_CREDENTIALS_FULL_URI), "
                   "an EC2 instance profile (IMDS), or AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY")


@dataclass(frozen=True, slots=True, kw_only=True)
class AwsSourceConfig:
    """``workload_identity.source`` with ``type: aws``. Unset keys fall back to the AWS environment."""

    role_arn: str | None = None
    web_identity_token_file: Path | None = None
    role_session_name: str | None = None
    region: str | None = None
    #: AWS STS endpoint for IRSA's AssumeRoleWithWebIdentity (VPC endpoints, tests).
    sts_endpoint: str | None = None
    #: Where Google replays the signed GetCallerIdentity; ``{region}`` is filled in.
    verification_url: str = DEFAULT_VERIFICATION_URL
    kind: Literal["aws"] = "aws"

    def __post_init__(self) -> None:
        if self.region is not None and not _REGION.match(self.region):
            raise ConfigError("region", f"not an AWS region name: {self.region!r}")


def parse_config(raw: Mapping[str, Any], *, prefix: str, base_dir: Path) -> AwsSourceConfig:
    for key in raw:
        if key not in _KEYS:
            raise ConfigError(prefix + str(key), f"unknown key (known: {', '.join(sorted(_KEYS))})")
    values = {key: _opt_str(raw, key, prefix) for key in _KEYS - {"type"}}
    if (role := values["role_arn"]) is not None and not role.startswith("arn:"):
        raise ConfigError(prefix + "role_arn", f"not an IAM role ARN: {role!r}")
    if (endpoint := values["sts_endpoint"]) is not None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(prefix + "sts_endpoint", f"must be an http(s) URL, got {endpoint!r}")
    if (region := values["region"]) is not None and not _REGION.match(region):
        raise ConfigError(prefix + "region", f"not an AWS region name: {region!r}")
    url = values["regional_cred_verification_url"] or DEFAULT_VERIFICATION_URL
    token_file = values["web_identity_token_file"]
    return AwsSourceConfig(
        role_arn=role, web_identity_token_file=base_dir / token_file if token_file else None,
        role_session_name=values["role_session_name"], region=region, sts_endpoint=endpoint,
        verification_url=validate_verification_url(url, prefix + "regional_cred_verification_url"))


def parse_credential_source(raw: Mapping[str, Any], *, token_type: str, prefix: str,
                            base_dir: Path) -> AwsImdsSourceConfig:
    """``credential_source`` with ``environment_id: aws1`` (AIP-4117; see ``aws_imds``)."""
    return parse_imds_source(raw, token_type=token_type, prefix=prefix)


def build(config: AwsSourceConfig | AwsImdsSourceConfig, context: SourceContext) -> SubjectTokenSource:
    """The running source. Reads the process environment here, once (never at import)."""
    # SECURITY: botocore logs whole AWS responses, credentials included, at DEBUG.
    botocore_log = logging.getLogger("botocore")
    if botocore_log.level < logging.INFO:  # NOTSET included: it would inherit a DEBUG root
        botocore_log.setLevel(logging.INFO)
    environ = dict(os.environ)
    if isinstance(config, AwsImdsSourceConfig):
        return AwsImdsSource(config, clock=context.clock, http=context.http, metrics=context.metrics,
                             audience=context.audience, environ=environ)
    return AwsSource(config, clock=context.clock, metrics=context.metrics, audience=context.audience,
                     environ=environ)


class AwsSource:
    """Signs GetCallerIdentity with credentials from botocore's chain.

    ``environ`` is the AWS environment metaemu decides with (IRSA, region, STS endpoint, EKS Pod
    Identity); the rest of botocore's chain (environment keys, profiles, IMDS) reads the process
    environment itself. ``session_factory`` makes the botocore session the chain runs in. The
    botocore credentials object is created once and refreshes itself ahead of expiry; every blocking
    botocore call runs in a worker thread (UP-10, UP-20). Safe for concurrent ``fetch`` calls.
    """

    kind = "aws"

    def __init__(self, config: AwsSourceConfig, *, clock: Clock, metrics: Metrics, audience: str,
                 environ: Mapping[str, str],
                 session_factory: Callable[[], botocore.session.Session] = botocore.session.Session) -> None:
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._audience = audience
        self._environ = dict(environ)
        self._session_factory = session_factory
        self._lock = threading.Lock()
        self._credentials: Credentials | None = None
        self._region: str | None = None
        self._sts_endpoint: str | None = None
        #: botocore's name for where the credentials came from (``assume-role-with-web-identity``,
        #: ``container-role``, ``iam-role``, ``env``, ...); None until the first fetch found some.
        self.credential_method: str | None = None

    async def fetch(self) -> SubjectToken:
        region = self._region or await self._resolve_region()
        credentials = await asyncio.to_thread(self._frozen_credentials, region)
        return sign_caller_identity(credentials, region=region, url_template=self._config.verification_url,
                                    target_resource=self._audience, now=self._clock.now())

    async def _resolve_region(self) -> str:
        env = self._environ
        region = self._config.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if not region:
            region = await asyncio.to_thread(self._imds_region)
        if not region:
            raise SourceError("cannot determine the AWS region: set workload_identity.source.region, AWS_REGION "
                              "or AWS_DEFAULT_REGION (the instance metadata service gave none)")
        self._region = region
        return region

    def _imds_region(self) -> str | None:
        """The region from IMDS's availability zone (worker thread); None when IMDS is unreachable."""
        env = self._environ
        fetcher = InstanceMetadataRegionFetcher(
            timeout=IMDS_TIMEOUT_S, num_attempts=IMDS_ATTEMPTS, env=env,
            config={"ec2_metadata_service_endpoint": env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT"),
                    "ec2_metadata_service_endpoint_mode": env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE"),
                    "ec2_metadata_v1_disabled": env.get("AWS_EC2_METADATA_V1_DISABLED", "").lower() == "true"})
        region = fetcher.retrieve_region()
        return str(region) if region else None

    # -- worker thread ----------------------------------------------------------------------------

    def _frozen_credentials(self, region: str) -> AwsCredentials:
        """Current credentials (worker thread): raises ``SourceError`` naming the provider, never a secret."""
        backend = "aws"
        try:
            credentials = self._chain_credentials(region)
            backend = _BACKENDS.get(credentials.method, "aws")
            frozen = credentials.get_frozen_credentials()
        except ClientError as exc:
            raise self._client_error(exc, backend) from None
        except BotoCoreError as exc:
            provider = getattr(exc, "kwargs", {}).get("provider")
            raise self._failure(_BACKENDS.get(str(provider), backend), f"{type(exc).__name__}: {exc}") from None
        except ValueError as exc:  # e.g. a Pod Identity URI on a host botocore refuses
            raise self._failure(backend, f"{type(exc).__name__}: {exc}", permanent=True) from None
        except OSError as exc:  # the web identity token file (kubelet may not have written it yet)
            raise self._failure(backend, f"cannot read the web identity token: {exc.strerror or exc}") from None
        except SourceError:
            raise
        except Exception as exc:  # botocore also raises RuntimeError ("still expired"), KeyError, ...
            raise self._failure(backend, f"{type(exc).__name__}: {exc}") from None
        if not frozen.access_key or not frozen.secret_key:
            raise SourceError(f"AWS credentials from {credentials.method} have no access key or secret")
        return AwsCredentials(access_key_id=frozen.access_key, secret_access_key=frozen.secret_key,
                              session_token=frozen.token or None)

    def _chain_credentials(self, region: str) -> Credentials:
        with self._lock:
            if self._credentials is None:
                credentials = self._load(region)
                if credentials is None:
                    raise SourceError(_NO_CREDENTIALS)
                self._credentials = credentials
                self.credential_method = str(credentials.method)
                log.info("aws credentials", extra={"method": self.credential_method, "region": region})
            return self._credentials

    def _load(self, region: str) -> Credentials | None:
        session = self._session_factory()
        session.set_config_variable("region", region)
        irsa = self._irsa()
        if irsa is not None:
            return self._irsa_credentials(session, region, *irsa)
        resolver = session.get_component("credential_provider")
        if [p.METHOD for p in resolver.providers][-2:] == ["container-role", "iam-role"]:
            resolver.remove("container-role")
            resolver.insert_before("iam-role", _container_provider(self._environ))
        credentials: Credentials | None = resolver.load_credentials()
        return credentials

    def _irsa(self) -> tuple[str, Path] | None:
        """(role ARN, token file) when IRSA applies; botocore's order puts environment keys first."""
        config, env = self._config, self._environ
        configured = config.role_arn is not None or config.web_identity_token_file is not None
        if not configured and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            return None
        role = config.role_arn or env.get("AWS_ROLE_ARN")
        token_file = config.web_identity_token_file or _path(env.get("AWS_WEB_IDENTITY_TOKEN_FILE"))
        if role and token_file:
            return role, token_file
        if configured:
            missing = "role_arn (or AWS_ROLE_ARN)" if not role else "web_identity_token_file (or " \
                      "AWS_WEB_IDENTITY_TOKEN_FILE)"
            raise SourceError(f"IRSA is half configured: {missing} is not set", permanent=True)
        return None

    def _irsa_credentials(self, session: botocore.session.Session, region: str, role_arn: str,
                          token_file: Path) -> Credentials:
        env = self._environ
        endpoint = self._config.sts_endpoint or env.get("AWS_ENDPOINT_URL_STS") or env.get("AWS_ENDPOINT_URL")
        self._sts_endpoint = endpoint

        def create_client(service_name: str, **kwargs: Any) -> Any:
            extra = kwargs.pop("config", None)
            return session.create_client(service_name, region_name=region, endpoint_url=endpoint or None,
                                         config=_AWS_CALL.merge(extra) if extra else _AWS_CALL, **kwargs)

        session_name = self._config.role_session_name or env.get("AWS_ROLE_SESSION_NAME") or DEFAULT_ROLE_SESSION_NAME
        fetcher = AssumeRoleWithWebIdentityCredentialFetcher(
            client_creator=create_client, web_identity_token_loader=FileWebIdentityTokenLoader(str(token_file)),
            role_arn=role_arn, extra_args={"RoleSessionName": session_name})
        credentials: Credentials = DeferredRefreshableCredentials(
            method="assume-role-with-web-identity", refresh_using=fetcher.fetch_credentials)
        return credentials

    def _client_error(self, exc: ClientError, backend: str) -> SourceError:
        """An AWS API refusal: status, code and message as AWS gave them (no secrets in either)."""
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(error.get("Code") or "error")
        throttled = status == 429 or "Throttl" in code or code == "IDPCommunicationError"
        detail = f"{exc.operation_name} returned {status} {code}: {error.get('Message') or ''}".strip()
        return self._failure(backend, detail, status=status,
                             permanent=400 <= status < 500 and not throttled)

    def _failure(self, backend: str, detail: str, *, status: int = 0, permanent: bool = False) -> SourceError:
        self._metrics.upstream_errors.labels(backend, str(status)).inc()
        what = {"aws_sts": f"AWS STS at {self._sts_endpoint or f'sts.{self._region}.amazonaws.com'}",
                "aws_container": "the EKS Pod Identity agent", "aws_imds": "the EC2 instance metadata service",
                }.get(backend, "the AWS credential chain")
        return SourceError(f"AWS credentials from {what} failed: {' '.join(detail.split())[:400]}",
                           permanent=permanent)


def _container_provider(environ: Mapping[str, str]) -> ContainerProvider:
    """botocore's EKS Pod Identity / ECS provider reading ``environ``, making one attempt: botocore
    makes three, sleeping 1 s before each retry and after the last failure, while metaemu's refresher
    already retries with backoff."""
    fetcher = ContainerMetadataFetcher(sleep=lambda _seconds: None)
    fetcher.RETRY_ATTEMPTS = 1
    provider: ContainerProvider = ContainerProvider(environ=dict(environ), fetcher=fetcher)
    return provider


def _opt_str(raw: Mapping[str, Any], key: str, prefix: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(prefix + key, "must be a non-empty string")
    return value.strip()


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
