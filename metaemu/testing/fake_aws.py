"""AWS on Google's side of the fence: how the fake Google STS verifies an ``aws4_request`` subject
token (upstream.md §3.3), the keys it verifies with, and moto as AWS STS on loopback.

Google STS replays the signed ``GetCallerIdentity`` to AWS; this verifier does what that replay
proves instead, in the order of §3.3: the URL is AWS STS ``GetCallerIdentity``; ``host`` and
``x-amz-date`` are signed; ``x-amz-date`` is within the skew AWS allows; the target resource equals
the STS audience (signed or not: google-auth leaves it unsigned, metaemu signs it, §10.3 item 1); the
session token belongs to the key; the SigV4 signature, recomputed with botocore's primitives over
only the ``SignedHeaders`` and the empty body. The subject is the caller's ARN, which is
``google.subject`` under Google's default AWS attribute mapping (``assertion.arn``).

Keys come from ``AwsKeys``: registered ones, else the credentials moto issued in this process
(moto's own check cannot verify Google-format tokens, §5).

Also here: where AWS workloads get credentials from, as stand-ins written once as
``async handle(HttpRequest) -> HttpResponse`` with ``app()`` for a socket (botocore needs one) —
the EC2 instance metadata service (``FakeImds``, IMDSv2) and the EKS Pod Identity agent
(``FakePodIdentityAgent``, §4.2). Each records what it was asked and serves the ``AwsKey`` it holds
(static, or issued by moto); ``credentials`` may be replaced at any time (rotation).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import json
import re
import secrets
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from aiohttp import web
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from metaemu.clock import Clock, SystemClock
from metaemu.credentials.tokens import AWS_TOKEN_TYPE
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import StsRejection, SubjectCheck
from metaemu.testing.inprocess import InProcessClient, get_header, handler_app
from metaemu.transport import HttpRequest, HttpResponse

#: AWS refuses a SigV4 request whose timestamp is more than 15 minutes from its clock
#: ("Signature expired ... (... - 15 min.)", AWS SigV4 documentation).
AWS_SIGNATURE_SKEW_S = 15 * 60
#: moto's default account (``moto.core.DEFAULT_ACCOUNT_ID``).
MOTO_ACCOUNT_ID = "123456789012"
#: Google's wording for malformed or incomplete tokens (upstream.md §1.3).
INVALID_FORMAT = "AWS request has invalid format."
MISSING_HEADERS = "The given AWS request doesn't contain all the required headers."
#: AWS's wording for an unknown key and a bad signature (InvalidClientTokenId, SignatureDoesNotMatch).
INVALID_TOKEN = "The security token included in the request is invalid."
SIGNATURE_MISMATCH = ("The request signature we calculated does not match the signature you provided. Check "
                      "your AWS Secret Access Key and signing method.")

_STS_HOST = re.compile(r"^sts(?:\.(?P<region>[a-z0-9-]+))?\.amazonaws\.com$")
_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)"
    r"/aws4_request,\s*SignedHeaders=(?P<signed>[a-z0-9;-]+),\s*Signature=(?P<signature>[0-9a-f]{64})$")
_REQUIRED_HEADERS = ("authorization", "host", "x-amz-date", "x-goog-cloud-target-resource")


@dataclass(frozen=True, slots=True, kw_only=True)
class AwsKey:
    """An AWS access key as AWS knows it: its secret, its session token (temporary keys) and the
    ARN ``GetCallerIdentity`` answers for it. SECURITY: secrets stay out of ``repr``."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    arn: str


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedAwsRequest:
    """One accepted token, for assertions (``target_resource_signed`` reports §10.3 item 1)."""

    arn: str
    region: str
    signed_headers: tuple[str, ...]
    target_resource_signed: bool


class AwsKeys:
    """access key id → ``AwsKey``: registered keys first, then (``moto=True``) the temporary
    credentials moto's STS issued in this process (``ThreadedMotoServer`` shares its backends)."""

    def __init__(self, *, moto: bool = True) -> None:
        self._keys: dict[str, AwsKey] = {}
        self._moto = moto

    def add(self, key: AwsKey) -> AwsKey:
        self._keys[key.access_key_id] = key
        return key

    def lookup(self, access_key_id: str) -> AwsKey | None:
        key = self._keys.get(access_key_id)
        if key is None and self._moto:
            key = moto_issued_key(access_key_id)
        return key


def moto_issued_key(access_key_id: str) -> AwsKey | None:
    """The assumed-role credentials moto issued under ``access_key_id`` (any account), if any."""
    try:
        from moto.sts.models import sts_backends
    except ImportError:  # moto is a test dependency
        return None
    for account in list(sts_backends.values()):
        for backend in list(account.values()):
            for role in list(backend.assumed_roles):
                if role.access_key_id == access_key_id:
                    return AwsKey(access_key_id=role.access_key_id, secret_access_key=role.secret_access_key,
                                  session_token=role.session_token, arn=role.arn)
    return None


