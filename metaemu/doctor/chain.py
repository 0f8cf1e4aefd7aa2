"""The credential chain, one step at a time, over the product's own pieces: the configured source
(``build_source``), ``StsClient``, ``IamCredentialsClient`` and ``Pipeline`` (issue #14).

Steps, in order: ``subject token`` (present, decoded, unexpired, aimed at the provider), ``sts
exchange``, ``impersonation``. Each appends a ``Check``; the first failure stops the chain and every
later step is recorded as not run. Exchanges are made exactly as ``serve`` makes them (the same
scopes rule, UP-02), so a step that passes here passes there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from metaemu.clock import Clock
from metaemu.config import Config
from metaemu.credentials.impersonation import IamCredentialsClient
from metaemu.credentials.pipeline import Identity, Pipeline
from metaemu.credentials.sources import FederatedTokenProvider, SourceContext, SubjectTokenSource, build_source
from metaemu.credentials.sts import StsClient
from metaemu.credentials.tokens import FederatedToken, SubjectToken
from metaemu.credentials.upstream import UpstreamCaller
from metaemu.doctor.diagnosis import ChainFacts, diagnose
from metaemu.doctor.report import Check, Report
from metaemu.doctor.subject import aimed_at, describe
from metaemu.errors import CredentialError, UpstreamError
from metaemu.metrics import create_metrics
from metaemu.server.app import sidecar_impersonation
from metaemu.transport import HttpClient

STEPS = ("subject token", "sts exchange", "impersonation")


@dataclass(frozen=True, slots=True, kw_only=True)
class Chain:
    """One identity's chain: what ``serve`` (or the node agent, for one pod) would run."""

    identity: Identity
    source: SubjectTokenSource
    sts: StsClient
    iam: IamCredentialsClient
    facts: ChainFacts


def upstream_clients(config: Config, *, http: HttpClient, clock: Clock) -> tuple[StsClient, IamCredentialsClient]:
    metrics = create_metrics()  # one run: nothing scrapes them, UpstreamCaller wants them
    timeout = config.endpoints.timeout_seconds
    sts = StsClient(caller=UpstreamCaller(http=http, metrics=metrics, backend="sts"), url=config.endpoints.sts,
                    clock=clock, timeout_s=timeout)
    iam = IamCredentialsClient(caller=UpstreamCaller(http=http, metrics=metrics, backend="iam"),
                               base_url=config.endpoints.iam_credentials, clock=clock, timeout_s=timeout)
    return sts, iam


def sidecar_chain(config: Config, *, http: HttpClient, clock: Clock) -> Chain:
    """The chain ``serve`` assembles in sidecar mode; raises ``ConfigError`` as ``serve`` would."""
    wi = config.workload_identity
    assert wi is not None
    source = build_source(wi.source, SourceContext(clock=clock, http=http, metrics=create_metrics(),
                                                   audience=wi.audience, service_account=wi.service_account))
    impersonation = sidecar_impersonation(wi, source)
    sts, iam = upstream_clients(config, http=http, clock=clock)
    identity = Identity(audience=wi.audience, service_account=impersonation.service_account if impersonation else None,
                        delegates=impersonation.delegates if impersonation else (), default_scopes=wi.scopes,
                        lifetime_s=wi.token_lifetime_seconds)
    facts = ChainFacts(audience=wi.audience, source_kind=source.kind, service_account=identity.service_account,
                       project_id=config.project_id, configured_project_number=config.numeric_project_id)
    return Chain(identity=identity, source=source, sts=sts, iam=iam, facts=facts)


async def run_chain(report: Report, chain: Chain, *, clock: Clock) -> None:
    """Append the chain's steps to ``report``, stopping at the first broken one."""
    steps = iter(STEPS)
    facts = chain.facts
    if isinstance(chain.source, FederatedTokenProvider):
        next(steps), next(steps)
        federated = await _google_credentials(report, chain.source, facts)
    else:
        next(steps)
        subject = await _subject_step(report, chain.source, facts, clock=clock)
        federated = None
        if subject is not None:
            token, facts = subject
            next(steps)
            pipeline = Pipeline(identity=chain.identity, source=_Fetched(token, chain.source.kind), sts=chain.sts,
                                iam=chain.iam)
            federated = await _sts_step(report, pipeline, facts, clock=clock)
    if federated is not None:
        next(steps)
        pipeline = Pipeline(identity=chain.identity, source=chain.source, sts=chain.sts, iam=chain.iam)
        await _impersonation_step(report, pipeline, federated, facts, clock=clock)
    for name in steps:
        report.not_run(name)


