"""The subject token decoded for the doctor (never printed whole) and the two renderings (issue #14)."""

from __future__ import annotations

import datetime as dt
import json

from metaemu.credentials.tokens import AWS_TOKEN_TYPE, JWT_TOKEN_TYPE, SubjectToken
from metaemu.doctor.report import Check, Report, render_human, render_json
from metaemu.doctor.subject import aimed_at, describe
from metaemu.testing.fake_clock import DEFAULT_START
from metaemu.testing.fake_issuer import FakeIssuer

AUDIENCE = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x"


def test_a_kubernetes_token_is_described_by_its_claims_only() -> None:
    issuer = FakeIssuer(issuer="https://k.test", kid="k1")
    value = issuer.mint_kubernetes(namespace="ns", service_account="sa", audience=AUDIENCE, now=DEFAULT_START)
    facts = describe(SubjectToken(value=value, token_type=JWT_TOKEN_TYPE), now=DEFAULT_START)
    assert facts.problem is None
    details = facts.details(DEFAULT_START)
    assert details == {"type": "jwt", "issuer": "https://k.test", "subject": "system:serviceaccount:ns:sa",
                       "kid": "k1", "audience": AUDIENCE, "expires": "2026-11-22T06:00:00Z (in 3600 s)"}
    assert value.split(".")[2] not in json.dumps(details)
    assert aimed_at(facts, AUDIENCE) and not aimed_at(facts, AUDIENCE + "-other")


def test_an_expired_token_says_how_long_ago() -> None:
    issuer = FakeIssuer(issuer="https://k.test")
    value = issuer.mint(sub="s", audience=AUDIENCE, lifetime_s=60, now=DEFAULT_START)
    later = DEFAULT_START + dt.timedelta(seconds=90)
    facts = describe(SubjectToken(value=value, token_type=JWT_TOKEN_TYPE), now=later)
    assert facts.problem == "the subject token has expired"
    assert facts.details(later)["expires"].endswith("(30 s ago)")


def test_a_token_without_sub_or_a_non_jwt_is_a_problem() -> None:
    issuer = FakeIssuer(issuer="https://k.test")
    no_sub = issuer.mint(sub="s", audience=AUDIENCE, claims={"sub": None}, now=DEFAULT_START)
    assert describe(SubjectToken(value=no_sub, token_type=JWT_TOKEN_TYPE), now=DEFAULT_START).problem == (
        "the subject token has no sub claim (STS requires one)")
    garbage = describe(SubjectToken(value="not-a-jwt", token_type=JWT_TOKEN_TYPE), now=DEFAULT_START)
    assert garbage.problem is not None and garbage.problem.startswith("the subject token is not a JWT")


def test_an_aws_token_has_nothing_to_decode() -> None:
    facts = describe(SubjectToken(value="%7B%7D", token_type=AWS_TOKEN_TYPE), now=DEFAULT_START)
    assert facts.problem is None and facts.token_type.startswith("aws4_request")


def test_the_report_is_ok_only_without_a_failure_and_renders_both_ways() -> None:
    report = Report(mode="sidecar")
    assert not report.ok  # nothing ran: nothing works
    report.add(Check(name="config", status="ok", summary="valid"))
    report.add(Check(name="subject token", status="warn", summary="audience", details={"type": "jwt"}))
    assert report.ok
    report.add(Check(name="sts exchange", status="fail", summary="refused", diagnosis="sts.x", cause="c",
                     fix="line one\nline two", upstream="sts returned 400: e"))
    report.not_run("impersonation")
    assert not report.ok
    decoded = json.loads(render_json(report))
    assert decoded["ok"] is False and [c["status"] for c in decoded["checks"]] == ["ok", "warn", "fail", "skip"]
    assert decoded["checks"][2] == {"name": "sts exchange", "status": "fail", "summary": "refused", "details": {},
                                    "diagnosis": "sts.x", "cause": "c", "fix": "line one\nline two",
                                    "upstream": "sts returned 400: e"}
    human = render_human(report).splitlines()
    assert human[0] == "metaemu doctor (sidecar mode)"
    assert "[FAIL] sts exchange   refused" in human
    assert "         fix: line one" in human and "              line two" in human
    assert human[-1] == "metaemu doctor: the chain is broken: fix the first [FAIL] above and run again"
