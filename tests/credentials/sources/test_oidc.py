"""The ``oidc`` source against a ServiceAuthCentral stand-in: configuration, the UP-17 request and
response shapes, caching until shortly before expiry with single-flight, error mapping of RFC 6749 and
SAC bodies (permanent denials, transient outages), secrets kept out of logs, reprs and errors, and the
whole server end to end (upstream.md §7, UP-17, UP-18)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import jwt
import pytest

from metaemu.config import parse_config
from metaemu.credentials.sources import SourceContext, build_source
from metaemu.credentials.sources.config import parse_source
from metaemu.credentials.sources.oidc import OidcSource, OidcSourceConfig
from metaemu.credentials.tokens import JWT_TOKEN_TYPE
from metaemu.errors import ConfigError, SourceError, UpstreamError
from metaemu.metrics import Metrics
from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_clock import DEFAULT_START, FakeClock, settle
from metaemu.testing.fake_google_sts import WorkloadIdentityProvider
from metaemu.testing.fake_issuer import FakeIssuer
from metaemu.testing.fake_oauth import JWT_BEARER_GRANT, FakeOAuth, JwtBearerTrust, sac_error_body
from metaemu.testing.inprocess import Handler
from metaemu.testing.world import AUDIENCE, CLUSTER_ISSUER, SERVICE_ACCOUNT, World
from metaemu.transport import HttpRequest, HttpResponse, TransportFailure
from tests.credentials.support import json_reply
from tests.helpers import SA_PATH, Mds, sample

SAC_HOST = "sac.test"
TOKEN_URL = f"https://{SAC_HOST}/v1/token"
CLIENT = "payments-worker"
SECRET = "Zx9-very-secret-client-secret-Qw7"
ASSERTION_SUB = "system:serviceaccount:prod:payments"
ASSERTION_AUD = "serviceauthcentral"


class Router:
    """``HttpClient`` sending each request to the stand-in for its host; a host in ``down`` (or
    without a route) fails as a refused connection would."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = routes
        self.down: set[str] = set()

    async def send(self, request: HttpRequest) -> HttpResponse:
        host = urlsplit(request.url).hostname or ""
        handler = self.routes.get(host)
        if handler is None or host in self.down:
            raise TransportFailure(request.url, "ClientConnectorError: Connection refused")
        return await handler(request)


@pytest.fixture
def sac(clock: FakeClock, world: World) -> FakeOAuth:
    """SAC with a client that may get tokens for the WIF provider, trusted by the fake Google."""
    sac = FakeOAuth(issuer=f"https://{SAC_HOST}", clock=clock)
    trust = JwtBearerTrust(issuer=CLUSTER_ISSUER, subject=ASSERTION_SUB, audience=ASSERTION_AUD,
                           jwks=world.issuer.jwks())
    sac.add_client(CLIENT, secret=SECRET, jwt_bearer=[trust])
    sac.add_client(AUDIENCE)  # SAC audiences are client ids; //iam.googleapis.com/... is a valid one
    sac.authorize(CLIENT, AUDIENCE)
    world.google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=sac.issuer, jwks=sac.jwks()))
    world.google.grant(SERVICE_ACCOUNT, world.google.principal_for(AUDIENCE, CLIENT))
    return sac


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "client-secret"
    path.write_text(SECRET + "\n")
    return path


@pytest.fixture
def assertion_file(tmp_path: Path, world: World) -> Path:
    path = tmp_path / "sac-token"
    path.write_text(world.issuer.mint(sub=ASSERTION_SUB, audience=[ASSERTION_AUD]))
    return path


@pytest.fixture
def router(sac: FakeOAuth, world: World) -> Router:
    return Router({SAC_HOST: sac.handle, "sts.googleapis.test": world.google.handle,
                   "iamcredentials.test": world.google.handle})


