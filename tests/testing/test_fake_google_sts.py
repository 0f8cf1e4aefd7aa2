"""FakeGoogle as STS: each check of upstream.md §1.1 rejects what the real service rejects (UP-03, UP-18)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from metaemu.credentials.tokens import ACCESS_TOKEN_TYPE, AWS_TOKEN_TYPE, ID_TOKEN_TYPE, JWT_TOKEN_TYPE
from metaemu.errors import ConfigError
from metaemu.testing.fake_clock import DEFAULT_START, FakeClock
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import GRANT_TYPE, INVALID_TARGET, SubjectCheck, WorkloadIdentityProvider
from metaemu.testing.fake_google_tokens import new_rsa_key
from metaemu.testing.fake_issuer import FakeIssuer
from metaemu.transport import HttpRequest, HttpResponse

POOL = "projects/123456789012/locations/global/workloadIdentityPools/pool-1"
AUDIENCE = f"//iam.googleapis.com/{POOL}/providers/kube"
ISSUER = "https://kube.test"
STS_URL = "https://sts.googleapis.com/v1/token"
IAM_SCOPE = "https://www.googleapis.com/auth/iam"
KSA_SUB = "system:serviceaccount:apps:web"
T0 = int(DEFAULT_START.timestamp())


@pytest.fixture(scope="module")
def issuer_key() -> rsa.RSAPrivateKey:
    return new_rsa_key()


@pytest.fixture(scope="module")
def forger_key() -> rsa.RSAPrivateKey:
    return new_rsa_key()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def issuer(clock: FakeClock, issuer_key: rsa.RSAPrivateKey) -> FakeIssuer:
    return FakeIssuer(issuer=ISSUER, kid="kid-1", clock=clock, private_key=issuer_key)


@pytest.fixture
def forger(clock: FakeClock, forger_key: rsa.RSAPrivateKey) -> FakeIssuer:
    """Same issuer URL and kid as ``issuer``, different key: its signatures must not verify."""
    return FakeIssuer(issuer=ISSUER, kid="kid-1", clock=clock, private_key=forger_key)


@pytest.fixture
def google(clock: FakeClock, issuer: FakeIssuer) -> FakeGoogle:
    google = FakeGoogle(clock=clock)
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=ISSUER, jwks=issuer.jwks()))
    return google


def kube_token(issuer: FakeIssuer, **overrides: Any) -> str:
    return issuer.mint(sub=KSA_SUB, audience=[AUDIENCE], **overrides)


async def exchange(google: FakeGoogle, token: str, *, headers: dict[str, str] | None = None,
                   fields: Mapping[str, str | None] | None = None, **overrides: str | None) -> HttpResponse:
    """POST a google-auth-shaped form; ``fields``/``overrides`` replace fields, None drops one."""
    form_fields: dict[str, str | None] = {
        "grant_type": GRANT_TYPE, "audience": AUDIENCE, "scope": IAM_SCOPE,
        "requested_token_type": ACCESS_TOKEN_TYPE, "subject_token": token, "subject_token_type": JWT_TOKEN_TYPE,
        **(fields or {}), **overrides,
    }
    form = {k: v for k, v in form_fields.items() if v is not None}
    return await google.client().send(HttpRequest.form(STS_URL, form, headers=headers))


def rejection(response: HttpResponse) -> tuple[str, str]:
    assert response.status == 400
    body = response.decoded()
    assert set(body) == {"error", "error_description"}
    return body["error"], body["error_description"]


async def test_exchanges_a_kubernetes_token_for_a_federated_access_token(
        google: FakeGoogle, issuer: FakeIssuer) -> None:
    token = issuer.mint_kubernetes(namespace="apps", service_account="web", audience=AUDIENCE)
    response = await exchange(google, token)
    assert response.status == 200
    body = response.decoded()
    assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in"}
    assert body["access_token"].startswith("ya29.fed-")
    assert (body["issued_token_type"], body["token_type"], body["expires_in"]) == (
        ACCESS_TOKEN_TYPE, "Bearer", 3599)
    info = google.token_info(body["access_token"])
    assert info is not None
    assert info.principal == f"principal://iam.googleapis.com/{POOL}/subject/{KSA_SUB}"
    assert info.principal == google.principal_for(AUDIENCE, KSA_SUB)
    assert (info.kind, info.email, info.scopes) == ("federated", None, (IAM_SCOPE,))
    assert info.expiry == DEFAULT_START + dt.timedelta(seconds=3600)


async def test_federated_token_expires_by_the_injected_clock(
        google: FakeGoogle, issuer: FakeIssuer, clock: FakeClock) -> None:
    access_token = (await exchange(google, kube_token(issuer))).decoded()["access_token"]
    clock.advance(3599)
    assert google.token_info(access_token) is not None
    clock.advance(1)
    assert google.token_info(access_token) is None


TokenFactory = Callable[[FakeIssuer, FakeIssuer], str]

REJECTED_TOKENS: list[tuple[str, TokenFactory, str]] = [
    ("signature by another key under the same kid", lambda i, f: kube_token(f), "signature"),
    ("kid not in the provider's JWKS", lambda i, f: kube_token(i, headers={"kid": "other"}), "kid 'other'"),
    ("no kid header", lambda i, f: kube_token(i, headers={"kid": None}), "no 'kid'"),
    ("HS256 instead of RS256", lambda i, f: jwt.encode(
        {"iss": ISSUER, "sub": "s", "aud": AUDIENCE, "iat": T0, "exp": T0 + 60}, "k" * 32,
        algorithm="HS256", headers={"kid": "kid-1"}), "alg 'HS256'"),
    ("not a JWT", lambda i, f: "not-a-jwt", "Unable to parse"),
    ("wrong iss", lambda i, f: kube_token(i, claims={"iss": "https://evil.test"}), "issuer"),
    ("aud naming another provider", lambda i, f: i.mint(sub="s", audience=AUDIENCE + "x"), "audience"),
    ("aud missing", lambda i, f: kube_token(i, claims={"aud": None}), "audience"),
    ("expired", lambda i, f: kube_token(i, now=DEFAULT_START - dt.timedelta(hours=2)), "expired"),
    ("iat in the future", lambda i, f: kube_token(i, now=DEFAULT_START + dt.timedelta(minutes=10)), "future"),
    ("lifetime of 48 h", lambda i, f: kube_token(i, lifetime_s=48 * 3600), "48 hours"),
    ("nbf in the future", lambda i, f: kube_token(i, claims={"nbf": T0 + 600}), "not yet valid"),
    ("no exp", lambda i, f: kube_token(i, claims={"exp": None}), "'exp'"),
    ("no iat", lambda i, f: kube_token(i, claims={"iat": None}), "'iat'"),
    ("no sub", lambda i, f: kube_token(i, claims={"sub": None}), "'sub'"),
    ("empty sub", lambda i, f: kube_token(i, claims={"sub": ""}), "'sub'"),
]


@pytest.mark.parametrize(("factory", "reason"), [(f, r) for _, f, r in REJECTED_TOKENS],
                         ids=[name for name, _, _ in REJECTED_TOKENS])
async def test_rejects_subject_token_with_invalid_grant(
        google: FakeGoogle, issuer: FakeIssuer, forger: FakeIssuer, factory: TokenFactory, reason: str) -> None:
    response = await exchange(google, factory(issuer, forger))
    error, description = rejection(response)
    assert error == "invalid_grant"
    assert reason in description
    assert google.calls["sts"] == 1


@pytest.mark.parametrize("aud", [AUDIENCE, f"https:{AUDIENCE}", ["other", f"https:{AUDIENCE}"]],
                         ids=["full name", "https-prefixed name", "list containing it"])
async def test_accepts_the_default_audience_in_each_form(
        google: FakeGoogle, issuer: FakeIssuer, aud: str | list[str]) -> None:
    assert (await exchange(google, issuer.mint(sub="s", audience=aud))).status == 200


async def test_allowed_audiences_replace_the_default(google: FakeGoogle, issuer: FakeIssuer) -> None:
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=ISSUER, jwks=issuer.jwks(),
                                                 allowed_audiences=("sts.googleapis.com",)))
    assert (await exchange(google, issuer.mint(sub="s", audience="sts.googleapis.com"))).status == 200
    assert rejection(await exchange(google, kube_token(issuer)))[0] == "invalid_grant"


async def test_tolerates_seconds_of_clock_skew(google: FakeGoogle, issuer: FakeIssuer) -> None:
    token = kube_token(issuer, now=DEFAULT_START + dt.timedelta(seconds=5))
    assert (await exchange(google, token)).status == 200


async def test_accepts_the_id_token_subject_type(google: FakeGoogle, issuer: FakeIssuer) -> None:
    response = await exchange(google, kube_token(issuer), subject_token_type=ID_TOKEN_TYPE)
    assert response.status == 200


async def test_unknown_audience_is_invalid_target_with_googles_message(
        google: FakeGoogle, issuer: FakeIssuer) -> None:
    other = f"//iam.googleapis.com/{POOL}/providers/gone"
    assert rejection(await exchange(google, kube_token(issuer), audience=other)) == ("invalid_target",
                                                                                     INVALID_TARGET)


async def test_rejects_an_authorization_header(google: FakeGoogle, issuer: FakeIssuer) -> None:
    response = await exchange(google, kube_token(issuer), headers={"Authorization": "Basic Zm9vOmJhcg=="})
    error, description = rejection(response)
    assert error == "invalid_request"
    assert "Authorization" in description


@pytest.mark.parametrize(("overrides", "error", "reason"), [
    ({"grant_type": "client_credentials"}, "unsupported_grant_type", "grant_type"),
    ({"requested_token_type": JWT_TOKEN_TYPE}, "invalid_request", "requested_token_type"),
    ({"subject_token_type": None}, "invalid_request", "subject_token_type"),
    ({"audience": None}, "invalid_request", "audience"),
    ({"options": "{not json"}, "invalid_request", "options"),
    ({"options": json.dumps({"x": "y" * 4096})}, "invalid_request", "4096"),
], ids=["wrong grant_type", "wrong requested_token_type", "no subject_token_type", "no audience",
        "options not JSON", "options too long"])
async def test_rejects_malformed_requests(google: FakeGoogle, issuer: FakeIssuer, overrides: dict[str, str | None],
                                          error: str, reason: str) -> None:
    got_error, description = rejection(await exchange(google, kube_token(issuer), fields=overrides))
    assert (got_error, reason in description) == (error, True)


async def test_rejects_a_missing_subject_token(google: FakeGoogle) -> None:
    assert rejection(await exchange(google, "")) == ("invalid_request", "Missing required parameter: subject_token.")


async def test_rejects_a_repeated_parameter(google: FakeGoogle, issuer: FakeIssuer) -> None:
    body = HttpRequest.form(STS_URL, {"grant_type": GRANT_TYPE}).body + b"&grant_type=x"
    request = HttpRequest(method="POST", url=STS_URL, body=body,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert rejection(await google.handle(request))[0] == "invalid_request"


@pytest.mark.parametrize("encoded", [json.dumps({"userProject": "123456"}),
                                     quote(json.dumps({"userProject": "123456"}))],
                         ids=["single-encoded", "double-encoded like google-auth"])
async def test_accepts_options_single_and_double_encoded(
        google: FakeGoogle, issuer: FakeIssuer, encoded: str) -> None:
    assert (await exchange(google, kube_token(issuer), options=encoded)).status == 200


async def test_accepts_the_camel_case_json_rest_form(google: FakeGoogle, issuer: FakeIssuer) -> None:
    request = HttpRequest.json(STS_URL, {
        "grantType": GRANT_TYPE, "audience": AUDIENCE, "scope": IAM_SCOPE,
        "requestedTokenType": ACCESS_TOKEN_TYPE, "subjectToken": kube_token(issuer),
        "subjectTokenType": JWT_TOKEN_TYPE})
    assert (await google.handle(request)).status == 200


async def test_aws_tokens_are_refused_until_a_verifier_is_registered(google: FakeGoogle) -> None:
    error, description = rejection(await exchange(google, "%7B%7D", subject_token_type=AWS_TOKEN_TYPE))
    assert error == "invalid_request"
    assert "no verifier registered" in description


async def test_a_registered_verifier_decides_the_subject(google: FakeGoogle) -> None:
    seen: list[SubjectCheck] = []

    async def verify(check: SubjectCheck) -> str:
        seen.append(check)
        return "arn:aws:sts::123456789012:assumed-role/app/i-1"

    google.register_subject_verifier(AWS_TOKEN_TYPE, verify)
    response = await exchange(google, "opaque", subject_token_type=AWS_TOKEN_TYPE)
    assert response.status == 200
    info = google.token_info(response.decoded()["access_token"])
    assert info is not None
    assert info.principal.endswith("/subject/arn:aws:sts::123456789012:assumed-role/app/i-1")
    (check,) = seen
    assert (check.subject_token, check.audience, check.now) == ("opaque", AUDIENCE, DEFAULT_START)


async def test_fleet_identity_namespace_maps_to_the_namespace_pool(google: FakeGoogle, issuer: FakeIssuer) -> None:
    fleet = "identitynamespace:my-proj.svc.id.goog:https://gkehub.googleapis.com/projects/my-proj/memberships/c1"
    google.add_provider(WorkloadIdentityProvider(audience=fleet, issuer=ISSUER, jwks=issuer.jwks(),
                                                 project_number="42"))
    response = await exchange(google, issuer.mint(sub="s", audience=["my-proj.svc.id.goog"]), audience=fleet)
    assert response.status == 200
    expected = "principal://iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/my-proj.svc.id.goog/subject/s"
    assert google.principal_for(fleet, "s") == expected


def test_provider_names_are_validated() -> None:
    with pytest.raises(ConfigError, match="audience"):
        WorkloadIdentityProvider(audience="https://sts.googleapis.com", issuer=ISSUER, jwks={"keys": []})
    with pytest.raises(ConfigError, match="issuer"):
        WorkloadIdentityProvider(audience=AUDIENCE, jwks={"keys": []})
    with pytest.raises(ConfigError, match="audience"):
        FakeGoogle(clock=FakeClock()).principal_for(AUDIENCE, "s")


async def test_a_credential_the_attribute_condition_rejects_is_unauthorized_client_as_google_words_it(
        clock: FakeClock, issuer: FakeIssuer) -> None:
    # The body users report (circleci/circleci-docs#8541), for issue #14's doctor.
    google = FakeGoogle(clock=clock)
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=ISSUER, jwks=issuer.jwks(),
                                                 attribute_condition=lambda claims: claims["sub"].endswith(":prod")))
    assert rejection(await exchange(google, kube_token(issuer))) == (
        "unauthorized_client", "The given credential is rejected by the attribute condition.")
    allowed = issuer.mint(sub="system:serviceaccount:apps:prod", audience=[AUDIENCE])
    assert (await exchange(google, allowed)).status == 200


async def test_an_audience_naming_a_project_id_is_invalid_request_as_google_words_it(
        google: FakeGoogle, issuer: FakeIssuer) -> None:
    # google-github-actions/auth#60: a project ID where the number belongs.
    audience = "//iam.googleapis.com/projects/my-project/locations/global/workloadIdentityPools/pool-1/providers/kube"
    error, description = rejection(await exchange(google, kube_token(issuer), audience=audience))
    assert error == "invalid_request"
    assert description.startswith('Invalid value for "audience". This value should be the full resource name')
