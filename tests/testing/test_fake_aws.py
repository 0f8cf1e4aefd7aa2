"""The AWS stand-ins: the fake STS's ``aws4_request`` verifier accepts what Google accepts — metaemu's
token (target resource signed) and google-auth's (unsigned) — and rejects wrong secrets, skewed
dates, tampered signed headers and foreign audiences (upstream.md §3.3, UP-09); the IMDSv2 and
EKS Pod Identity stand-ins behave as botocore expects (§4.2)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, unquote

import boto3
import pytest
from google.auth import aws as google_aws

from metaemu.clock import SystemClock
from metaemu.credentials.sources.aws_sigv4 import (
    DEFAULT_VERIFICATION_URL,
    AwsCredentials,
    serialize_signed_request,
    sign_caller_identity,
)
from metaemu.credentials.tokens import ACCESS_TOKEN_TYPE, AWS_TOKEN_TYPE
from metaemu.testing.fake_aws import (
    INVALID_FORMAT,
    INVALID_TOKEN,
    MISSING_HEADERS,
    SIGNATURE_MISMATCH,
    AwsKey,
    AwsKeys,
    AwsRequestVerifier,
    FakeImds,
    FakePodIdentityAgent,
    install,
    running_moto,
)
from metaemu.testing.fake_clock import DEFAULT_START, FakeClock
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import GRANT_TYPE, WorkloadIdentityProvider
from metaemu.transport import HttpRequest, HttpResponse

POOL = "projects/123456789012/locations/global/workloadIdentityPools/aws-pool"
AUDIENCE = f"//iam.googleapis.com/{POOL}/providers/aws"
OTHER_AUDIENCE = f"//iam.googleapis.com/{POOL}/providers/other"
ARN = "arn:aws:sts::123456789012:assumed-role/app-role/i-0abc"
KEY = AwsKey(access_key_id="ASIAEXAMPLEKEY", secret_access_key="wJalrXUtnFEMI/K7MDENG", session_token="sessTOKEN",
             arn=ARN)
CREDS = AwsCredentials(access_key_id=KEY.access_key_id, secret_access_key=KEY.secret_access_key,
                       session_token=KEY.session_token)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def google(clock: FakeClock) -> FakeGoogle:
    google = FakeGoogle(clock=clock)
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE))
    google.add_provider(WorkloadIdentityProvider(audience=OTHER_AUDIENCE))
    return google


@pytest.fixture
def verifier(google: FakeGoogle) -> AwsRequestVerifier:
    verifier = install(google, keys=AwsKeys(moto=False))
    verifier.keys.add(KEY)
    return verifier


def metaemu_token(*, now: dt.datetime = DEFAULT_START, creds: AwsCredentials = CREDS, audience: str = AUDIENCE,
                  region: str = "eu-west-1") -> str:
    return sign_caller_identity(creds, region=region, url_template=DEFAULT_VERIFICATION_URL,
                                target_resource=audience, now=now).value


def google_auth_token(*, audience: str = AUDIENCE, region: str = "eu-west-1") -> str:
    """A token from google-auth's own signer (supplier API, upstream.md §9): an independent oracle."""

    class Supplier(google_aws.AwsSecurityCredentialsSupplier):
        def get_aws_security_credentials(self, context: Any, request: Any) -> Any:
            return google_aws.AwsSecurityCredentials(KEY.access_key_id, KEY.secret_access_key, KEY.session_token)

        def get_aws_region(self, context: Any, request: Any) -> str:
            return region

    creds = google_aws.Credentials(  # type: ignore[no-untyped-call]
        audience=audience, subject_token_type=AWS_TOKEN_TYPE, aws_security_credentials_supplier=Supplier())
    return str(creds.retrieve_subject_token(None))  # type: ignore[no-untyped-call]


def edit(token: str, change: Callable[[dict[str, Any]], None]) -> str:
    data = json.loads(unquote(token))
    change(data)
    return serialize_signed_request(data)


