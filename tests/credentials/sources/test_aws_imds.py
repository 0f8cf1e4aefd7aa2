"""``external_account`` with ``environment_id: aws1``: Google's EKS/EC2 ``creds.json`` works unchanged
against an IMDSv2 stand-in, with google-auth's precedence of ``AWS_*`` environment variables
(issue #3; google-auth ``aws.py``; upstream.md §3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from metaemu.config import parse_config
from metaemu.credentials.sources import SourceContext, build_source
from metaemu.credentials.sources.aws import parse_credential_source
from metaemu.credentials.sources.aws_imds import AwsImdsSource, AwsImdsSourceConfig
from metaemu.credentials.tokens import AWS_TOKEN_TYPE, JWT_TOKEN_TYPE
from metaemu.errors import ConfigError, SourceError
from metaemu.metrics import Metrics
from metaemu.testing.fake_aws import AwsKey, AwsKeys, AwsRequestVerifier, FakeImds, install
from metaemu.testing.fake_clock import FakeClock
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import GRANT_TYPE, WorkloadIdentityProvider
from metaemu.testing.inprocess import get_header
from metaemu.testing.world import World
from metaemu.transport import HttpRequest, TransportFailure
from tests.credentials.support import CannedClient, sample

pytestmark = pytest.mark.usefixtures("aws_env", "network")
AWS_AUDIENCE = ("//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/demo-pool/"
                "providers/aws-provider")
SERVICE_ACCOUNT = "demo-app@demo-project.iam.gserviceaccount.com"
NODE = AwsKey(access_key_id="ASIANODEROLE", secret_access_key="node/role/secret", session_token="node-session",
              arn="arn:aws:sts::123456789012:assumed-role/eks-node-role/i-0123456789abcdef0")
ENV_KEY = AwsKey(access_key_id="AKIAENVKEY", secret_access_key="env/secret", session_token="env-session",
                 arn="arn:aws:iam::123456789012:user/ci")
#: ``gcloud iam workload-identity-pools create-cred-config ... --aws --enable-imdsv2``, verbatim.
CREDS_JSON: dict[str, Any] = {
    "type": "external_account",
    "audience": AWS_AUDIENCE,
    "subject_token_type": "urn:ietf:params:aws:token-type:aws4_request",
    "service_account_impersonation_url": "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/"
                                         f"{SERVICE_ACCOUNT}:generateAccessToken",
    "token_url": "https://sts.googleapis.com/v1/token",
    "credential_source": {
        "environment_id": "aws1",
        "region_url": "http://169.254.169.254/latest/meta-data/placement/availability-zone",
        "url": "http://169.254.169.254/latest/meta-data/iam/security-credentials",
        "regional_cred_verification_url": "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15",
        "imdsv2_session_token_url": "http://169.254.169.254/latest/api/token",
    },
}
PREFIX = "workload_identity.credential_config (creds.json) credential_source."


@pytest.fixture
def imds(clock: FakeClock) -> FakeImds:
    return FakeImds(role_name="eks-node-role", credentials=NODE, availability_zone="us-east-2b", clock=clock)


@pytest.fixture
def google(clock: FakeClock) -> FakeGoogle:
    google = FakeGoogle(clock=clock)
    google.add_provider(WorkloadIdentityProvider(audience=AWS_AUDIENCE))
    return google


@pytest.fixture
def verifier(google: FakeGoogle) -> AwsRequestVerifier:
    verifier = install(google, keys=AwsKeys(moto=False))
    verifier.keys.add(NODE)
    verifier.keys.add(ENV_KEY)
    return verifier


def parsed(credential_source: dict[str, Any], *, token_type: str = AWS_TOKEN_TYPE) -> AwsImdsSourceConfig:
    return parse_credential_source(credential_source, token_type=token_type, prefix=PREFIX, base_dir=Path("."))


def imds_source(imds: FakeImds, *, clock: FakeClock, metrics: Metrics,
                credential_source: dict[str, Any] | None = None) -> AwsImdsSource:
    config = parsed(credential_source or CREDS_JSON["credential_source"])
    source = build_source(config, SourceContext(clock=clock, http=imds.client(), metrics=metrics,
                                                audience=AWS_AUDIENCE))
    assert isinstance(source, AwsImdsSource)
    return source


async def exchanged_arn(google: FakeGoogle, verifier: AwsRequestVerifier, value: str) -> str:
    form = {"grant_type": GRANT_TYPE, "audience": AWS_AUDIENCE, "scope": "https://www.googleapis.com/auth/iam",
            "requested_token_type": "urn:ietf:params:oauth:token-type:access_token", "subject_token": value,
            "subject_token_type": AWS_TOKEN_TYPE}
    response = await google.client().send(HttpRequest.form("https://sts.googleapis.com/v1/token", form))
    assert response.status == 200, response.body
    return verifier.verified[-1].arn


def paths(imds: FakeImds) -> list[tuple[str, str]]:
    return [(r.method, r.url.removeprefix("http://169.254.169.254")) for r in imds.requests]


# -- configuration -----------------------------------------------------------------------------------

def test_googles_creds_json_is_accepted_unchanged(world: World, tmp_path: Path) -> None:
    (tmp_path / "creds.json").write_text(json.dumps(CREDS_JSON))
    raw = world.config(sts_url="unused", iam_url="unused")
    raw["workload_identity"] = {"credential_config": "creds.json"}
    del raw["endpoints"]
    wi = parse_config(raw, hostname="node-1", base_dir=tmp_path).workload_identity
    assert wi is not None
    assert (wi.audience, wi.service_account) == (AWS_AUDIENCE, SERVICE_ACCOUNT)
    assert wi.source == AwsImdsSourceConfig(
        credentials_url="http://169.254.169.254/latest/meta-data/iam/security-credentials",
        region_url="http://169.254.169.254/latest/meta-data/placement/availability-zone",
        session_token_url="http://169.254.169.254/latest/api/token",
        verification_url="https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15")


@pytest.mark.parametrize(("change", "key", "problem"), [
    ({"environment_id": "aws2"}, "environment_id", "aws version '2' is not supported"),
    ({"environment_id": "azure1"}, "environment_id", "expected 'aws1'"),
    ({"regional_cred_verification_url": None}, "regional_cred_verification_url", "required"),
    ({"regional_cred_verification_url": "http://sts.{region}.amazonaws.com"}, "regional_cred_verification_url",
     "https"),
    ({"url": "169.254.169.254/latest"}, "url", "http(s) URL"),
    ({"regoin_url": "http://169.254.169.254/"}, "regoin_url", "unknown key"),
])
def test_bad_credential_sources_are_config_errors_naming_the_key(change: dict[str, Any], key: str,
                                                                 problem: str) -> None:
    raw = {k: v for k, v in {**CREDS_JSON["credential_source"], **change}.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        parsed(raw)
    assert caught.value.key == PREFIX + key
    assert problem in caught.value.problem


def test_the_subject_token_type_must_be_aws4_request() -> None:
    with pytest.raises(ConfigError, match="aws4_request"):
        parsed(CREDS_JSON["credential_source"], token_type=JWT_TOKEN_TYPE)


# -- IMDSv2 ------------------------------------------------------------------------------------------

async def test_region_and_credentials_come_from_imdsv2(
        imds: FakeImds, clock: FakeClock, metrics: Metrics, google: FakeGoogle, verifier: AwsRequestVerifier) -> None:
    token = await imds_source(imds, clock=clock, metrics=metrics).fetch()
    assert paths(imds) == [("PUT", "/latest/api/token"),
                           ("GET", "/latest/meta-data/placement/availability-zone"),
                           ("GET", "/latest/meta-data/iam/security-credentials"),
                           ("GET", "/latest/meta-data/iam/security-credentials/eks-node-role")]
    assert get_header(imds.requests[0], "X-aws-ec2-metadata-token-ttl-seconds") == "300"  # as google-auth asks
    assert all(get_header(r, "X-aws-ec2-metadata-token") for r in imds.requests[1:])
    assert token.token_type == AWS_TOKEN_TYPE
    assert json.loads(unquote(token.value))["url"].startswith("https://sts.us-east-2.amazonaws.com?")
    assert await exchanged_arn(google, verifier, token.value) == NODE.arn
    assert verifier.verified[-1].region == "us-east-2"
    assert verifier.verified[-1].target_resource_signed


async def test_the_region_is_resolved_once_and_credentials_each_time(
        imds: FakeImds, clock: FakeClock, metrics: Metrics) -> None:
    source = imds_source(imds, clock=clock, metrics=metrics)
    await source.fetch()
    imds.requests.clear()
    await source.fetch()
    assert [p for _, p in paths(imds)] == ["/latest/api/token", "/latest/meta-data/iam/security-credentials",
                                           "/latest/meta-data/iam/security-credentials/eks-node-role"]


async def test_without_a_session_token_url_imdsv1_is_used(imds: FakeImds, clock: FakeClock,
                                                          metrics: Metrics) -> None:
    imds.require_token = False
    source_raw = {k: v for k, v in CREDS_JSON["credential_source"].items() if k != "imdsv2_session_token_url"}
    await imds_source(imds, clock=clock, metrics=metrics, credential_source=source_raw).fetch()
    assert all(r.method == "GET" and get_header(r, "X-aws-ec2-metadata-token") is None for r in imds.requests)


async def test_environment_variables_take_precedence_over_imds(
        monkeypatch: pytest.MonkeyPatch, imds: FakeImds, clock: FakeClock, metrics: Metrics, google: FakeGoogle,
        verifier: AwsRequestVerifier) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ENV_KEY.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_KEY.secret_access_key)
    monkeypatch.setenv("AWS_SESSION_TOKEN", ENV_KEY.session_token or "")
    monkeypatch.setenv("AWS_REGION", "ap-northeast-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    token = await imds_source(imds, clock=clock, metrics=metrics).fetch()
    assert imds.requests == []
    assert await exchanged_arn(google, verifier, token.value) == ENV_KEY.arn
    assert verifier.verified[-1].region == "ap-northeast-1"


async def test_aws_default_region_is_used_when_aws_region_is_unset(
        monkeypatch: pytest.MonkeyPatch, imds: FakeImds, clock: FakeClock, metrics: Metrics) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "sa-east-1")
    token = await imds_source(imds, clock=clock, metrics=metrics).fetch()
    assert "sts.sa-east-1.amazonaws.com" in token.value
    assert "/latest/meta-data/placement/availability-zone" not in [p for _, p in paths(imds)]


# -- failures ----------------------------------------------------------------------------------------

async def test_unreachable_imds_is_a_transient_error_with_a_hint(clock: FakeClock, metrics: Metrics) -> None:
    http = CannedClient(TransportFailure("http://169.254.169.254/latest/api/token", "no response within 2s"))
    config = parsed(CREDS_JSON["credential_source"])
    source = AwsImdsSource(config, clock=clock, http=http, metrics=metrics, audience=AWS_AUDIENCE, environ={})
    with pytest.raises(SourceError) as caught:
        await source.fetch()
    assert not caught.value.permanent
    assert caught.value.reason.startswith("the AWS instance metadata service failed to return the IMDSv2 session "
                                          "token (http://169.254.169.254/latest/api/token): unreachable")
    assert "hop limit 1" in caught.value.reason
    assert sample(metrics, "metaemu_upstream_errors_total", backend="aws_imds", status="0") == 1


async def test_an_imds_refusal_keeps_the_status(imds: FakeImds, clock: FakeClock, metrics: Metrics) -> None:
    source_raw = {**CREDS_JSON["credential_source"], "url": "http://169.254.169.254/latest/meta-data/iam/nothing"}
    with pytest.raises(SourceError) as caught:
        await imds_source(imds, clock=clock, metrics=metrics, credential_source=source_raw).fetch()
    assert "failed to return the role name" in caught.value.reason and "HTTP 404" in caught.value.reason
    assert sample(metrics, "metaemu_upstream_errors_total", backend="aws_imds", status="404") == 1


async def test_credentials_without_a_secret_are_refused_without_echoing_the_body(
        clock: FakeClock, metrics: Metrics) -> None:
    imds = FakeImds(role_name="r", credentials=NODE, clock=clock)
    original = imds.handle

    async def partial(request: HttpRequest) -> Any:
        reply = await original(request)
        if request.url.endswith("/security-credentials/r"):
            return type(reply)(status=200, headers=reply.headers,
                               body=json.dumps({"AccessKeyId": "ASIA", "Token": "tok-SECRET"}).encode())
        return reply

    imds.handle = partial  # type: ignore[method-assign]
    with pytest.raises(SourceError) as caught:
        await imds_source(imds, clock=clock, metrics=metrics).fetch()
    assert "no usable credentials for role 'r'" in caught.value.reason
    assert "tok-SECRET" not in caught.value.reason


async def test_no_region_source_at_all_is_permanent(clock: FakeClock, metrics: Metrics, imds: FakeImds) -> None:
    source_raw = {k: v for k, v in CREDS_JSON["credential_source"].items() if k != "region_url"}
    with pytest.raises(SourceError) as caught:
        await imds_source(imds, clock=clock, metrics=metrics, credential_source=source_raw).fetch()
    assert caught.value.permanent
    assert "cannot determine the AWS region" in caught.value.reason