async def _subject_step(report: Report, source: SubjectTokenSource, facts: ChainFacts, *,
                        clock: Clock) -> tuple[SubjectToken, ChainFacts] | None:
    name = "subject token"
    try:
        token = await source.fetch()
    except CredentialError as exc:
        report.add(_failure(name, f"the {source.kind} source produced no token", exc, facts,
                            fix=_source_fix(source.kind)))
        return None
    now = clock.now()
    seen = describe(token, now=now)
    details = seen.details(now)
    facts = replace(facts, subject=seen.subject, issuer=seen.issuer, token_audiences=seen.audiences)
    if seen.problem is not None:
        report.add(Check(name=name, status="fail", summary=seen.problem, details=details,
                         diagnosis="subject.expired" if "expired" in seen.problem else "subject.invalid",
                         fix=_source_fix(source.kind)))
        return None
    if not aimed_at(seen, facts.audience):
        report.add(Check(name=name, status="warn", summary=f"{source.kind}: the token's audience is not "
                         f"{facts.audience} (fine only if the provider lists it in its allowed audiences)",
                         details=details, diagnosis="subject.audience"))
    else:
        report.add(Check(name=name, status="ok", summary=f"{source.kind}: present and unexpired", details=details))
    return token, facts


async def _sts_step(report: Report, pipeline: Pipeline, facts: ChainFacts, *, clock: Clock) -> FederatedToken | None:
    try:
        federated = await pipeline.federated_token()
    except CredentialError as exc:
        report.add(_failure("sts exchange", "Google STS refused the exchange", exc, facts))
        return None
    report.add(Check(name="sts exchange", status="ok", summary=f"federated token for {facts.principal}",
                     details={"expires_in": f"{federated.expires_in(clock.now())} s"}))
    return federated


async def _google_credentials(report: Report, source: FederatedTokenProvider,
                              facts: ChainFacts) -> FederatedToken | None:
    try:
        federated = await source.federated_token()
    except CredentialError as exc:
        report.add(_failure("subject token", "your Google credentials produced no access token", exc, facts,
                            fix="gcloud auth application-default login"))
        return None
    report.add(Check(name="subject token", status="ok", summary="google: your own credentials give an access "
                     "token (no STS exchange)"))
    return federated


async def _impersonation_step(report: Report, pipeline: Pipeline, federated: FederatedToken, facts: ChainFacts, *,
                              clock: Clock) -> None:
    if not pipeline.impersonates:
        report.add(Check(name="impersonation", status="skip", summary="no service account configured: apps get "
                         "the federated token (email PROJECT_ID.svc.id.goog)"))
        return
    account = pipeline.identity.service_account
    try:
        token = await pipeline.access_token((), federated=federated)
    except CredentialError as exc:
        report.add(_failure("impersonation", f"IAM Credentials refused a token for {account}", exc, facts))
        return
    report.add(Check(name="impersonation", status="ok", summary=f"access token for {account}",
                     details={"expires_in": f"{token.expires_in(clock.now())} s"}))


def _failure(name: str, summary: str, exc: CredentialError, facts: ChainFacts, *, fix: str | None = None) -> Check:
    if isinstance(exc, UpstreamError):
        found = diagnose(exc, facts)
        return Check(name=name, status="fail", summary=summary, diagnosis=found.code, cause=found.cause,
                     fix=found.fix, upstream=exc.reason)
    return Check(name=name, status="fail", summary=summary, cause=exc.reason, fix=fix,
                 diagnosis=f"{name.split()[0]}.unavailable")


def _source_fix(kind: str) -> str:
    if kind in ("kubernetes", "file", "tokenrequest"):
        return ("mount a serviceAccountToken projection (audience = the provider, expirationSeconds <= 48 h) at "
                "workload_identity.source.token_file; kubelet rewrites it before it expires")
    return f"check workload_identity.source (type {kind}) against the README's section for it"


class _Fetched:
    """A source that hands out the one token the subject step already read and judged, so the STS
    step exchanges exactly that token."""

    def __init__(self, token: SubjectToken, kind: str) -> None:
        self._token = token
        self.kind = kind

    async def fetch(self) -> SubjectToken:
        return self._token
