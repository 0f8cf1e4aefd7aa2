"""``metaemu credential-provider``: a kubelet image credential provider (exec plugin,
``credentialprovider.kubelet.k8s.io/v1``) that pulls from Artifact Registry and Container Registry
with the pod's own identity.

kubelet writes a ``CredentialProviderRequest`` on stdin: the ``image``, and on Kubernetes 1.33+
(``tokenAttributes`` in the CredentialProviderConfig, KEP-4412) a ``serviceAccountToken`` bound to
the pod plus the ``serviceAccountAnnotations`` it was told to pass. The token is exchanged at Google
STS (``--token-file`` stands in when kubelet sends none: pre-1.33 nodes, pods without a service
account), a service account is impersonated when ``--service-account`` or the annotation
``iam.gke.io/gcp-service-account`` names one, and a ``CredentialProviderResponse`` goes to stdout:
``oauth2accesstoken`` / access token for each registry pattern, cached by registry for the token's
remaining life less a margin. Any failure: a message on stderr, a non-zero exit, nothing on stdout
(kubelet then pulls without these credentials and logs the stderr text).

Owns the request/response documents, flag and environment handling and exit codes. The wire work is
the server's own: ``Pipeline`` over ``StsClient`` / ``IamCredentialsClient``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

from metaemu.clock import Clock, SystemClock
from metaemu.config import CLOUD_PLATFORM_SCOPE, DEFAULT_IAM_CREDENTIALS_URL, DEFAULT_STS_URL
from metaemu.credentials.impersonation import IamCredentialsClient
from metaemu.credentials.pipeline import Identity, Pipeline
from metaemu.credentials.sources.file import FileSource
from metaemu.credentials.sts import StsClient
from metaemu.credentials.tokens import JWT_TOKEN_TYPE, AccessToken, SubjectToken
from metaemu.credentials.upstream import UpstreamCaller
from metaemu.errors import ConfigError, CredentialError
from metaemu.metrics import create_metrics
from metaemu.transport import DEFAULT_TIMEOUT_S, AiohttpClient, HttpClient

API_VERSION = "credentialprovider.kubelet.k8s.io/v1"
REQUEST_KIND = "CredentialProviderRequest"
RESPONSE_KIND = "CredentialProviderResponse"
#: The fixed user name Artifact Registry and Container Registry take with an access token.
REGISTRY_USERNAME = "oauth2accesstoken"
#: Artifact Registry (LOCATION-docker.pkg.dev) and Container Registry (gcr.io, REGION.gcr.io).
DEFAULT_REGISTRIES = ("*.pkg.dev", "*.gcr.io", "gcr.io")
#: The GKE annotation naming the Google service account a Kubernetes service account acts as.
SERVICE_ACCOUNT_ANNOTATION = "iam.gke.io/gcp-service-account"
#: "Registry": the credential is good for every image of a registry, and kubelet adds the service
#: account (namespace, name, UID, annotations) to the key in token mode (KEP-4412), so identities
#: never share an entry. What cloud-provider-gcp's own provider answers.
CACHE_KEY_TYPE = "Registry"
#: kubelet must not hand out a cached credential that dies during a pull: registry token exchange
#: and large layers take minutes. Five minutes, the floor below which the metadata API also refuses
#: to serve a token (T-05).
CACHE_MARGIN_S = 300
#: A request is ~1-2 KiB (image name, a JWT, a few annotations); refuse anything far larger unread.
MAX_REQUEST_CHARS = 1 << 20
#: Impersonated tokens: the 1 h generateAccessToken allows without the lifetime-extension policy.
LIFETIME_S = 3600
#: kubelet kills a plugin after one minute (pkg/credentialprovider/plugin); a call must fit well inside.
KUBELET_EXEC_TIMEOUT_S = 60
EXIT_FAILED = 1  # no credential: upstream refused or failed
EXIT_USAGE = 2   # bad request on stdin, flags or environment

AUDIENCE_ENV = "GCP_AUDIENCE"
STS_URL_ENV = "METAEMU_STS_URL"
IAM_URL_ENV = "METAEMU_IAM_CREDENTIALS_URL"
_EMAIL = re.compile(r"^[^@/\s]+@[^@/\s]+\.[a-z]{2,}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialProviderRequest:
    image: str
    service_account_token: str | None = field(default=None, repr=False)
    service_account_annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> CredentialProviderRequest:
        """The request kubelet wrote; ``ConfigError`` naming the field when it is not one."""
        if len(text) > MAX_REQUEST_CHARS:
            raise ConfigError("stdin", f"larger than {MAX_REQUEST_CHARS} characters: not a {REQUEST_KIND}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("stdin", f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                              f"expected a {REQUEST_KIND}") from None
        if not isinstance(data, dict):
            raise ConfigError("stdin", f"expected a JSON object, a {REQUEST_KIND}")
        if data.get("apiVersion") != API_VERSION:
            raise ConfigError("apiVersion", f"expected {API_VERSION!r}, got {data.get('apiVersion')!r} "
                              "(set apiVersion in the kubelet CredentialProviderConfig)")
        if data.get("kind") != REQUEST_KIND:
            raise ConfigError("kind", f"expected {REQUEST_KIND!r}, got {data.get('kind')!r}")
        image, token = data.get("image"), data.get("serviceAccountToken")
        if not isinstance(image, str) or not image.strip():
            raise ConfigError("image", "required: the image being pulled")
        if token is not None and not isinstance(token, str):
            raise ConfigError("serviceAccountToken", "must be a string")
        annotations = data.get("serviceAccountAnnotations") or {}
        if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise ConfigError("serviceAccountAnnotations", "must map strings to strings")
        return cls(image=image.strip(), service_account_token=token.strip() if token and token.strip() else None,
                   service_account_annotations=annotations)

    def service_account(self, default: str | None) -> str | None:
        """The Google service account to impersonate: the pod's annotation, else ``default``."""
        annotated = self.service_account_annotations.get(SERVICE_ACCOUNT_ANNOTATION, "").strip()
        if annotated and not _EMAIL.match(annotated):
            raise ConfigError(f"serviceAccountAnnotations[{SERVICE_ACCOUNT_ANNOTATION}]",
                              f"{annotated!r} is not a service-account email")
        return annotated or default


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderSettings:
    """Flags (CredentialProviderConfig ``args``) over environment (its ``env``)."""

    audience: str
    service_account: str | None = None
    token_file: Path | None = None
    registries: tuple[str, ...] = DEFAULT_REGISTRIES
    sts_url: str = DEFAULT_STS_URL
    iam_credentials_url: str = DEFAULT_IAM_CREDENTIALS_URL
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.audience.startswith(("//", "identitynamespace:")):
            raise ConfigError("--audience", f"expected //iam.googleapis.com/projects/N/locations/global/"
                              f"workloadIdentityPools/POOL/providers/PROVIDER, got {self.audience!r}")
        if self.service_account is not None and not _EMAIL.match(self.service_account):
            raise ConfigError("--service-account", f"{self.service_account!r} is not a service-account email")
        for key, url in (("--sts-url", self.sts_url), ("--iam-credentials-url", self.iam_credentials_url)):
            if not re.match(r"^https?://[^/\s]+", url):
                raise ConfigError(key, f"must be an http(s) URL, got {url!r}")
        if not 0 < self.timeout_s < KUBELET_EXEC_TIMEOUT_S:
            raise ConfigError("--timeout-seconds", f"must be between 0 and {KUBELET_EXEC_TIMEOUT_S} (exclusive), "
                              f"got {self.timeout_s:g}")