def set_header(name: str, value: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for item in data["headers"]:
            if item["key"].lower() == name:
                item["value"] = value
    return change


async def exchange(google: FakeGoogle, token: str, *, audience: str = AUDIENCE) -> HttpResponse:
    form = {"grant_type": GRANT_TYPE, "audience": audience, "scope": "https://www.googleapis.com/auth/iam",
            "requested_token_type": ACCESS_TOKEN_TYPE, "subject_token": token, "subject_token_type": AWS_TOKEN_TYPE}
    return await google.client().send(HttpRequest.form("https://sts.googleapis.com/v1/token", form))


def rejected(response: HttpResponse) -> str:
    assert response.status == 400
    body = response.decoded()
    assert body["error"] == "invalid_grant"
    return str(body["error_description"])


# -- accepted ---------------------------------------------------------------------------------------

async def test_accepts_metaemus_token_with_the_target_resource_signed_up09(
        google: FakeGoogle, verifier: AwsRequestVerifier) -> None:
    response = await exchange(google, metaemu_token())
    assert response.status == 200
    info = google.token_info(response.decoded()["access_token"])
    assert info is not None
    assert info.principal == f"principal://iam.googleapis.com/{POOL}/subject/{ARN}"
    (seen,) = verifier.verified
    assert seen.target_resource_signed
    assert seen.region == "eu-west-1"


async def test_accepts_a_google_auth_token_whose_target_resource_is_unsigned_up09(clock: FakeClock) -> None:
    google = FakeGoogle(clock=SystemClock())  # google-auth signs with the real time
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE))
    verifier = install(google, keys=AwsKeys(moto=False))
    verifier.keys.add(KEY)
    assert (await exchange(google, google_auth_token())).status == 200
    (seen,) = verifier.verified
    assert not seen.target_resource_signed
    assert seen.signed_headers == ("host", "x-amz-date", "x-amz-security-token")


async def test_google_auth_and_metaemu_tokens_have_the_same_shape(clock: FakeClock) -> None:
    ours, theirs = json.loads(unquote(metaemu_token())), json.loads(unquote(google_auth_token()))
    assert set(ours) == set(theirs) == {"headers", "method", "url"}
    assert ours["url"] == theirs["url"] == "https://sts.eu-west-1.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
    assert {h["key"].lower() for h in ours["headers"]} == {h["key"].lower() for h in theirs["headers"]}


async def test_tolerates_a_few_minutes_of_skew(google: FakeGoogle, verifier: AwsRequestVerifier) -> None:
    assert (await exchange(google, metaemu_token(now=DEFAULT_START - dt.timedelta(minutes=14)))).status == 200


async def test_accepts_the_https_prefixed_audience_in_the_header(
        google: FakeGoogle, verifier: AwsRequestVerifier) -> None:
    assert (await exchange(google, metaemu_token(audience="https:" + AUDIENCE))).status == 200


# -- rejected (UP-09) -------------------------------------------------------------------------------

async def test_rejects_a_wrong_secret_up09(google: FakeGoogle, verifier: AwsRequestVerifier) -> None:
    forged = AwsCredentials(access_key_id=KEY.access_key_id, secret_access_key="not-the-secret",
                            session_token=KEY.session_token)
    assert rejected(await exchange(google, metaemu_token(creds=forged))) == SIGNATURE_MISMATCH


@pytest.mark.parametrize("minutes", [-16, 16])
async def test_rejects_an_x_amz_date_outside_the_skew_up09(
        google: FakeGoogle, verifier: AwsRequestVerifier, minutes: int) -> None:
    description = rejected(await exchange(google, metaemu_token(now=DEFAULT_START + dt.timedelta(minutes=minutes))))
    assert description.startswith("Signature expired" if minutes < 0 else "Signature not yet current")


async def test_rejects_a_changed_x_amz_date_even_within_the_skew(
        google: FakeGoogle, verifier: AwsRequestVerifier) -> None:
    token = edit(metaemu_token(), set_header("x-amz-date", "20261122T050100Z"))
    assert rejected(await exchange(google, token)) == SIGNATURE_MISMATCH


async def test_rejects_a_changed_signed_target_resource_up09(
        google: FakeGoogle, verifier: AwsRequestVerifier) -> None:
    token = edit(metaemu_token(), set_header("x-goog-cloud-target-resource", OTHER_AUDIENCE))
    assert rejected(await exchange(google, token, audience=OTHER_AUDIENCE)) == SIGNATURE_MISMATCH