def cc_config(secret_file: Path, **overrides: object) -> OidcSourceConfig:
    fields: dict[str, object] = {"token_url": TOKEN_URL, "client_id": CLIENT, "grant_type": "client_credentials",
                                 "client_secret_file": secret_file, **overrides}
    return OidcSourceConfig(**fields)  # type: ignore[arg-type]


def make_source(config: OidcSourceConfig, *, clock: FakeClock, http: Router, metrics: Metrics) -> OidcSource:
    source = build_source(config, SourceContext(clock=clock, http=http, metrics=metrics, audience=AUDIENCE))
    assert isinstance(source, OidcSource)
    return source


# ---------------------------------------------------------------- configuration


def test_parses_a_client_credentials_source_relative_to_the_config_file(tmp_path: Path) -> None:
    config = parse_source({"type": "oidc", "token_url": TOKEN_URL, "client_id": CLIENT,
                           "grant_type": "client_credentials", "client_secret_file": "secret",
                           "scope": ["read", "write"]}, prefix="workload_identity.source.", base_dir=tmp_path)
    assert config == OidcSourceConfig(token_url=TOKEN_URL, client_id=CLIENT, grant_type="client_credentials",
                                      client_secret_file=tmp_path / "secret", scope="read write")


def test_parses_a_jwt_bearer_source_with_its_own_audience(tmp_path: Path) -> None:
    config = parse_source({"type": "oidc", "token_url": TOKEN_URL, "client_id": CLIENT, "grant_type": "jwt_bearer",
                           "assertion_file": "/var/run/secrets/sac/token", "audience": "api"},
                          prefix="workload_identity.source.", base_dir=tmp_path)
    assert isinstance(config, OidcSourceConfig)
    assert (config.assertion_file, config.audience) == (Path("/var/run/secrets/sac/token"), "api")


