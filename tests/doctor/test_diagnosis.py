"""Each STS / IAM / Kubernetes refusal mapped to its cause and fix (issue #14), from the bodies the
Google stand-ins answer (metaemu/testing/fake_google_errors.py) and the ones users report."""

from __future__ import annotations

from typing import Any

import pytest

from metaemu.doctor.diagnosis import ChainFacts, diagnose
from metaemu.errors import UpstreamError
from metaemu.testing.fake_google_errors import (
    account_disabled,
    default_sts_error_body,
    error_info,
    insufficient_scopes,
    oauth_error,
    permission_denied,
    rpc_error,
    rpc_error_body,
)
from metaemu.testing.fake_google_sts import ATTRIBUTE_CONDITION_REJECTED, INVALID_AUDIENCE, INVALID_TARGET
from metaemu.transport import HttpResponse

POOL = "projects/123456789012/locations/global/workloadIdentityPools/pool"
AUDIENCE = f"//iam.googleapis.com/{POOL}/providers/prov"
SA = "app@p.iam.gserviceaccount.com"
FACTS = ChainFacts(audience=AUDIENCE, source_kind="kubernetes", service_account=SA, project_id="p",
                   configured_project_number="123456789012", subject="system:serviceaccount:ns:app",
                   issuer="https://issuer.test", token_audiences=("https://wrong",))


def error(service: str, response: HttpResponse) -> UpstreamError:
    return UpstreamError(service=service, url="https://x.test", status=response.status, body=response.decoded(),
                         retryable=response.status >= 500)


def sts(code: str, description: str) -> UpstreamError:
    return error("sts", oauth_error(code, description))


@pytest.mark.parametrize(("upstream", "code"), [
    (sts("invalid_grant", "The audience in ID Token [https://wrong] does not match the expected audience x."),
     "sts.audience_mismatch"),
    (sts("invalid_grant", "The issuer in ID Token a does not match the expected ISSUER b."), "sts.issuer_mismatch"),
    (sts("invalid_grant", "Invalid ID Token signature."), "sts.key_mismatch"),
    (sts("invalid_grant", "No key in the provider's JWKS has kid 'k'."), "sts.key_mismatch"),
    (sts("invalid_grant", "The ID Token has expired (exp 1, now 2)."), "sts.token_lifetime"),
    (sts("invalid_grant", "Something else."), "sts.invalid_grant"),
    (sts("invalid_target", INVALID_TARGET), "sts.provider_mismatch"),
    (sts("unauthorized_client", ATTRIBUTE_CONDITION_REJECTED), "sts.attribute_condition"),
    (error("sts", rpc_error(503)), "sts.transient"),
    (error("sts", HttpResponse(status=400, body=b"{}")), "sts.refused"),
    (error("iam", permission_denied("iam.serviceAccounts.getAccessToken")), "iam.workload_identity_user_missing"),
    (error("iam", account_disabled()), "iam.service_account_disabled"),
    (error("iam", rpc_error(404, f"Not found; Gaia id not found for email {SA}")), "iam.service_account_not_found"),
    (error("iam", insufficient_scopes(service="iam", method="m")), "iam.refused"),
    (error("k8s", HttpResponse(status=403, body=b'{"kind":"Status"}')), "k8s.forbidden"),
    (error("k8s", HttpResponse(status=404, body=b'{"kind":"Status"}')), "k8s.not_found"),
])
def test_each_refusal_maps_to_its_cause(upstream: UpstreamError, code: str) -> None:
    assert diagnose(upstream, FACTS).code == code


def test_an_audience_mismatch_names_the_tokens_audience_and_the_allowed_audiences_fix() -> None:
    found = diagnose(sts("invalid_grant", "The audience in ID Token [https://wrong] does not match ..."), FACTS)
    assert "[https://wrong]" in found.cause
    assert ("gcloud iam workload-identity-pools providers update-oidc prov --workload-identity-pool=pool "
            "--location=global --project=123456789012 --allowed-audiences=https://wrong") in found.fix


def test_invalid_target_with_another_project_number_is_a_wrong_project_number() -> None:
    facts = ChainFacts(audience=AUDIENCE.replace("123456789012", "42"), source_kind="kubernetes", project_id="p",
                       configured_project_number="123456789012")
    found = diagnose(sts("invalid_target", INVALID_TARGET), facts)
    assert found.code == "sts.wrong_project_number"
    assert found.fix.startswith("gcloud projects describe p --format='value(projectNumber)'")


def test_a_project_id_audience_is_a_wrong_project_number_even_without_a_configured_number() -> None:
    facts = ChainFacts(audience=AUDIENCE.replace("123456789012", "my-project"), source_kind="kubernetes")
    assert diagnose(sts("invalid_request", INVALID_AUDIENCE), facts).code == "sts.wrong_project_number"


def test_the_principal_to_grant_is_the_pool_and_the_tokens_subject() -> None:
    found = diagnose(error("iam", permission_denied("iam.serviceAccounts.getAccessToken")), FACTS)
    principal = f"principal://iam.googleapis.com/{POOL}/subject/system:serviceaccount:ns:app"
    assert found.fix == (f"gcloud iam service-accounts add-iam-policy-binding {SA} "
                         f"--role=roles/iam.workloadIdentityUser --member={principal}")


def test_with_the_google_source_a_403_is_a_missing_token_creator_grant() -> None:
    facts = ChainFacts(audience="", source_kind="google", service_account=SA)
    found = diagnose(error("iam", permission_denied("iam.serviceAccounts.getAccessToken")), facts)
    assert found.code == "iam.token_creator_missing"
    assert "--role=roles/iam.serviceAccountTokenCreator" in found.fix


def test_the_iam_credentials_api_turned_off_is_told_to_be_enabled() -> None:
    # What Google answers when iamcredentials.googleapis.com is not enabled (reason SERVICE_DISABLED).
    body: dict[str, Any] = rpc_error_body(403, "IAM Service Account Credentials API has not been used in project "
                                          "123 before or it is disabled.",
                                          details=[error_info("SERVICE_DISABLED", "googleapis.com",
                                                              {"service": "iamcredentials.googleapis.com"})])
    upstream = UpstreamError(service="iam", url="https://x.test", status=403, body=body, retryable=False)
    found = diagnose(upstream, FACTS)
    assert found.code == "iam.api_disabled"
    assert found.fix == "gcloud services enable iamcredentials.googleapis.com --project=p"


def test_no_answer_at_all_is_an_egress_problem() -> None:
    upstream = UpstreamError(service="sts", url="https://sts.test", status=0, body="refused", retryable=True)
    found = diagnose(upstream, FACTS)
    assert found.code == "sts.unreachable" and "HTTP(S)_PROXY" in found.fix


def test_the_default_sts_error_of_a_status_is_not_mistaken_for_a_cause() -> None:
    upstream = error("sts", HttpResponse(status=401, body=str(default_sts_error_body(401)).encode()))
    assert diagnose(upstream, FACTS).code == "sts.refused"