async def provide(request: CredentialProviderRequest, settings: ProviderSettings, *, http: HttpClient,
                  clock: Clock) -> dict[str, Any]:
    """The ``CredentialProviderResponse`` for ``request``; raises ``CredentialError`` (upstream
    refused or failed, token file unusable) or ``ConfigError`` (no token, bad annotation)."""
    metrics = create_metrics()  # a one-shot process: nothing scrapes them, UpstreamCaller wants them
    pipeline = Pipeline(
        identity=Identity(audience=settings.audience, service_account=request.service_account(settings.service_account),
                          default_scopes=(CLOUD_PLATFORM_SCOPE,), lifetime_s=LIFETIME_S),
        source=_subject_source(request, settings, clock),
        sts=StsClient(caller=UpstreamCaller(http=http, metrics=metrics, backend="sts"), url=settings.sts_url,
                      clock=clock, timeout_s=settings.timeout_s),
        iam=IamCredentialsClient(caller=UpstreamCaller(http=http, metrics=metrics, backend="iam"),
                                 base_url=settings.iam_credentials_url, clock=clock, timeout_s=settings.timeout_s),
    )
    token = await pipeline.access_token((), federated=await pipeline.federated_token())
    return response_document(token, registries=settings.registries, now_ts=clock.time())


def response_document(token: AccessToken, *, registries: Sequence[str], now_ts: float) -> dict[str, Any]:
    # kubelet decodes strictly: exactly these fields, nothing else (pkg/credentialprovider/plugin).
    cache_s = max(0, token.expires_in_at(now_ts) - CACHE_MARGIN_S)
    return {"apiVersion": API_VERSION, "kind": RESPONSE_KIND, "cacheKeyType": CACHE_KEY_TYPE,
            "cacheDuration": go_duration(cache_s),
            "auth": {pattern: {"username": REGISTRY_USERNAME, "password": token.value} for pattern in registries}}