@pytest.mark.parametrize(("raw", "key"), [
    ({"client_id": CLIENT, "grant_type": "client_credentials", "client_secret_file": "s"}, "token_url"),
    ({"token_url": "ftp://x", "client_id": CLIENT, "grant_type": "client_credentials",
      "client_secret_file": "s"}, "token_url"),
    ({"token_url": TOKEN_URL, "grant_type": "client_credentials", "client_secret_file": "s"}, "client_id"),
    ({"token_url": TOKEN_URL, "client_id": CLIENT, "grant_type": "password", "client_secret_file": "s"},
     "grant_type"),
    ({"token_url": TOKEN_URL, "client_id": CLIENT, "grant_type": "client_credentials"}, "client_secret_file"),
    ({"token_url": TOKEN_URL, "client_id": CLIENT, "grant_type": "jwt_bearer", "assertion_file": "a",
      "client_secret_file": "s"}, "client_secret_file"),
    ({"token_url": TOKEN_URL, "client_id": CLIENT, "grant_type": "jwt_bearer"}, "assertion_file"),
    ({"token_url": TOKEN_URL, "client_id": CLIENT, "grant_type": "client_credentials", "client_secret_file": "s",
      "client_secret": SECRET}, "client_secret"),
    ({"token_url": TOKEN_URL, "client_id": CLIENT, "grant_type": "client_credentials", "client_secret_file": "s",
      "scope": 3}, "scope"),
])
def test_configuration_errors_name_the_key(tmp_path: Path, raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_source({"type": "oidc", **raw}, prefix="workload_identity.source.", base_dir=tmp_path)
    assert err.value.key == f"workload_identity.source.{key}"
    assert SECRET not in str(err.value)


# ---------------------------------------------------------------- requests and responses (UP-17)


async def test_client_credentials_request_is_form_encoded_with_sacs_fields_up17(
        sac: FakeOAuth, router: Router, secret_file: Path, clock: FakeClock, metrics: Metrics) -> None:
    source = make_source(cc_config(secret_file), clock=clock, http=router, metrics=metrics)
    subject = await source.fetch()
    recorded = sac.requests[-1]
    assert recorded.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert "Authorization" not in recorded.headers
    assert dict(recorded.form) == {"grant_type": "client_credentials", "client_id": CLIENT,
                                   "client_secret": SECRET, "audience": AUDIENCE}
    claims = jwt.decode(subject.value, options={"verify_signature": False})
    assert (claims["iss"], claims["sub"], claims["aud"]) == (sac.issuer, CLIENT, AUDIENCE)
    assert subject.token_type == JWT_TOKEN_TYPE
    assert subject.expiry == DEFAULT_START + dt.timedelta(hours=1)
    assert source.kind == "oidc"


async def test_jwt_bearer_request_sends_the_assertion_file_up17(
        sac: FakeOAuth, router: Router, assertion_file: Path, clock: FakeClock, metrics: Metrics) -> None:
    config = OidcSourceConfig(token_url=TOKEN_URL, client_id=CLIENT, grant_type="jwt_bearer",
                              assertion_file=assertion_file)
    assertion = await asyncio.to_thread(assertion_file.read_text)
    subject = await make_source(config, clock=clock, http=router, metrics=metrics).fetch()
    assert dict(sac.requests[-1].form) == {"grant_type": JWT_BEARER_GRANT, "client_id": CLIENT,
                                           "assertion": assertion, "audience": AUDIENCE}
    assert jwt.decode(subject.value, options={"verify_signature": False})["sub"] == CLIENT


async def test_configured_audience_and_scope_are_sent(
        sac: FakeOAuth, router: Router, secret_file: Path, clock: FakeClock, metrics: Metrics) -> None:
    sac.add_client("api", scopes=["read"])
    sac.authorize(CLIENT, "api", scopes=["read"])
    source = make_source(cc_config(secret_file, audience="api", scope="read"), clock=clock, http=router,
                         metrics=metrics)
    claims = jwt.decode((await source.fetch()).value, options={"verify_signature": False})
    assert (sac.requests[-1].form["audience"], sac.requests[-1].form["scope"]) == ("api", "read")
    assert (claims["aud"], claims["scope"]) == ("api", "read")


@pytest.mark.parametrize(("expires_in", "expected_s"), [(3600, 3600), ("1800", 1800), (None, 3600), (7200, 3600)])
async def test_expiry_is_the_earlier_of_exp_and_expires_in_up17(
        world: World, clock: FakeClock, metrics: Metrics, secret_file: Path, expires_in: object,
        expected_s: int) -> None:
    issuer = FakeIssuer(issuer="https://idp", clock=clock)
    payload: dict[str, object] = {"access_token": issuer.mint(sub=CLIENT, audience=AUDIENCE), "token_type": "Bearer"}
    if expires_in is not None:
        payload["expires_in"] = expires_in

    async def reply(_: HttpRequest) -> HttpResponse:
        return json_reply(payload)

    source = make_source(cc_config(secret_file), clock=clock, http=Router({SAC_HOST: reply}), metrics=metrics)
    assert (await source.fetch()).expiry == DEFAULT_START + dt.timedelta(seconds=expected_s)


async def test_an_opaque_access_token_is_refused_permanently(
        clock: FakeClock, metrics: Metrics, secret_file: Path) -> None:
    async def reply(_: HttpRequest) -> HttpResponse:
        return json_reply({"access_token": "opaque-abc", "token_type": "Bearer", "expires_in": 3600})

    source = make_source(cc_config(secret_file), clock=clock, http=Router({SAC_HOST: reply}), metrics=metrics)
    with pytest.raises(SourceError) as err:
        await source.fetch()
    assert err.value.permanent
    assert "not a JWT" in err.value.reason and "opaque-abc" not in err.value.reason


# ---------------------------------------------------------------- caching and single flight


async def test_the_token_is_cached_until_ten_percent_of_its_lifetime_remains(
        sac: FakeOAuth, router: Router, secret_file: Path, clock: FakeClock, metrics: Metrics) -> None:
    source = make_source(cc_config(secret_file), clock=clock, http=router, metrics=metrics)
    first = await source.fetch()
    clock.advance(54 * 60 - 1)  # 1 h token: refreshed once < 360 s are left
    assert (await source.fetch()).value == first.value
    assert sac.calls["token"] == 1
    clock.advance(1)
    assert (await source.fetch()).value != first.value
    assert sac.calls["token"] == 2


async def test_a_short_lived_token_keeps_at_least_a_minute_of_margin(
        sac: FakeOAuth, router: Router, secret_file: Path, clock: FakeClock, metrics: Metrics) -> None:
    sac.token_lifetime_s = 300
    source = make_source(cc_config(secret_file), clock=clock, http=router, metrics=metrics)
    await source.fetch()
    clock.advance(239)
    await source.fetch()
    assert sac.calls["token"] == 1
    clock.advance(1)
    await source.fetch()
    assert sac.calls["token"] == 2


async def test_concurrent_fetches_share_one_request(
        sac: FakeOAuth, router: Router, secret_file: Path, clock: FakeClock, metrics: Metrics) -> None:
    source = make_source(cc_config(secret_file), clock=clock, http=router, metrics=metrics)
    release = sac.stall()
    fetches = [asyncio.ensure_future(source.fetch()) for _ in range(50)]
    for _ in range(200):  # the first fetch reads the secret in a worker thread, then reaches the stall
        if sac.calls["token"]:
            break
        await asyncio.sleep(0.005)
    release.set()
    tokens = await asyncio.gather(*fetches)
    assert sac.calls["token"] == 1
    assert len({t.value for t in tokens}) == 1


async def test_callers_queued_behind_a_failed_request_share_its_error(
        sac: FakeOAuth, router: Router, secret_file: Path, clock: FakeClock, metrics: Metrics) -> None:
    source = make_source(cc_config(secret_file), clock=clock, http=router, metrics=metrics)
    sac.fail(status=503, times=1)
    release = sac.stall()
    fetches = [asyncio.ensure_future(source.fetch()) for _ in range(10)]
    for _ in range(200):
        if sac.calls["token"]:
            break
        await asyncio.sleep(0.005)
    release.set()
    results = await asyncio.gather(*fetches, return_exceptions=True)
    assert all(isinstance(r, UpstreamError) and r.status == 503 for r in results)
    assert sac.calls["token"] == 1
    assert (await source.fetch()).value  # a later call tries again


async def test_the_secret_and_assertion_files_are_re_read_for_each_request(
        sac: FakeOAuth, router: Router, tmp_path: Path, world: World, clock: FakeClock, metrics: Metrics) -> None:
    secret = tmp_path / "secret"
    secret.write_text("old-secret")
    sac.add_client(CLIENT, secret="old-secret")
    sac.authorize(CLIENT, AUDIENCE)
    source = make_source(cc_config(secret), clock=clock, http=router, metrics=metrics)
    await source.fetch()
    sac.add_client(CLIENT, secret="rotated-secret")
    sac.authorize(CLIENT, AUDIENCE)
    secret.write_text("rotated-secret")
    clock.advance(3600)
    await source.fetch()
    assert [r.form["client_secret"] for r in sac.requests] == ["old-secret", "rotated-secret"]


# ---------------------------------------------------------------- errors


async def test_sac_denial_is_permanent_with_its_messages_in_the_reason_up17(
        sac: FakeOAuth, router: Router, secret_file: Path, clock: FakeClock, metrics: Metrics) -> None:
    sac.revoke(CLIENT, AUDIENCE)
    source = make_source(cc_config(secret_file), clock=clock, http=router, metrics=metrics)
    with pytest.raises(UpstreamError) as err:
        await source.fetch()
    e = err.value
    assert (e.service, e.status, e.permanent, e.error_code) == ("oidc", 403, True, "invalid_client")
    assert e.reason == "oidc returned 403: invalid_client: The client is not authorized for the specified audience."
    assert e.body == sac_error_body(403, "The client is not authorized for the specified audience.")
    assert sample(metrics, "metaemu_upstream_errors_total", backend="oidc", status="403") == 1


async def test_a_bad_secret_is_a_permanent_401_access_denied(
        sac: FakeOAuth, router: Router, tmp_path: Path, clock: FakeClock, metrics: Metrics) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-secret")
    with pytest.raises(UpstreamError) as err:
        await make_source(cc_config(wrong), clock=clock, http=router, metrics=metrics).fetch()
    assert (err.value.status, err.value.permanent) == (401, True)
    assert "access_denied: The request has invalid 'client_id' or 'client_secret." in err.value.reason
    assert "not-the-secret" not in err.value.reason


async def test_sac_details_and_rfc6749_descriptions_reach_the_reason(
        sac: FakeOAuth, router: Router, secret_file: Path, clock: FakeClock, metrics: Metrics) -> None:
    source = make_source(cc_config(secret_file), clock=clock, http=router, metrics=metrics)
    sac.fail(status=403, body=sac_error_body(403, "Invalid assertion jwt.", details="the assertion has expired"))
    with pytest.raises(UpstreamError) as sac_err:
        await source.fetch()
    assert sac_err.value.reason.endswith("invalid_client: Invalid assertion jwt.: (the assertion has expired)")
    sac.fail(status=400, body={"error": "invalid_client", "error_description": "Client authentication failed."})
    with pytest.raises(UpstreamError) as rfc_err:
        await source.fetch()
    assert rfc_err.value.reason == "oidc returned 400: invalid_client: Client authentication failed."
    assert rfc_err.value.permanent


async def test_an_issuer_that_echoes_the_secret_has_it_scrubbed(
        sac: FakeOAuth, router: Router, secret_file: Path, clock: FakeClock, metrics: Metrics) -> None:
    sac.fail(status=400, body={"error": "invalid_request", "error_description": f"bad client_secret={SECRET}"})
    with pytest.raises(UpstreamError) as err:
        await make_source(cc_config(secret_file), clock=clock, http=router, metrics=metrics).fetch()
    assert SECRET not in err.value.reason and SECRET not in json.dumps(err.value.body)
    assert "[REDACTED]" in err.value.reason


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_server_errors_and_throttling_are_transient(
        sac: FakeOAuth, router: Router, secret_file: Path, clock: FakeClock, metrics: Metrics, status: int) -> None:
    sac.fail(status=status)
    with pytest.raises(UpstreamError) as err:
        await make_source(cc_config(secret_file), clock=clock, http=router, metrics=metrics).fetch()
    assert (err.value.status, err.value.permanent) == (status, False)


async def test_a_non_json_answer_is_transient_with_its_text(
        sac: FakeOAuth, router: Router, secret_file: Path, clock: FakeClock, metrics: Metrics) -> None:
    source = make_source(cc_config(secret_file), clock=clock, http=router, metrics=metrics)
    sac.garbage()
    with pytest.raises(UpstreamError) as garbage:
        await source.fetch()
    assert (garbage.value.status, garbage.value.permanent) == (200, False)
    sac.fail(status=502, body="<html>Bad Gateway</html>")
    with pytest.raises(UpstreamError) as proxy:
        await source.fetch()
    assert proxy.value.reason == "oidc returned 502: <html>Bad Gateway</html>"
    assert not proxy.value.permanent


async def test_an_unreachable_issuer_is_transient_and_counted(
        router: Router, secret_file: Path, clock: FakeClock, metrics: Metrics) -> None:
    router.down.add(SAC_HOST)
    with pytest.raises(UpstreamError) as err:
        await make_source(cc_config(secret_file), clock=clock, http=router, metrics=metrics).fetch()
    assert (err.value.status, err.value.permanent) == (0, False)
    assert err.value.reason == "oidc unreachable: ClientConnectorError: Connection refused"
    assert sample(metrics, "metaemu_upstream_errors_total", backend="oidc", status="0") == 1


async def test_a_missing_secret_file_is_named_without_calling_the_issuer(
        sac: FakeOAuth, router: Router, tmp_path: Path, clock: FakeClock, metrics: Metrics) -> None:
    with pytest.raises(SourceError, match=r"client secret file .*/absent does not exist"):
        await make_source(cc_config(tmp_path / "absent"), clock=clock, http=router, metrics=metrics).fetch()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SourceError, match="is empty"):
        await make_source(cc_config(empty), clock=clock, http=router, metrics=metrics).fetch()
    assert sac.calls["token"] == 0


