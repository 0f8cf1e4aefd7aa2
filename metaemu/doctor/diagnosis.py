"""An upstream refusal mapped to its cause and the exact fix (issue #14).

Input: an ``UpstreamError`` from STS (RFC 6749 body), IAM Credentials (AIP-193 body) or the
Kubernetes API, plus ``ChainFacts`` (what the configuration and the decoded subject token say).
Output: a ``Diagnosis``. The codes branch on attributes (service, HTTP status, RFC 6749 ``error``,
AIP-193 ``status`` and ``ErrorInfo.reason``). Within STS's ``invalid_grant`` Google says *which*
check failed only in ``error_description``, so that one code is classified by the documented
wording (``fake_google_jwt`` words them as STS does; upstream.md §1.3):

    invalid_target                        provider mismatch, or a wrong project number
    invalid_request "Invalid value for \\"audience\\""  a project ID where the number belongs
                                          (google-github-actions/auth#60)
    unauthorized_client                   the provider's attribute condition (circleci-docs#8541)
    invalid_grant "The audience in ID Token ..."   audience mismatch
    invalid_grant "The issuer in ID Token ..."     issuer mismatch
    invalid_grant signature / kid / JWKS           the provider's keys are not the issuer's
    invalid_grant expired / 48 hours               token lifetime
    IAM 403 IAM_PERMISSION_DENIED         roles/iam.workloadIdentityUser missing (the principal to grant)
    IAM 404                               no such service account
    IAM 400 FAILED_PRECONDITION           the service account is disabled
    IAM 403 SERVICE_DISABLED              the IAM Credentials API is off in the project

Not owned here: running the steps (``chain``), rendering (``report``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from metaemu.errors import UpstreamError

WORKLOAD_IDENTITY_USER = "roles/iam.workloadIdentityUser"
TOKEN_CREATOR = "roles/iam.serviceAccountTokenCreator"
_PROVIDER = re.compile(r"^//iam\.googleapis\.com/(?P<pool>projects/(?P<project>[^/]+)/locations/global/"
                       r"workloadIdentityPools/(?P<pool_id>[^/]+))/providers/(?P<provider>[^/]+)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainFacts:
    """What the doctor knows besides upstream's answer."""

    audience: str
    source_kind: str
    service_account: str | None = None
    project_id: str | None = None
    #: ``numeric_project_id`` as configured by the user (None when derived from the audience).
    configured_project_number: str | None = None
    subject: str | None = None
    issuer: str | None = None
    token_audiences: tuple[str, ...] = ()

    @property
    def principal(self) -> str:
        """The federated principal under the default mapping ``google.subject=assertion.sub``."""
        match = _PROVIDER.match(self.audience)
        pool = match["pool"] if match else "projects/N/locations/global/workloadIdentityPools/POOL"
        return f"principal://iam.googleapis.com/{pool}/subject/{self.subject or 'SUBJECT'}"

    def provider_flags(self) -> str:
        match = _PROVIDER.match(self.audience)
        if match is None:
            return "PROVIDER --workload-identity-pool=POOL --location=global"
        return (f"{match['provider']} --workload-identity-pool={match['pool_id']} --location=global "
                f"--project={match['project']}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Diagnosis:
    code: str
    cause: str
    fix: str


def diagnose(error: UpstreamError, facts: ChainFacts) -> Diagnosis:
    if error.status == 0:
        return Diagnosis(code=f"{error.service}.unreachable", cause=f"{error.service} could not be reached "
                         f"({error.url})", fix="allow egress to sts.googleapis.com and iamcredentials.googleapis.com "
                         "(firewall, DNS); metaemu does not use HTTP(S)_PROXY; check endpoints.* in the config")
    if error.service == "sts":
        return _sts(error, facts)
    if error.service == "iam":
        return _iam(error, facts)
    if error.service == "k8s":
        return _k8s(error)
    return _generic(error)


def _sts(error: UpstreamError, facts: ChainFacts) -> Diagnosis:
    code, description = error.error_code, _description(error.body)
    if code == "invalid_target":
        return _wrong_project(facts) or Diagnosis(
            code="sts.provider_mismatch", cause=f"no enabled workload identity provider is named {facts.audience}",
            fix=f"gcloud iam workload-identity-pools providers describe {facts.provider_flags()}\n"
                "then set workload_identity.audience (node.audience) to its exact name, or undelete/enable the "
                "pool and provider")
    if code == "invalid_request" and "audience" in description:
        return _wrong_project(facts) or Diagnosis(
            code="sts.audience_malformed", cause="the audience is not a provider's full resource name",
            fix="use //iam.googleapis.com/projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/P")
    if code == "unauthorized_client":
        return Diagnosis(code="sts.attribute_condition", cause="the provider's attribute condition rejects this "
                         f"token (sub {facts.subject!r}, iss {facts.issuer!r})",
                         fix=f"gcloud iam workload-identity-pools providers describe {facts.provider_flags()} "
                         "--format='value(attributeCondition)'\nthen widen the condition (update-oidc "
                         "--attribute-condition=...) or run the workload as an identity it admits")
    if code == "invalid_grant":
        return _invalid_grant(description, facts)
    return _generic(error)


def _invalid_grant(description: str, facts: ChainFacts) -> Diagnosis:
    text = description.lower()
    flags = facts.provider_flags()
    if "audience" in text:
        shown = ", ".join(facts.token_audiences) or "(none)"
        return Diagnosis(code="sts.audience_mismatch", cause=f"the token's audience [{shown}] is not one the "
                         f"provider allows ({facts.audience} by default)",
                         fix=f"mint the token for audience {facts.audience} (the projected volume's audience), or\n"
                         f"gcloud iam workload-identity-pools providers update-oidc {flags} "
                         f"--allowed-audiences={','.join(facts.token_audiences) or 'AUDIENCE'}")
    if "issuer" in text:
        return Diagnosis(code="sts.issuer_mismatch", cause=f"the token's issuer {facts.issuer} is not the "
                         "provider's issuer URI",
                         fix=f"gcloud iam workload-identity-pools providers update-oidc {flags} "
                         f"--issuer-uri={facts.issuer or 'ISSUER'}")
    if any(word in text for word in ("signature", "kid", "jwks", "key")):
        return Diagnosis(code="sts.key_mismatch", cause="the provider cannot verify the token's signature: its "
                         "JWKS lacks the issuer's current key",
                         fix="kubectl get --raw /openid/v1/jwks > jwks.json\n"
                         f"gcloud iam workload-identity-pools providers update-oidc {flags} --jwk-json-path=jwks.json")
    if "expired" in text or "48 hours" in text or "future" in text or "not yet valid" in text:
        return Diagnosis(code="sts.token_lifetime", cause="STS judges the token's iat/exp invalid (expired, "
                         "from the future, or living 48 h or more)",
                         fix="check the clocks of this machine and the issuer; use a token lifetime under 48 h")
    return Diagnosis(code="sts.invalid_grant", cause="STS refused the subject token", fix="read upstream's reason "
                     "above; compare the token's issuer, subject and audience with the provider's settings")


def _wrong_project(facts: ChainFacts) -> Diagnosis | None:
    match = _PROVIDER.match(facts.audience)
    project = match["project"] if match else None
    configured = facts.configured_project_number
    if project is not None and project.isdigit() and (configured is None or configured == project):
        return None
    number = configured or "NUMBER"
    lookup = f"gcloud projects describe {facts.project_id or 'PROJECT_ID'} --format='value(projectNumber)'"
    return Diagnosis(code="sts.wrong_project_number", cause=f"the audience names project {project!r}, not the "
                     f"project number {number}" if configured else f"the audience names project {project!r}: "
                     "STS wants the project number there", fix=f"{lookup}\nthen put that number after projects/ in "
                     "the audience")


def _iam(error: UpstreamError, facts: ChainFacts) -> Diagnosis:
    sa = facts.service_account or "SERVICE_ACCOUNT"
    reason = _reason(error.body)
    if error.status == 403 and reason == "SERVICE_DISABLED":
        return Diagnosis(code="iam.api_disabled", cause="the IAM Service Account Credentials API is not enabled",
                         fix="gcloud services enable iamcredentials.googleapis.com "
                         f"--project={facts.project_id or 'PROJECT_ID'}")
    if error.status == 403 and reason != "ACCESS_TOKEN_SCOPE_INSUFFICIENT":
        if facts.source_kind == "google":
            return Diagnosis(code="iam.token_creator_missing", cause=f"your credentials may not mint tokens for {sa}",
                             fix=f"gcloud iam service-accounts add-iam-policy-binding {sa} --member=user:YOU "
                             f"--role={TOKEN_CREATOR}")
        return Diagnosis(code="iam.workload_identity_user_missing", cause=f"{facts.principal} may not impersonate "
                         f"{sa} (or the account does not exist)",
                         fix=f"gcloud iam service-accounts add-iam-policy-binding {sa} --role={WORKLOAD_IDENTITY_USER} "
                         f"--member={facts.principal}")
    if error.status == 404:
        return Diagnosis(code="iam.service_account_not_found", cause=f"no service account {sa} exists",
                         fix=f"gcloud iam service-accounts describe {sa}; correct the email (service_account or the "
                         "iam.gke.io/gcp-service-account annotation)")
    if error.status == 400 and error.error_code == "FAILED_PRECONDITION":
        return Diagnosis(code="iam.service_account_disabled", cause=f"the service account {sa} is disabled",
                         fix=f"gcloud iam service-accounts enable {sa}")
    return _generic(error)


def _k8s(error: UpstreamError) -> Diagnosis:
    if error.status in (401, 403):
        return Diagnosis(code="k8s.forbidden", cause="the Kubernetes API refused this identity",
                         fix="run the doctor with the agent's kubeconfig/service account; apply manifests/node's "
                         "RBAC and admission policy (their audience and lifetime must equal node.*)")
    if error.status == 404:
        return Diagnosis(code="k8s.not_found", cause="the Kubernetes object does not exist", fix="check the "
                         "namespace and name")
    return _generic(error)


def _generic(error: UpstreamError) -> Diagnosis:
    transient = error.retryable
    return Diagnosis(code=f"{error.service}.{'transient' if transient else 'refused'}",
                     cause=f"{error.service} answered {error.status}" + (" (transient)" if transient else ""),
                     fix="retry in a minute" if transient else "read upstream's reason above")


def _description(body: Any) -> str:
    if isinstance(body, dict):
        text = body.get("error_description")
        if isinstance(text, str):
            return text
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
    return body if isinstance(body, str) else ""


def _reason(body: Any) -> str | None:
    err = body.get("error") if isinstance(body, dict) else None
    details = err.get("details") if isinstance(err, dict) else None
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and isinstance(detail.get("reason"), str):
            return str(detail["reason"])
    return None