def go_duration(seconds: int) -> str:
    """Whole seconds as Go's ``time.Duration.String()`` writes them (metav1.Duration JSON): 0s, 59s,
    55m0s, 1h0m0s."""
    hours, rest = divmod(max(0, seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class _KubeletToken:
    """The pod's service-account token kubelet put in the request."""

    kind = "kubelet"

    def __init__(self, token: str) -> None:
        self._token = token

    async def fetch(self) -> SubjectToken:
        return SubjectToken(value=self._token, token_type=JWT_TOKEN_TYPE)


def _subject_source(request: CredentialProviderRequest, settings: ProviderSettings,
                    clock: Clock) -> _KubeletToken | FileSource:
    if request.service_account_token:
        return _KubeletToken(request.service_account_token)
    if settings.token_file is not None:
        return FileSource.kubernetes(settings.token_file, clock=clock)
    raise ConfigError("serviceAccountToken", "kubelet sent no service-account token and no --token-file is set "
                      "(Kubernetes 1.33+: set tokenAttributes.serviceAccountTokenAudience in the "
                      "CredentialProviderConfig)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError("arguments", message)


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    p = _Parser(prog="metaemu credential-provider", description="kubelet image credential provider: reads a "
                f"{REQUEST_KIND} on stdin, writes a {RESPONSE_KIND} on stdout.")
    p.add_argument("--audience", default=environ.get(AUDIENCE_ENV),
                   help=f"workload identity provider (default: ${AUDIENCE_ENV})")
    p.add_argument("--service-account", help=f"Google service account to impersonate unless the pod's "
                   f"Kubernetes service account is annotated {SERVICE_ACCOUNT_ANNOTATION}")
    p.add_argument("--token-file", type=Path, help="service-account token to use when kubelet sends none")
    p.add_argument("--registry", action="append", dest="registries", metavar="PATTERN",
                   help=f"registry pattern to answer for, repeatable (default: {' '.join(DEFAULT_REGISTRIES)})")
    p.add_argument("--sts-url", default=environ.get(STS_URL_ENV) or DEFAULT_STS_URL)
    p.add_argument("--iam-credentials-url", default=environ.get(IAM_URL_ENV) or DEFAULT_IAM_CREDENTIALS_URL)
    p.add_argument("--timeout-seconds", type=float, default=DEFAULT_TIMEOUT_S, help="per upstream call")
    return p


def parse_settings(argv: Sequence[str], environ: Mapping[str, str]) -> ProviderSettings:
    args = build_parser(environ).parse_args(argv)
    if not args.audience:
        raise ConfigError("--audience", f"required (or set {AUDIENCE_ENV})")
    return ProviderSettings(audience=args.audience, service_account=args.service_account,
                            token_file=args.token_file, registries=tuple(args.registries or DEFAULT_REGISTRIES),
                            sts_url=args.sts_url, iam_credentials_url=args.iam_credentials_url.rstrip("/"),
                            timeout_s=args.timeout_seconds)


def main(argv: Sequence[str], *, stdin: IO[str], stdout: IO[str], stderr: IO[str],
         environ: Mapping[str, str]) -> int:
    """Run once as kubelet does: 0 with the response on stdout, else a message on stderr,
    ``EXIT_USAGE`` (bad input) or ``EXIT_FAILED`` (no credential), and nothing on stdout."""
    try:
        settings = parse_settings(argv, environ)
        request = CredentialProviderRequest.parse(_read(stdin))
    except ConfigError as exc:
        return _fail(stderr, f"invalid input: {exc}", EXIT_USAGE)
    try:
        response = asyncio.run(_provide_once(request, settings))
    except ConfigError as exc:
        return _fail(stderr, f"invalid input: {exc}", EXIT_USAGE)
    except CredentialError as exc:
        return _fail(stderr, f"no registry credentials for {request.image}: {exc.reason}", EXIT_FAILED)
    stdout.write(json.dumps(response))
    stdout.flush()
    return 0


def _read(stdin: IO[str]) -> str:
    try:
        return stdin.read(MAX_REQUEST_CHARS + 1)
    except UnicodeDecodeError:
        raise ConfigError("stdin", f"not UTF-8 text; expected a {REQUEST_KIND}") from None


def _fail(stderr: IO[str], message: str, code: int) -> int:
    print(f"metaemu credential-provider: {message}", file=stderr)
    return code


async def _provide_once(request: CredentialProviderRequest, settings: ProviderSettings) -> dict[str, Any]:
    http = AiohttpClient()
    try:
        return await provide(request, settings, http=http, clock=SystemClock())
    finally:
        await http.close()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr, environ=os.environ))