async def test_an_expired_assertion_is_refused_before_sending_it(
        sac: FakeOAuth, router: Router, tmp_path: Path, world: World, clock: FakeClock, metrics: Metrics) -> None:
    path = tmp_path / "assertion"
    path.write_text(world.issuer.mint(sub=ASSERTION_SUB, audience=ASSERTION_AUD, lifetime_s=600))
    config = OidcSourceConfig(token_url=TOKEN_URL, client_id=CLIENT, grant_type="jwt_bearer", assertion_file=path)
    clock.advance(601)
    with pytest.raises(SourceError, match="expired at"):
        await make_source(config, clock=clock, http=router, metrics=metrics).fetch()
    assert sac.calls["token"] == 0


async def test_a_forged_assertion_is_denied_by_the_issuer(
        sac: FakeOAuth, router: Router, tmp_path: Path, world: World, clock: FakeClock, metrics: Metrics) -> None:
    forger = FakeIssuer(issuer=CLUSTER_ISSUER, kid=world.issuer.kid, clock=clock)
    path = tmp_path / "assertion"
    path.write_text(forger.mint(sub=ASSERTION_SUB, audience=[ASSERTION_AUD]))
    config = OidcSourceConfig(token_url=TOKEN_URL, client_id=CLIENT, grant_type="jwt_bearer", assertion_file=path)
    with pytest.raises(UpstreamError) as err:
        await make_source(config, clock=clock, http=router, metrics=metrics).fetch()
    assert (err.value.status, err.value.permanent) == (403, True)
    assert "Invalid assertion jwt." in err.value.reason