async def test_an_unsigned_target_resource_is_caught_only_by_the_audience_check() -> None:
    google = FakeGoogle(clock=SystemClock())
    google.add_provider(WorkloadIdentityProvider(audience=OTHER_AUDIENCE))
    install(google, keys=AwsKeys(moto=False)).keys.add(KEY)
    token = edit(google_auth_token(), set_header("x-goog-cloud-target-resource", OTHER_AUDIENCE))
    assert (await exchange(google, token, audience=OTHER_AUDIENCE)).status == 200  # §3.3, row 3


async def test_rejects_a_target_resource_other_than_the_audience_up09(
        google: FakeGoogle, verifier: AwsRequestVerifier) -> None:
    description = rejected(await exchange(google, metaemu_token(), audience=OTHER_AUDIENCE))
    assert description == (f"The target resource {AUDIENCE} in the AWS request does not match the audience "
                           f"{OTHER_AUDIENCE}.")


async def test_rejects_unknown_keys_and_foreign_session_tokens(
        google: FakeGoogle, verifier: AwsRequestVerifier) -> None:
    unknown = AwsCredentials(access_key_id="ASIAUNKNOWN", secret_access_key="x", session_token="y")
    assert rejected(await exchange(google, metaemu_token(creds=unknown))) == INVALID_TOKEN
    other_session = AwsCredentials(access_key_id=KEY.access_key_id, secret_access_key=KEY.secret_access_key,
                                   session_token="another-session")
    assert rejected(await exchange(google, metaemu_token(creds=other_session))) == INVALID_TOKEN


@pytest.mark.parametrize(("token", "expected"), [
    ("not json", INVALID_FORMAT),
    (quote(json.dumps({"url": "https://sts.amazonaws.com", "method": "POST", "headers": {}})), INVALID_FORMAT),
    (quote(json.dumps({"url": "https://sts.amazonaws.com", "method": "POST",
                       "headers": [{"key": "host", "value": "sts.amazonaws.com"}]})), MISSING_HEADERS),
])
async def test_rejects_malformed_tokens_with_googles_wording(
        google: FakeGoogle, verifier: AwsRequestVerifier, token: str, expected: str) -> None:
    assert rejected(await exchange(google, token)) == expected


@pytest.mark.parametrize(("url", "fragment"), [
    ("https://sts.eu-west-1.example.com?Action=GetCallerIdentity&Version=2011-06-15", "not an AWS STS endpoint"),
    ("http://sts.eu-west-1.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15", "not an AWS STS endpoint"),
    ("https://sts.eu-west-1.amazonaws.com?Action=AssumeRole&Version=2011-06-15", "GetCallerIdentity"),
    ("https://sts.us-west-2.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15", "host header"),
])
async def test_rejects_requests_that_are_not_sts_get_caller_identity(
        google: FakeGoogle, verifier: AwsRequestVerifier, url: str, fragment: str) -> None:
    token = edit(metaemu_token(), lambda data: data.update(url=url))
    assert fragment in rejected(await exchange(google, token))


async def test_rejects_a_credential_scope_for_another_region(google: FakeGoogle, verifier: AwsRequestVerifier) -> None:
    token = sign_caller_identity(CREDS, region="us-west-2", url_template=DEFAULT_VERIFICATION_URL.replace(
        "{region}", "eu-west-1"), target_resource=AUDIENCE, now=DEFAULT_START)
    assert "scoped to region us-west-2" in rejected(await exchange(google, token.value))


async def test_rejects_a_token_that_leaves_host_unsigned(google: FakeGoogle, verifier: AwsRequestVerifier) -> None:
    def unsign_host(data: dict[str, Any]) -> None:
        for item in data["headers"]:
            if item["key"] == "Authorization":
                item["value"] = item["value"].replace("SignedHeaders=host;", "SignedHeaders=")
    assert "host and x-amz-date" in rejected(await exchange(google, edit(metaemu_token(), unsign_host)))


