"""The ``aws`` source: configuration, botocore's credential chain (IRSA, EKS Pod Identity, IMDSv2,
environment keys) in a worker thread, region resolution, the signed ``aws4_request`` token, and
clear, secret-free failures (issue #3; upstream.md §3, §4, §10.3; UP-08, UP-10, UP-11, UP-12, UP-20)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import boto3
import botocore.session
import pytest
from aiohttp import web

from metaemu.credentials.sources import SourceContext
from metaemu.credentials.sources.aws import DEFAULT_ROLE_SESSION_NAME, AwsSource, AwsSourceConfig, build
from metaemu.credentials.sources.aws_sigv4 import DEFAULT_VERIFICATION_URL
from metaemu.credentials.sources.config import parse_source
from metaemu.credentials.tokens import AWS_TOKEN_TYPE, SubjectToken
from metaemu.errors import ConfigError, SourceError
from metaemu.metrics import Metrics
from metaemu.testing.fake_aws import (
    AwsKey,
    AwsKeys,
    AwsRequestVerifier,
    FakeImds,
    FakePodIdentityAgent,
    install,
)
from metaemu.testing.fake_clock import DEFAULT_START, FakeClock
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import GRANT_TYPE, WorkloadIdentityProvider
from metaemu.testing.inprocess import InProcessClient, get_header
from metaemu.transport import HttpRequest, HttpResponse
from tests.credentials.sources.conftest import ConnectionLog
from tests.credentials.support import sample, serve

pytestmark = pytest.mark.usefixtures("aws_env", "network")
AWS_AUDIENCE = ("//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/demo-pool/"
                "providers/aws-provider")
IRSA_ROLE = "arn:aws:iam::123456789012:role/irsa-role"
POD_ROLE = "arn:aws:iam::123456789012:role/pod-identity-role"
STATIC = AwsKey(access_key_id="AKIASTATICKEY", secret_access_key="static/secret/KEY", session_token=None,
                arn="arn:aws:iam::123456789012:user/ci")


@pytest.fixture
def google(clock: FakeClock) -> FakeGoogle:
    google = FakeGoogle(clock=clock)
    google.add_provider(WorkloadIdentityProvider(audience=AWS_AUDIENCE))
    return google


@pytest.fixture
def verifier(google: FakeGoogle) -> AwsRequestVerifier:
    verifier = install(google, keys=AwsKeys())
    verifier.keys.add(STATIC)
    return verifier


def unused_http() -> InProcessClient:
    async def refuse(request: HttpRequest) -> HttpResponse:
        raise AssertionError(f"the aws source must not use the pipeline HTTP client ({request.url})")
    return InProcessClient(refuse)


def aws_source(config: AwsSourceConfig, *, clock: FakeClock, metrics: Metrics) -> AwsSource:
    """The source as ``build_source`` makes it: the environment is read now."""
    source = build(config, SourceContext(clock=clock, http=unused_http(), metrics=metrics, audience=AWS_AUDIENCE))
    assert isinstance(source, AwsSource)
    return source


async def subject(google: FakeGoogle, verifier: AwsRequestVerifier, token: SubjectToken) -> str:
    """Exchange ``token`` at the fake STS; the ARN it verified."""
    form = {"grant_type": GRANT_TYPE, "audience": AWS_AUDIENCE, "scope": "https://www.googleapis.com/auth/iam",
            "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "subject_token": token.value, "subject_token_type": token.token_type}
    response = await google.client().send(HttpRequest.form("https://sts.googleapis.com/v1/token", form))
    assert response.status == 200, response.body
    return verifier.verified[-1].arn


def decoded(token: SubjectToken) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(unquote(token.value))
    return data


def headers_of(token: SubjectToken) -> dict[str, str]:
    return {h["key"].lower(): h["value"] for h in decoded(token)["headers"]}


def static_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", STATIC.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", STATIC.secret_access_key)


def irsa_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_url: str) -> Path:
    token_file = tmp_path / "eks.amazonaws.com" / "token"
    token_file.parent.mkdir()
    token_file.write_text("projected-web-identity-jwt")
    monkeypatch.setenv("AWS_ROLE_ARN", IRSA_ROLE)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto_url)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    return token_file


def moto_role_key(moto_url: str, role_arn: str, session: str) -> AwsKey:
    """Temporary credentials moto issues, as the Pod Identity agent or IMDS would hand them out."""
    sts = boto3.client("sts", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="AKIAX",
                       aws_secret_access_key="x")
    issued = sts.assume_role(RoleArn=role_arn, RoleSessionName=session)
    creds = issued["Credentials"]
    return AwsKey(access_key_id=creds["AccessKeyId"], secret_access_key=creds["SecretAccessKey"],
                  session_token=creds["SessionToken"], arn=issued["AssumedRoleUser"]["Arn"])


@pytest.fixture
async def pod_identity(tmp_path: Path, moto_url: str,
                       monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakePodIdentityAgent]:
    key = moto_role_key(moto_url, POD_ROLE, "eks-demo-pod")
    token_file = tmp_path / "eks-pod-identity-token"
    token_file.write_text("pod-identity-projected-token")
    agent = FakePodIdentityAgent(token="pod-identity-projected-token", credentials=key)
    async with serve(agent.app()) as url:
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"{url}/v1/credentials")
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(token_file))
        yield agent


@pytest.fixture
async def imds(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeImds]:
    """IMDSv2 reachable at AWS_EC2_METADATA_SERVICE_ENDPOINT (and no longer disabled)."""
    stand_in = FakeImds(role_name="node-role", credentials=moto_role_key(moto_url, "arn:aws:iam::123456789012:"
                                                                         "role/node-role", "i-0123456789"),
                        availability_zone="eu-central-1b")
    async with serve(stand_in.app()) as url:
        monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", url + "/")
        yield stand_in


# -- configuration -----------------------------------------------------------------------------------

def test_parses_every_key_relative_to_the_config_directory(tmp_path: Path) -> None:
    config = parse_source({"type": "aws", "role_arn": IRSA_ROLE, "web_identity_token_file": "aws/token",
                           "role_session_name": "node-1", "region": "eu-west-1", "sts_endpoint": "https://vpce.test",
                           "regional_cred_verification_url": "https://sts.{region}.amazonaws.com.cn?"
                                                             "Action=GetCallerIdentity&Version=2011-06-15"},
                          prefix="workload_identity.source.", base_dir=tmp_path)
    assert config == AwsSourceConfig(
        role_arn=IRSA_ROLE, web_identity_token_file=tmp_path / "aws/token", role_session_name="node-1",
        region="eu-west-1", sts_endpoint="https://vpce.test",
        verification_url="https://sts.{region}.amazonaws.com.cn?Action=GetCallerIdentity&Version=2011-06-15")


def test_every_key_is_optional(tmp_path: Path) -> None:
    config = parse_source({"type": "aws"}, prefix="workload_identity.source.", base_dir=tmp_path)
    assert config == AwsSourceConfig()
    assert isinstance(config, AwsSourceConfig)
    assert config.verification_url == DEFAULT_VERIFICATION_URL


@pytest.mark.parametrize(("raw", "key"), [
    ({"role": IRSA_ROLE}, "role"),
    ({"role_arn": "irsa-role"}, "role_arn"),
    ({"role_arn": 7}, "role_arn"),
    ({"region": "Frankfurt"}, "region"),
    ({"sts_endpoint": "sts.eu-west-1.amazonaws.com"}, "sts_endpoint"),
    ({"regional_cred_verification_url": "http://sts.{region}.amazonaws.com"}, "regional_cred_verification_url"),
    ({"web_identity_token_file": ""}, "web_identity_token_file"),
])
def test_bad_keys_are_config_errors_naming_the_key(tmp_path: Path, raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_source({"type": "aws", **raw}, prefix="workload_identity.source.", base_dir=tmp_path)
    assert caught.value.key == f"workload_identity.source.{key}"


# -- the token (UP-08) -------------------------------------------------------------------------------

async def test_token_is_a_signed_get_caller_identity_bound_to_the_audience_up08(
        monkeypatch: pytest.MonkeyPatch, clock: FakeClock, metrics: Metrics, google: FakeGoogle,
        verifier: AwsRequestVerifier, moto_url: str) -> None:
    key = moto_role_key(moto_url, "arn:aws:iam::123456789012:role/app", "up08")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key.secret_access_key)
    monkeypatch.setenv("AWS_SESSION_TOKEN", key.session_token or "")
    source = aws_source(AwsSourceConfig(region="eu-west-1"), clock=clock, metrics=metrics)
    token = await source.fetch()
    assert (token.token_type, token.expiry, source.kind) == (AWS_TOKEN_TYPE, None, "aws")
    data = decoded(token)
    assert set(data) == {"headers", "method", "url"}
    assert data["method"] == "POST"
    assert data["url"] == "https://sts.eu-west-1.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
    headers = headers_of(token)
    assert headers["host"] == "sts.eu-west-1.amazonaws.com"
    assert headers["x-amz-date"] == DEFAULT_START.strftime("%Y%m%dT%H%M%SZ")
    assert headers["x-goog-cloud-target-resource"] == AWS_AUDIENCE
    assert headers["x-amz-security-token"] == key.session_token
    assert "SignedHeaders=host;x-amz-date;x-amz-security-token;x-goog-cloud-target-resource," in \
        headers["authorization"]
    assert f"Credential={key.access_key_id}/20261122/eu-west-1/sts/aws4_request" in headers["authorization"]
    assert await subject(google, verifier, token) == key.arn
    assert verifier.verified[-1].target_resource_signed
    assert source.credential_method == "env"
    assert key.secret_access_key not in repr(token) + repr(source) and token.value not in repr(token)


async def test_a_fresh_signature_on_every_fetch(monkeypatch: pytest.MonkeyPatch, clock: FakeClock,
                                                metrics: Metrics) -> None:
    static_keys(monkeypatch)
    source = aws_source(AwsSourceConfig(region="eu-west-1"), clock=clock, metrics=metrics)
    first = headers_of(await source.fetch())
    clock.advance(600)
    second = headers_of(await source.fetch())
    assert second["x-amz-date"] == (DEFAULT_START + dt.timedelta(minutes=10)).strftime("%Y%m%dT%H%M%SZ")
    assert first["authorization"] != second["authorization"]
    assert "x-amz-security-token" not in second  # long-term keys carry no session token


# -- where the credentials come from (UP-10) ----------------------------------------------------------

async def test_irsa_from_the_environment_assumes_the_role_at_the_sts_endpoint_without_imds_up10(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_url: str, imds: FakeImds, clock: FakeClock,
        metrics: Metrics, google: FakeGoogle, verifier: AwsRequestVerifier) -> None:
    irsa_env(monkeypatch, tmp_path, moto_url)
    source = aws_source(AwsSourceConfig(), clock=clock, metrics=metrics)
    token = await source.fetch()
    assert source.credential_method == "assume-role-with-web-identity"
    assert await subject(google, verifier, token) == \
        f"arn:aws:sts::123456789012:assumed-role/irsa-role/{DEFAULT_ROLE_SESSION_NAME}"
    assert imds.requests == []  # IRSA works where IMDS is unreachable (hop limit 1)


async def test_irsa_from_config_keys_alone(tmp_path: Path, moto_url: str, clock: FakeClock, metrics: Metrics,
                                           google: FakeGoogle, verifier: AwsRequestVerifier) -> None:
    (tmp_path / "token").write_text("projected-web-identity-jwt")
    config = parse_source({"type": "aws", "role_arn": IRSA_ROLE, "web_identity_token_file": "token",
                           "role_session_name": "node-7", "region": "eu-west-1", "sts_endpoint": moto_url},
                          prefix="workload_identity.source.", base_dir=tmp_path)
    assert isinstance(config, AwsSourceConfig)
    source = aws_source(config, clock=clock, metrics=metrics)
    token = await source.fetch()
    assert source.credential_method == "assume-role-with-web-identity"
    assert await subject(google, verifier, token) == "arn:aws:sts::123456789012:assumed-role/irsa-role/node-7"


async def test_eks_pod_identity_sends_the_raw_token_file_content_up10(
        pod_identity: FakePodIdentityAgent, monkeypatch: pytest.MonkeyPatch, clock: FakeClock, metrics: Metrics,
        google: FakeGoogle, verifier: AwsRequestVerifier) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    source = aws_source(AwsSourceConfig(), clock=clock, metrics=metrics)
    token = await source.fetch()
    assert source.credential_method == "container-role"
    (request,) = pod_identity.requests
    assert request.method == "GET"
    assert get_header(request, "Authorization") == "pod-identity-projected-token"  # no "Bearer"
    assert await subject(google, verifier, token) == \
        "arn:aws:sts::123456789012:assumed-role/pod-identity-role/eks-demo-pod"


async def test_irsa_wins_over_pod_identity_up10(
        pod_identity: FakePodIdentityAgent, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_url: str,
        clock: FakeClock, metrics: Metrics) -> None:
    irsa_env(monkeypatch, tmp_path, moto_url)
    source = aws_source(AwsSourceConfig(), clock=clock, metrics=metrics)
    await source.fetch()
    assert source.credential_method == "assume-role-with-web-identity"
    assert pod_identity.requests == []


async def test_environment_keys_come_before_irsa_from_the_environment_as_in_botocore(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_url: str, clock: FakeClock, metrics: Metrics) -> None:
    irsa_env(monkeypatch, tmp_path, moto_url)
    static_keys(monkeypatch)
    source = aws_source(AwsSourceConfig(), clock=clock, metrics=metrics)
    await source.fetch()
    assert source.credential_method == "env"


async def test_instance_profile_credentials_and_region_come_from_imdsv2(
        imds: FakeImds, clock: FakeClock, metrics: Metrics, google: FakeGoogle,
        verifier: AwsRequestVerifier) -> None:
    source = aws_source(AwsSourceConfig(), clock=clock, metrics=metrics)
    token = await source.fetch()
    assert source.credential_method == "iam-role"
    assert headers_of(token)["host"] == "sts.eu-central-1.amazonaws.com"  # from availability zone eu-central-1b
    assert await subject(google, verifier, token) == "arn:aws:sts::123456789012:assumed-role/node-role/i-0123456789"
    puts = [r for r in imds.requests if r.method == "PUT"]
    assert puts and all(get_header(r, "X-aws-ec2-metadata-token-ttl-seconds") == "21600" for r in puts)
    assert all(get_header(r, "X-aws-ec2-metadata-token") for r in imds.requests if r.method == "GET")


async def test_botocore_runs_in_a_worker_thread_up20(monkeypatch: pytest.MonkeyPatch, clock: FakeClock,
                                                      metrics: Metrics) -> None:
    static_keys(monkeypatch)
    threads: list[int] = []

    def session_factory() -> botocore.session.Session:
        threads.append(threading.get_ident())
        return botocore.session.Session()

    source = AwsSource(AwsSourceConfig(region="eu-west-1"), clock=clock, metrics=metrics, audience=AWS_AUDIENCE,
                       environ=os.environ, session_factory=session_factory)
    await source.fetch()
    await source.fetch()
    assert len(threads) == 1  # the chain is resolved once; botocore refreshes the credentials itself
    assert threads[0] != threading.get_ident()


# -- region (UP-11) ----------------------------------------------------------------------------------

async def test_region_from_aws_region_alone_up11(monkeypatch: pytest.MonkeyPatch, clock: FakeClock,
                                                 metrics: Metrics) -> None:
    static_keys(monkeypatch)
    monkeypatch.setenv("AWS_REGION", "ap-southeast-2")  # botocore alone would find no region here
    token = await aws_source(AwsSourceConfig(), clock=clock, metrics=metrics).fetch()
    assert headers_of(token)["host"] == "sts.ap-southeast-2.amazonaws.com"
    assert "/ap-southeast-2/sts/aws4_request" in headers_of(token)["authorization"]


@pytest.mark.parametrize(("configured", "env", "expected"), [
    ("eu-north-1", {"AWS_REGION": "us-west-1", "AWS_DEFAULT_REGION": "us-west-2"}, "eu-north-1"),
    (None, {"AWS_REGION": "us-west-1", "AWS_DEFAULT_REGION": "us-west-2"}, "us-west-1"),
    (None, {"AWS_DEFAULT_REGION": "us-west-2"}, "us-west-2"),
])
async def test_region_precedence_config_then_aws_region_then_aws_default_region(
        monkeypatch: pytest.MonkeyPatch, clock: FakeClock, metrics: Metrics, configured: str | None,
        env: dict[str, str], expected: str) -> None:
    static_keys(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    token = await aws_source(AwsSourceConfig(region=configured), clock=clock, metrics=metrics).fetch()
    assert headers_of(token)["host"] == f"sts.{expected}.amazonaws.com"


async def test_custom_verification_url_template(monkeypatch: pytest.MonkeyPatch, clock: FakeClock,
                                                metrics: Metrics) -> None:
    static_keys(monkeypatch)
    url = "https://sts.{region}.amazonaws.com.cn?Action=GetCallerIdentity&Version=2011-06-15"
    token = await aws_source(AwsSourceConfig(region="cn-north-1", verification_url=url), clock=clock,
                             metrics=metrics).fetch()
    assert decoded(token)["url"] == url.replace("{region}", "cn-north-1")
    assert headers_of(token)["host"] == "sts.cn-north-1.amazonaws.com.cn"


# -- failures ----------------------------------------------------------------------------------------

async def test_no_region_anywhere_is_a_clear_source_error(monkeypatch: pytest.MonkeyPatch, clock: FakeClock,
                                                          metrics: Metrics) -> None:
    static_keys(monkeypatch)
    with pytest.raises(SourceError) as caught:
        await aws_source(AwsSourceConfig(), clock=clock, metrics=metrics).fetch()
    assert "cannot determine the AWS region" in caught.value.reason
    assert "AWS_REGION" in caught.value.reason


async def test_no_credentials_is_a_clear_source_error(monkeypatch: pytest.MonkeyPatch, clock: FakeClock,
                                                      metrics: Metrics) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    source = aws_source(AwsSourceConfig(), clock=clock, metrics=metrics)
    with pytest.raises(SourceError) as caught:
        await source.fetch()
    assert caught.value.reason.startswith("no AWS credentials found: configure IRSA")
    assert not caught.value.permanent
    assert source.credential_method is None


async def test_half_configured_irsa_is_a_permanent_source_error(tmp_path: Path, clock: FakeClock,
                                                                metrics: Metrics) -> None:
    with pytest.raises(SourceError) as caught:
        await aws_source(AwsSourceConfig(role_arn=IRSA_ROLE, region="eu-west-1"), clock=clock,
                         metrics=metrics).fetch()
    assert caught.value.permanent
    assert "web_identity_token_file (or AWS_WEB_IDENTITY_TOKEN_FILE) is not set" in caught.value.reason


async def test_aws_sts_down_is_a_transient_error_naming_the_endpoint(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clock: FakeClock, metrics: Metrics, refused_port: int) -> None:
    down = f"http://127.0.0.1:{refused_port}"
    irsa_env(monkeypatch, tmp_path, down)
    with pytest.raises(SourceError) as caught:
        await aws_source(AwsSourceConfig(), clock=clock, metrics=metrics).fetch()
    assert not caught.value.permanent
    assert caught.value.reason.startswith(f"AWS credentials from AWS STS at {down} failed: EndpointConnectionError")
    assert sample(metrics, "metaemu_upstream_errors_total", backend="aws_sts", status="0") == 1


def aws_error_app(status: int, code: str, message: str) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        body = (f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
                f"<Code>{code}</Code><Message>{message}</Message></Error><RequestId>r-1</RequestId></ErrorResponse>")
        return web.Response(status=status, text=body, content_type="text/xml")

    app = web.Application()
    app.router.add_post("/", answer)
    return app


@pytest.mark.parametrize(("status", "code", "permanent"), [
    (403, "AccessDenied", True), (400, "InvalidIdentityToken", True), (400, "IDPCommunicationError", False),
    (503, "ServiceUnavailable", False)])
async def test_aws_sts_refusals_keep_status_and_code(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clock: FakeClock, metrics: Metrics, status: int, code: str,
        permanent: bool) -> None:
    async with serve(aws_error_app(status, code, "Not authorized to perform sts:AssumeRoleWithWebIdentity")) as url:
        irsa_env(monkeypatch, tmp_path, url)
        with pytest.raises(SourceError) as caught:
            await aws_source(AwsSourceConfig(), clock=clock, metrics=metrics).fetch()
    assert caught.value.permanent is permanent
    assert f"AssumeRoleWithWebIdentity returned {status} {code}: Not authorized" in caught.value.reason
    assert sample(metrics, "metaemu_upstream_errors_total", backend="aws_sts", status=str(status)) == 1


async def test_a_refusing_pod_identity_agent_is_a_source_error(
        pod_identity: FakePodIdentityAgent, monkeypatch: pytest.MonkeyPatch, clock: FakeClock,
        metrics: Metrics) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    pod_identity.token = "rotated-elsewhere"
    with pytest.raises(SourceError) as caught:
        await aws_source(AwsSourceConfig(), clock=clock, metrics=metrics).fetch()
    assert caught.value.reason.startswith("AWS credentials from the EKS Pod Identity agent failed")
    assert sample(metrics, "metaemu_upstream_errors_total", backend="aws_container", status="0") == 1


async def test_a_pod_identity_uri_on_a_foreign_host_is_refused_before_any_io(
        monkeypatch: pytest.MonkeyPatch, clock: FakeClock, metrics: Metrics, network: ConnectionLog) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://10.0.0.1/v1/credentials")
    with pytest.raises(SourceError) as caught:
        await aws_source(AwsSourceConfig(), clock=clock, metrics=metrics).fetch()
    assert "Unsupported host '10.0.0.1'" in caught.value.reason
    assert network.refused == []


async def test_secrets_never_reach_logs_or_reprs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_url: str, clock: FakeClock, metrics: Metrics,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    irsa_env(monkeypatch, tmp_path, moto_url)
    source = aws_source(AwsSourceConfig(), clock=clock, metrics=metrics)
    token = await source.fetch()
    key = AwsKeys().lookup(headers_of(token)["authorization"].split("Credential=")[1].split("/")[0])
    assert key is not None and key.session_token
    for secret in (key.secret_access_key, key.session_token, "projected-web-identity-jwt"):
        assert secret not in caplog.text
        assert secret not in repr(source) + repr(token)
    assert any(r.getMessage() == "aws credentials" for r in caplog.records)


# -- UP-12 -------------------------------------------------------------------------------------------

async def test_nothing_but_loopback_is_contacted_up12(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_url: str, clock: FakeClock, metrics: Metrics,
        network: ConnectionLog) -> None:
    irsa_env(monkeypatch, tmp_path, moto_url)
    await aws_source(AwsSourceConfig(), clock=clock, metrics=metrics).fetch()
    assert network.connected and network.refused == []
    with pytest.raises(OSError, match="UP-12"), socket.create_connection(("192.0.2.1", 443), timeout=0.1):
        pass
    assert network.refused