async def test_reprs_never_show_the_secret_or_token(
        router: Router, secret_file: Path, clock: FakeClock, metrics: Metrics) -> None:
    source = make_source(cc_config(secret_file), clock=clock, http=router, metrics=metrics)
    subject = await source.fetch()
    for text in (repr(source), repr(subject), repr(cc_config(secret_file))):
        assert SECRET not in text and subject.value not in text


# ---------------------------------------------------------------- end to end


@contextlib.asynccontextmanager
async def oidc_server(world: World, router: Router, clock: FakeClock,
                      source: Mapping[str, object]) -> AsyncIterator[tuple[MetaemuServer, Mds]]:
    """metaemu with ``source``, its upstream calls routed to SAC and the fake Google in process."""
    raw = world.config(sts_url="http://sts.googleapis.test/v1/token", iam_url="http://iamcredentials.test/v1")
    raw["workload_identity"]["source"] = dict(source)
    config = parse_config(raw, hostname="node-1", base_dir=world.token_file.parent)
    async with MetaemuServer(config, clock=clock, http=router) as server:
        mds = Mds(server.metadata_url)
        try:
            await settle(50)
            yield server, mds
        finally:
            await mds.close()


def cc_source(secret_file: Path) -> dict[str, object]:
    return {"type": "oidc", "token_url": TOKEN_URL, "client_id": CLIENT, "grant_type": "client_credentials",
            "client_secret_file": str(secret_file)}