@contextlib.contextmanager
def running_moto() -> Iterator[str]:
    """moto's server on 127.0.0.1 at a free port, signature checking off (upstream.md §5, UP-13);
    yields its base URL. Its STS accepts any web identity token and role (no IAM setup needed)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass(frozen=True, slots=True, kw_only=True)
class _SignedRequest:
    url: str
    method: str
    headers: Mapping[str, str]  # lower-case names


class AwsRequestVerifier:
    """A ``SubjectVerifier`` for ``aws4_request`` tokens; returns the caller's ARN.

    ``test_hosts`` are accepted besides ``sts[.<region>].amazonaws.com`` (their region is not
    checked against the credential scope). Accepted tokens are appended to ``verified``.
    """

    def __init__(self, keys: AwsKeys, *, test_hosts: Collection[str] = (),
                 skew_s: float = AWS_SIGNATURE_SKEW_S) -> None:
        self.keys = keys
        self.verified: list[VerifiedAwsRequest] = []
        self._test_hosts = frozenset(test_hosts)
        self._skew_s = skew_s

    async def __call__(self, check: SubjectCheck) -> str:
        request = _decode(check.subject_token)
        auth = _authorization(request)
        signed = tuple(auth["signed"].split(";"))
        self._check_url(request, auth["region"])
        if "host" not in signed or "x-amz-date" not in signed:
            raise StsRejection("invalid_grant", "The AWS request must sign the host and x-amz-date headers.")
        if any(name not in request.headers for name in signed):
            raise StsRejection("invalid_grant", MISSING_HEADERS)
        _check_date(request.headers["x-amz-date"], auth["date"], now=check.now, skew_s=self._skew_s)
        _check_target(request.headers["x-goog-cloud-target-resource"], check.audience)
        key = self.keys.lookup(auth["key"])
        if key is None or request.headers.get("x-amz-security-token") != key.session_token:
            raise StsRejection("invalid_grant", INVALID_TOKEN)
        if not hmac.compare_digest(_signature(request, key, signed=signed, region=auth["region"]),
                                   auth["signature"]):
            raise StsRejection("invalid_grant", SIGNATURE_MISMATCH)
        self.verified.append(VerifiedAwsRequest(arn=key.arn, region=auth["region"], signed_headers=signed,
                                                target_resource_signed="x-goog-cloud-target-resource" in signed))
        return key.arn

    def _check_url(self, request: _SignedRequest, scope_region: str) -> None:
        parts = urlsplit(request.url)
        host = parts.hostname or ""
        match = _STS_HOST.match(host)
        if parts.scheme != "https" or (match is None and host not in self._test_hosts):
            raise StsRejection("invalid_grant", f"The AWS request URL {request.url} is not an AWS STS endpoint.")
        if request.method != "POST" or parse_qs(parts.query).get("Action") != ["GetCallerIdentity"]:
            raise StsRejection("invalid_grant", "The AWS request must be a POST to GetCallerIdentity.")
        if request.headers["host"] != parts.netloc:
            raise StsRejection("invalid_grant", "The AWS request's host header does not match its URL.")
        if match is not None and scope_region != (match["region"] or "us-east-1"):
            raise StsRejection("invalid_grant", f"The AWS request is scoped to region {scope_region} but sent "
                               f"to {host}.")


def install(google: FakeGoogle, *, keys: AwsKeys | None = None, test_hosts: Collection[str] = ()) -> AwsRequestVerifier:
    """Make ``google``'s STS verify ``aws4_request`` subject tokens; returns the verifier (its
    ``keys`` take more registrations, its ``verified`` lists accepted tokens)."""
    verifier = AwsRequestVerifier(keys or AwsKeys(), test_hosts=test_hosts)
    google.register_subject_verifier(AWS_TOKEN_TYPE, verifier)
    return verifier


def _decode(subject_token: str) -> _SignedRequest:
    """form-decoded token (the STS form already did that) → ``unquote`` → JSON (upstream.md §3.1)."""
    try:
        data: Any = json.loads(unquote(subject_token))
    except ValueError:
        raise StsRejection("invalid_grant", INVALID_FORMAT) from None
    if not isinstance(data, dict) or not isinstance(data.get("url"), str) or not isinstance(data.get("method"), str):
        raise StsRejection("invalid_grant", INVALID_FORMAT)
    items = data.get("headers")
    if not isinstance(items, list):
        raise StsRejection("invalid_grant", INVALID_FORMAT)
    headers: dict[str, str] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str) or not isinstance(item.get("value"), str):
            raise StsRejection("invalid_grant", INVALID_FORMAT)
        name = item["key"].lower()
        if name in headers:
            raise StsRejection("invalid_grant", f"{INVALID_FORMAT} Header {name} appears twice.")
        headers[name] = item["value"]
    if any(name not in headers for name in _REQUIRED_HEADERS):
        raise StsRejection("invalid_grant", MISSING_HEADERS)
    return _SignedRequest(url=data["url"], method=data["method"], headers=headers)


def _authorization(request: _SignedRequest) -> dict[str, str]:
    match = _AUTHORIZATION.match(request.headers["authorization"])
    if match is None or match["service"] != "sts":
        raise StsRejection("invalid_grant", "The AWS request's Authorization header is not an AWS4-HMAC-SHA256 "
                           "signature for service sts.")
    return match.groupdict()


def _check_date(amz_date: str, scope_date: str, *, now: dt.datetime, skew_s: float) -> None:
    try:
        signed_at = dt.datetime.strptime(amz_date, SIGV4_TIMESTAMP).replace(tzinfo=dt.UTC)
    except ValueError:
        raise StsRejection("invalid_grant", f"The x-amz-date header {amz_date!r} is not a SigV4 timestamp.") from None
    if scope_date != amz_date[:8]:
        raise StsRejection("invalid_grant", "The AWS request's credential scope date differs from x-amz-date.")
    offset = (signed_at - now).total_seconds()
    if abs(offset) > skew_s:
        state = "expired" if offset < 0 else "not yet current"
        raise StsRejection("invalid_grant", f"Signature {state}: x-amz-date {amz_date} is more than "
                           f"{skew_s / 60:g} min from now ({now:%Y%m%dT%H%M%SZ}).")


def _check_target(target: str, audience: str) -> None:
    # Google accepts the provider name with or without the https: prefix (google-auth, aws.py).
    if target.removeprefix("https:") != audience.removeprefix("https:"):
        raise StsRejection("invalid_grant", f"The target resource {target} in the AWS request does not match "
                           f"the audience {audience}.")


def _signature(request: _SignedRequest, key: AwsKey, *, signed: tuple[str, ...], region: str) -> str:
    """The SigV4 signature over only the signed headers and an empty body (upstream.md §3.3)."""
    aws_request = AWSRequest(method=request.method, url=request.url, data=b"",
                             headers={name: request.headers[name] for name in signed})
    aws_request.context["timestamp"] = request.headers["x-amz-date"]
    signer = SigV4Auth(ReadOnlyCredentials(key.access_key_id, key.secret_access_key, key.session_token), "sts", region)
    canonical = signer.canonical_request(aws_request)
    return str(signer.signature(signer.string_to_sign(aws_request, canonical), aws_request))


# -- credential endpoints ----------------------------------------------------------------------------

#: IMDSv2 session tokens live 1 s to 6 h (``X-aws-ec2-metadata-token-ttl-seconds``, EC2 user guide).
IMDS_MAX_TTL_S = 21600
#: Instance-profile and Pod Identity credentials are valid for hours and rotated before expiry; 1 h
#: keeps botocore clear of its 15 min advisory refresh window (it reads the real wall clock).
CREDENTIALS_LIFETIME_S = 3600
_TOKEN_PATH = "/latest/api/token"
_ROLE_PATH = "/latest/meta-data/iam/security-credentials"
_IDENTITY_DOCUMENT_PATH = "/latest/dynamic/instance-identity/document"


def _reply(status: int, body: str | dict[str, Any]) -> HttpResponse:
    if isinstance(body, dict):
        return HttpResponse(status=status, headers={"Content-Type": "application/json"}, body=json.dumps(body).encode())
    return HttpResponse(status=status, headers={"Content-Type": "text/plain"}, body=body.encode())


def _credentials(key: AwsKey, expiration: dt.datetime) -> dict[str, Any]:
    payload = {"AccessKeyId": key.access_key_id, "SecretAccessKey": key.secret_access_key,
               "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ")}
    if key.session_token:
        payload["Token"] = key.session_token
    return payload


class FakeImds:
    """IMDSv2 (and, with ``require_token=False``, IMDSv1) for one instance profile role.

    Routes: ``PUT /latest/api/token`` (TTL header required) → session token;
    ``GET /latest/meta-data/placement/availability-zone`` and ``…/placement/region``;
    ``GET /latest/meta-data/iam/security-credentials/`` → the role name; ``…/<role>`` → credentials;
    ``GET /latest/dynamic/instance-identity/document`` → the instance identity document (JSON).
    Metadata GETs need a live ``x-aws-ec2-metadata-token`` (401 otherwise). Any request carrying
    ``X-Forwarded-For`` gets 403: IMDSv2 issues no token to, and refuses token-bearing requests
    with, that header (AWS security blog on IMDSv2, 2019-11; kube2iam PR #279). Time from ``clock``.
    """

    def __init__(self, *, role_name: str, credentials: AwsKey, availability_zone: str = "us-east-1a",
                 require_token: bool = True, clock: Clock | None = None) -> None:
        self.role_name = role_name
        self.credentials = credentials
        self.availability_zone = availability_zone
        self.require_token = require_token
        self.requests: list[HttpRequest] = []
        self._clock: Clock = clock or SystemClock()
        self._tokens: dict[str, float] = {}

    async def handle(self, request: HttpRequest) -> HttpResponse:
        self.requests.append(request)
        path = urlsplit(request.url).path
        if get_header(request, "X-Forwarded-For") is not None:
            return _reply(403, "Forbidden")
        if path == _TOKEN_PATH:
            return self._session_token(request)
        if request.method != "GET":
            return _reply(405, "Method Not Allowed")
        if not self._authorized(request):
            return _reply(401, "Unauthorized")
        path = path.rstrip("/")
        zone = self.availability_zone
        answers = {"/latest/meta-data/placement/availability-zone": zone,
                   "/latest/meta-data/placement/region": zone.rstrip("abcdefghijklmnopqrstuvwxyz"),
                   _ROLE_PATH: self.role_name}
        if path in answers:
            return _reply(200, answers[path])
        if path == _IDENTITY_DOCUMENT_PATH:
            return _reply(200, self.identity_document())
        if path == f"{_ROLE_PATH}/{self.role_name}":
            expiration = self._clock.now() + dt.timedelta(seconds=CREDENTIALS_LIFETIME_S)
            now = self._clock.now().strftime("%Y-%m-%dT%H:%M:%SZ")
            return _reply(200, {"Code": "Success", "LastUpdated": now, "Type": "AWS-HMAC",
                                **_credentials(self.credentials, expiration)})
        return _reply(404, "Not Found")

    def _session_token(self, request: HttpRequest) -> HttpResponse:
        if request.method != "PUT":
            return _reply(405, "Method Not Allowed")
        ttl = get_header(request, "X-aws-ec2-metadata-token-ttl-seconds")
        if ttl is None or not ttl.isdigit() or not 1 <= int(ttl) <= IMDS_MAX_TTL_S:
            return _reply(400, "Bad Request")
        token = secrets.token_urlsafe(32)
        self._tokens[token] = self._clock.monotonic() + int(ttl)
        return _reply(200, token)

    def _authorized(self, request: HttpRequest) -> bool:
        token = get_header(request, "X-aws-ec2-metadata-token")
        if token is None:
            return not self.require_token
        return self._tokens.get(token, 0.0) > self._clock.monotonic()

    def identity_document(self) -> dict[str, Any]:
        """The instance identity document's fields SDKs read (EC2 user guide, "Instance identity
        documents"); account and instance are moto's defaults."""
        zone = self.availability_zone
        return {"accountId": MOTO_ACCOUNT_ID, "architecture": "x86_64", "availabilityZone": zone,
                "imageId": "ami-moto-virtual", "instanceId": "i-fake", "instanceType": "m5.large",
                "privateIp": "169.254.30.1", "region": zone.rstrip("abcdefghijklmnopqrstuvwxyz"),
                "version": "2017-09-30"}

    @property
    def session_tokens_issued(self) -> int:
        return len(self._tokens)

    def client(self) -> InProcessClient:
        return InProcessClient(self.handle)

    def app(self) -> web.Application:
        return handler_app(self.handle)


class FakePodIdentityAgent:
    """The EKS Pod Identity agent: ``GET /v1/credentials`` with ``Authorization`` equal to the
    projected token (the raw file content, no ``Bearer``, upstream.md §4.2) → credentials JSON with
    ``AccessKeyId``, ``SecretAccessKey``, ``Token``, ``AccountId``, ``Expiration``."""

    def __init__(self, *, token: str, credentials: AwsKey, account_id: str = MOTO_ACCOUNT_ID,
                 clock: Clock | None = None) -> None:
        self.token = token
        self.credentials = credentials
        self.account_id = account_id
        self.requests: list[HttpRequest] = []
        self._clock: Clock = clock or SystemClock()

    async def handle(self, request: HttpRequest) -> HttpResponse:
        self.requests.append(request)
        path = urlsplit(request.url).path
        if request.method != "GET" or path != "/v1/credentials":
            return _reply(404, {"Message": "Not Found"})
        if get_header(request, "Authorization") != self.token:
            return _reply(401, {"Message": "Unauthorized: the service account token is missing or invalid"})
        expiration = self._clock.now() + dt.timedelta(seconds=CREDENTIALS_LIFETIME_S)
        return _reply(200, {**_credentials(self.credentials, expiration), "AccountId": self.account_id})

    def client(self) -> InProcessClient:
        return InProcessClient(self.handle)

    def app(self) -> web.Application:
        return handler_app(self.handle)