async def test_secrets_stay_out_of_reprs() -> None:
    assert KEY.secret_access_key not in repr(KEY) and "sessTOKEN" not in repr(KEY)
    assert KEY.secret_access_key not in repr(CREDS)


# -- moto-issued keys --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with running_moto() as url:
        yield url


def test_looks_up_the_credentials_moto_issued(moto_url: str) -> None:
    sts = boto3.client("sts", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="x",
                       aws_secret_access_key="y")
    issued = sts.assume_role_with_web_identity(RoleArn="arn:aws:iam::123456789012:role/irsa-role",
                                               RoleSessionName="s1", WebIdentityToken="any-token")
    key = AwsKeys().lookup(issued["Credentials"]["AccessKeyId"])
    assert key is not None
    assert key.arn == "arn:aws:sts::123456789012:assumed-role/irsa-role/s1" == issued["AssumedRoleUser"]["Arn"]
    assert (key.secret_access_key, key.session_token) == (issued["Credentials"]["SecretAccessKey"],
                                                          issued["Credentials"]["SessionToken"])
    assert AwsKeys(moto=False).lookup(key.access_key_id) is None
    assert AwsKeys().lookup("ASIANEVERISSUED") is None


# -- IMDSv2 and the Pod Identity agent ----------------------------------------------------------------

async def imds_get(imds: FakeImds, path: str, token: str | None = None) -> HttpResponse:
    headers = {"X-aws-ec2-metadata-token": token} if token else {}
    return await imds.handle(HttpRequest(method="GET", url=f"http://169.254.169.254{path}", headers=headers))


async def test_imds_serves_region_role_and_credentials_with_a_v2_session_token() -> None:
    imds = FakeImds(role_name="node-role", credentials=KEY, availability_zone="eu-west-1b")
    put = await imds.handle(HttpRequest(method="PUT", url="http://169.254.169.254/latest/api/token",
                                        headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"}))
    assert put.status == 200
    token = put.body.decode()
    assert (await imds_get(imds, "/latest/meta-data/placement/availability-zone", token)).body == b"eu-west-1b"
    assert (await imds_get(imds, "/latest/meta-data/placement/region", token)).body == b"eu-west-1"
    assert (await imds_get(imds, "/latest/meta-data/iam/security-credentials/", token)).body == b"node-role"
    creds = (await imds_get(imds, "/latest/meta-data/iam/security-credentials/node-role", token)).decoded()
    assert creds["Code"] == "Success"
    assert (creds["AccessKeyId"], creds["SecretAccessKey"], creds["Token"]) == (
        KEY.access_key_id, KEY.secret_access_key, KEY.session_token)
    assert (await imds_get(imds, "/latest/meta-data/iam/security-credentials/other", token)).status == 404


async def test_imds_requires_a_live_session_token_unless_v1_is_allowed() -> None:
    imds = FakeImds(role_name="node-role", credentials=KEY)
    assert (await imds_get(imds, "/latest/meta-data/iam/security-credentials/")).status == 401
    assert (await imds_get(imds, "/latest/meta-data/iam/security-credentials/", "forged")).status == 401
    for ttl in (None, "0", "21601", "soon"):
        headers = {"X-aws-ec2-metadata-token-ttl-seconds": ttl} if ttl else {}
        put = HttpRequest(method="PUT", url="http://169.254.169.254/latest/api/token", headers=headers)
        assert (await imds.handle(put)).status == 400
    imds.require_token = False
    assert (await imds_get(imds, "/latest/meta-data/iam/security-credentials/")).status == 200


async def test_pod_identity_agent_wants_the_raw_token_in_authorization() -> None:
    agent = FakePodIdentityAgent(token="projected-token", credentials=KEY)
    url = "http://169.254.170.23/v1/credentials"
    ok = await agent.handle(HttpRequest(method="GET", url=url, headers={"Authorization": "projected-token"}))
    assert ok.status == 200
    body = ok.decoded()
    assert (body["AccessKeyId"], body["Token"], body["AccountId"]) == (KEY.access_key_id, KEY.session_token,
                                                                       "123456789012")
    for headers in ({}, {"Authorization": "Bearer projected-token"}):
        assert (await agent.handle(HttpRequest(method="GET", url=url, headers=headers))).status == 401