async def test_serves_access_and_id_tokens_from_a_sac_client_end_to_end(
        world: World, sac: FakeOAuth, router: Router, clock: FakeClock, secret_file: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with oidc_server(world, router, clock, cc_source(secret_file)) as (_, mds):
        token = await mds.get(SA_PATH + "token")
        identity = await mds.get(SA_PATH + "identity?audience=https://svc.example")
    assert token.status == 200, token.text
    info = world.google.token_info(json.loads(token.body)["access_token"])
    assert info is not None and info.email == SERVICE_ACCOUNT
    assert identity.status == 200
    assert jwt.decode(identity.text, options={"verify_signature": False})["aud"] == "https://svc.example"
    # UP-17 on the wire, and the SAC token is the STS subject token with the federated principal it implies
    assert dict(sac.requests[0].form) == {"grant_type": "client_credentials", "client_id": CLIENT,
                                          "client_secret": SECRET, "audience": AUDIENCE}
    sts = next(r for r in world.google.requests if r.endpoint == "sts")
    assert sts.form["subject_token_type"] == JWT_TOKEN_TYPE
    assert jwt.decode(sts.form["subject_token"], options={"verify_signature": False})["sub"] == CLIENT
    assert sac.calls["token"] == 1
    assert SECRET not in caplog.text and SECRET not in token.text and SECRET not in identity.text
    assert all(SECRET not in repr(vars(record)) for record in caplog.records)


async def test_jwt_bearer_with_a_projected_token_end_to_end(
        world: World, sac: FakeOAuth, router: Router, clock: FakeClock, assertion_file: Path) -> None:
    source = {"type": "oidc", "token_url": TOKEN_URL, "client_id": CLIENT, "grant_type": "jwt_bearer",
              "assertion_file": str(assertion_file)}
    async with oidc_server(world, router, clock, source) as (_, mds):
        token = await mds.get(SA_PATH + "token")
    assert token.status == 200, token.text
    assert sac.requests[0].form["grant_type"] == JWT_BEARER_GRANT


async def test_issuer_down_is_503_with_the_reason_and_counted(
        world: World, sac: FakeOAuth, router: Router, clock: FakeClock, secret_file: Path) -> None:
    router.down.add(SAC_HOST)
    async with oidc_server(world, router, clock, cc_source(secret_file)) as (server, mds):
        r = await mds.get(SA_PATH + "token")
        assert r.status == 503
        assert r.headers["Retry-After"]
        assert r.text == ("Unable to generate access token right now; oidc unreachable: ClientConnectorError: "
                          "Connection refused. Retry shortly.\n")
        assert sample(server.metrics, "metaemu_upstream_errors_total", backend="oidc", status="0") >= 1
        assert world.google.calls["sts"] == 0


async def test_invalid_client_is_403_with_sacs_messages(
        world: World, sac: FakeOAuth, router: Router, clock: FakeClock, secret_file: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    sac.revoke(CLIENT, AUDIENCE)
    caplog.set_level(logging.DEBUG)
    async with oidc_server(world, router, clock, cc_source(secret_file)) as (server, mds):
        r = await mds.get(SA_PATH + "token")
        assert r.status == 403
        assert r.text == ("Unable to generate access token; oidc returned 403: invalid_client: The client is not "
                          "authorized for the specified audience.\n")
        assert sample(server.metrics, "metaemu_upstream_errors_total", backend="oidc", status="403") >= 1
    reasons = [str(getattr(record, "reason", "")) for record in caplog.records]
    assert any("The client is not authorized for the specified audience." in reason for reason in reasons)
    assert all(SECRET not in repr(vars(record)) for record in caplog.records)
    assert SECRET not in r.text


async def test_a_forged_assertion_is_403_end_to_end(
        world: World, sac: FakeOAuth, router: Router, clock: FakeClock, tmp_path: Path) -> None:
    forged = tmp_path / "forged"
    forged.write_text(FakeIssuer(issuer=CLUSTER_ISSUER, kid=world.issuer.kid, clock=clock)
                      .mint(sub=ASSERTION_SUB, audience=[ASSERTION_AUD]))
    source = {"type": "oidc", "token_url": TOKEN_URL, "client_id": CLIENT, "grant_type": "jwt_bearer",
              "assertion_file": str(forged)}
    async with oidc_server(world, router, clock, source) as (_, mds):
        r = await mds.get(SA_PATH + "token")
    assert r.status == 403
    assert "oidc returned 403: invalid_client: Invalid assertion jwt." in r.text
    assert world.google.calls["sts"] == 0
