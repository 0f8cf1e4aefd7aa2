"""The ``url`` and ``executable`` sources: parity with google-auth's ``credential_source.url``
(``identity_pool._UrlSupplier``) and executable-sourced credentials (``pluggable.Credentials``),
configured in YAML or through an ``external_account`` file (``--credential-config``, AIP-4117)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shlex
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from metaemu.config import load_config
from metaemu.credentials.sources import SourceContext, SubjectTokenSource, build_source
from metaemu.credentials.sources.config import SourceConfig, parse_source
from metaemu.credentials.sources.external import (
    ALLOW_EXECUTABLES_ENV,
    DEFAULT_TIMEOUT_MS,
    SAML2_TOKEN_TYPE,
    ExecutableSource,
    ExecutableSourceConfig,
    UrlSource,
    UrlSourceConfig,
)
from metaemu.credentials.tokens import ID_TOKEN_TYPE, JWT_TOKEN_TYPE
from metaemu.errors import ConfigError, SourceError, UpstreamError
from metaemu.metrics import Metrics
from metaemu.testing.fake_clock import DEFAULT_START, FakeClock
from metaemu.testing.fake_issuer import FakeIssuer
from metaemu.testing.world import AUDIENCE, SERVICE_ACCOUNT
from metaemu.transport import AiohttpClient
from tests.credentials.support import serve
from tests.helpers import sample

PREFIX = "workload_identity.source."
HEADER = "X-Identity-Token-Secret"
HEADER_VALUE = "hdr-secret-123"
EXPIRES = int(DEFAULT_START.timestamp()) + 3600
#: Errors name the program (argv[0]), never its arguments.
PROGRAM = Path(sys.executable).name


@pytest.fixture
def issuer(clock: FakeClock) -> FakeIssuer:
    return FakeIssuer(issuer="https://idp.example", clock=clock)


@pytest.fixture
def jwt_token(issuer: FakeIssuer) -> str:
    return issuer.mint(sub="workload", audience=AUDIENCE)


@pytest.fixture
async def http() -> AsyncIterator[AiohttpClient]:
    client = AiohttpClient()
    yield client
    await client.close()


@pytest.fixture
async def token_server(jwt_token: str, issuer: FakeIssuer) -> AsyncIterator[str]:
    """A local identity endpoint: text and JSON tokens behind a required header (like Azure IMDS)."""

    def authorized(request: web.Request) -> bool:
        return request.headers.get(HEADER) == HEADER_VALUE

    async def text(request: web.Request) -> web.Response:
        if not authorized(request):
            return web.json_response({"error": "missing header"}, status=400)
        return web.Response(text=jwt_token + "\n")

    async def as_json(request: web.Request) -> web.Response:
        if not authorized(request):
            return web.json_response({"error": "missing header"}, status=400)
        return web.json_response({"access_token": jwt_token, "expires_in": "3600"})

    async def expired(_: web.Request) -> web.Response:
        return web.Response(text=issuer.mint(sub="w", audience=AUDIENCE, now=DEFAULT_START - dt.timedelta(hours=2)))

    async def broken(_: web.Request) -> web.Response:
        return web.Response(status=503, text="identity service warming up")

    app = web.Application()
    app.router.add_get("/token", text)
    app.router.add_get("/token.json", as_json)
    app.router.add_get("/expired", expired)
    app.router.add_get("/broken", broken)
    async with serve(app) as base:
        yield base


def context(clock: FakeClock, metrics: Metrics, http: AiohttpClient | None = None) -> SourceContext:
    return SourceContext(clock=clock, http=http or AiohttpClient(), metrics=metrics, audience=AUDIENCE)


# ---------------------------------------------------------------- url


async def test_url_text_token_with_required_headers(
        token_server: str, http: AiohttpClient, clock: FakeClock, metrics: Metrics, jwt_token: str) -> None:
    config = parse_source({"type": "url", "url": f"{token_server}/token", "headers": {HEADER: HEADER_VALUE}},
                          prefix=PREFIX, base_dir=Path("."))
    source = build_source(config, context(clock, metrics, http))
    assert isinstance(source, UrlSource) and source.kind == "url"
    subject = await source.fetch()
    assert (subject.value, subject.token_type) == (jwt_token, JWT_TOKEN_TYPE)  # trailing newline dropped
    assert subject.expiry == DEFAULT_START + dt.timedelta(hours=1)
    assert HEADER_VALUE not in repr(source) and HEADER_VALUE not in repr(config)


@pytest.mark.parametrize("fmt", [{"format": {"type": "json", "subject_token_field_name": "access_token"}},
                                 {"format": "json", "subject_token_field_name": "access_token"}])
async def test_url_json_token_by_field_name(
        token_server: str, http: AiohttpClient, clock: FakeClock, metrics: Metrics, jwt_token: str,
        fmt: dict[str, Any]) -> None:
    config = parse_source({"type": "url", "url": f"{token_server}/token.json", "headers": {HEADER: HEADER_VALUE},
                           "token_type": ID_TOKEN_TYPE, **fmt}, prefix=PREFIX, base_dir=Path("."))
    subject = await build_source(config, context(clock, metrics, http)).fetch()
    assert (subject.value, subject.token_type) == (jwt_token, ID_TOKEN_TYPE)


async def test_url_errors_follow_google_auth(
        token_server: str, http: AiohttpClient, clock: FakeClock, metrics: Metrics) -> None:
    def source(path: str, **kw: Any) -> SubjectTokenSource:
        return build_source(UrlSourceConfig(url=token_server + path, token_type=JWT_TOKEN_TYPE, **kw),
                            context(clock, metrics, http))

    with pytest.raises(UpstreamError) as missing_header:
        await source("/token").fetch()
    assert (missing_header.value.status, missing_header.value.permanent) == (400, True)
    assert "Unable to retrieve Identity Pool subject token" in missing_header.value.reason
    with pytest.raises(UpstreamError) as down:
        await source("/broken").fetch()
    assert (down.value.status, down.value.permanent) == (503, False)
    assert "identity service warming up" in down.value.reason
    assert sample(metrics, "metaemu_upstream_errors_total", backend="subject_token_url", status="503") == 1
    with pytest.raises(SourceError, match=r"Unable to parse subject_token from JSON file .* using key 'token'"):
        await source("/token.json", headers={HEADER: HEADER_VALUE}, format_type="json", field_name="token").fetch()
    with pytest.raises(SourceError, match="expired at"):
        await source("/expired").fetch()


async def test_url_unreachable_is_transient(clock: FakeClock, metrics: Metrics, http: AiohttpClient) -> None:
    async with serve(web.Application()) as base:
        url = base + "/token"  # the port is closed once serve() exits
    source = build_source(UrlSourceConfig(url=url, token_type=JWT_TOKEN_TYPE), context(clock, metrics, http))
    with pytest.raises(UpstreamError) as err:
        await source.fetch()
    assert (err.value.status, err.value.permanent) == (0, False)


@pytest.mark.parametrize(("raw", "key"), [
    ({"url": "file:///etc/passwd"}, "url"),
    ({"url": "http://x", "format": {"type": "xml"}}, "format.type"),
    ({"url": "http://x", "format": {"type": "json"}}, "format.subject_token_field_name"),
    ({"url": "http://x", "headers": {"a": 1}}, "headers"),
    ({"url": "http://x", "token_type": "urn:ietf:params:aws:token-type:aws4_request"}, "token_type"),
    ({"url": "http://x", "method": "POST"}, "method"),
])
def test_url_configuration_errors_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_source({"type": "url", **raw}, prefix=PREFIX, base_dir=Path("."))
    assert err.value.key == PREFIX + key


# ---------------------------------------------------------------- executable: helpers


@pytest.fixture
def allow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOW_EXECUTABLES_ENV, "1")


def program(tmp_path: Path, body: str, *, name: str = "token-helper") -> str:
    """A command line running ``body`` as a Python script (no shell involved)."""
    path = tmp_path / f"{name}.py"
    path.write_text("import json, os, sys, time\n" + textwrap.dedent(body))
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(path))}"


def success(token: str, **extra: Any) -> dict[str, Any]:
    return {"version": 1, "success": True, "token_type": JWT_TOKEN_TYPE, "id_token": token, **extra}


def counting_program(tmp_path: Path, response: dict[str, Any], *, to_output_file: bool = True) -> str:
    """Counts its runs in ``runs``, writes ``response`` to the output file (as the contract asks)
    and prints it."""
    return program(tmp_path, f"""
        runs = {str(tmp_path / "runs")!r}
        count = int(open(runs).read()) if os.path.exists(runs) else 0
        open(runs, "w").write(str(count + 1))
        text = json.dumps({response!r})
        if {to_output_file!r}:
            open(os.environ["GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE"], "w").write(text)
        print(text)
    """)


def runs(tmp_path: Path) -> int:
    path = tmp_path / "runs"
    return int(path.read_text()) if path.exists() else 0


def executable(command: str, clock: FakeClock, metrics: Metrics, **kw: Any) -> ExecutableSource:
    kw.setdefault("token_type", JWT_TOKEN_TYPE)
    source = build_source(ExecutableSourceConfig(command=command, **kw), context(clock, metrics))
    assert isinstance(source, ExecutableSource)
    return source


# ---------------------------------------------------------------- executable


async def test_executable_success_with_the_contract_environment(
        allow: None, tmp_path: Path, clock: FakeClock, metrics: Metrics, jwt_token: str) -> None:
    env_dump = tmp_path / "env.json"
    command = program(tmp_path, f"""
        names = [n for n in os.environ if n.startswith("GOOGLE_EXTERNAL_ACCOUNT_")]
        json.dump({{n: os.environ[n] for n in names}}, open({str(env_dump)!r}, "w"))
        print(json.dumps({success(jwt_token, expiration_time=EXPIRES)!r}))
    """)
    out = tmp_path / "cache.json"
    source = executable(command, clock, metrics, output_file=out, impersonated_email=SERVICE_ACCOUNT)
    subject = await source.fetch()
    assert (subject.value, subject.token_type) == (jwt_token, JWT_TOKEN_TYPE)
    assert subject.expiry == dt.datetime.fromtimestamp(EXPIRES, dt.UTC)
    assert json.loads(env_dump.read_text()) == {
        ALLOW_EXECUTABLES_ENV: "1",
        "GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE": AUDIENCE,
        "GOOGLE_EXTERNAL_ACCOUNT_TOKEN_TYPE": JWT_TOKEN_TYPE,
        "GOOGLE_EXTERNAL_ACCOUNT_INTERACTIVE": "0",
        "GOOGLE_EXTERNAL_ACCOUNT_REVOKE": "0",
        "GOOGLE_EXTERNAL_ACCOUNT_ID": SERVICE_ACCOUNT,
        "GOOGLE_EXTERNAL_ACCOUNT_IMPERSONATED_EMAIL": SERVICE_ACCOUNT,
        "GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE": str(out),
    }
    assert jwt_token not in repr(source)


async def test_executable_without_output_file_runs_every_time_and_reads_jwt_expiry(
        allow: None, tmp_path: Path, clock: FakeClock, metrics: Metrics, jwt_token: str) -> None:
    source = executable(counting_program(tmp_path, success(jwt_token), to_output_file=False), clock, metrics)
    first = await source.fetch()
    await source.fetch()
    assert runs(tmp_path) == 2
    assert first.expiry == DEFAULT_START + dt.timedelta(hours=1)  # from the JWT's exp


async def test_output_file_caches_the_response_until_it_expires(
        allow: None, tmp_path: Path, clock: FakeClock, metrics: Metrics, jwt_token: str) -> None:
    out = tmp_path / "cache.json"
    source = executable(counting_program(tmp_path, success(jwt_token, expiration_time=EXPIRES)), clock, metrics,
                        output_file=out)
    assert (await source.fetch()).value == jwt_token
    assert (await source.fetch()).value == jwt_token
    assert runs(tmp_path) == 1  # the second token came from the output file
    clock.advance(3601)  # past expiration_time: the cached response is stale, run again
    with pytest.raises(SourceError, match="The token returned by the executable is expired"):
        await source.fetch()  # ...and the executable answers the same, now expired, response
    assert runs(tmp_path) == 2


async def test_concurrent_fetches_run_the_executable_once(
        allow: None, tmp_path: Path, clock: FakeClock, metrics: Metrics, jwt_token: str) -> None:
    source = executable(counting_program(tmp_path, success(jwt_token, expiration_time=EXPIRES)), clock, metrics,
                        output_file=tmp_path / "cache.json")
    tokens = await asyncio.gather(*(source.fetch() for _ in range(5)))
    assert {t.value for t in tokens} == {jwt_token}
    assert runs(tmp_path) == 1


@pytest.mark.parametrize("cached", [
    {"version": 1, "success": True, "token_type": JWT_TOKEN_TYPE, "id_token": "old"},  # no expiration_time
    {"version": 1, "success": False, "code": "401", "message": "expired session"},
    {"version": 2, "success": True},
    "not json",
])
async def test_an_unusable_cached_response_runs_the_executable(
        allow: None, tmp_path: Path, clock: FakeClock, metrics: Metrics, jwt_token: str, cached: Any) -> None:
    out = tmp_path / "cache.json"
    out.write_text(cached if isinstance(cached, str) else json.dumps(cached))
    source = executable(counting_program(tmp_path, success(jwt_token, expiration_time=EXPIRES)), clock, metrics,
                        output_file=out)
    assert (await source.fetch()).value == jwt_token
    assert runs(tmp_path) == 1


async def test_a_malformed_cached_response_is_an_error_as_in_google_auth(
        allow: None, tmp_path: Path, clock: FakeClock, metrics: Metrics, jwt_token: str) -> None:
    out = tmp_path / "cache.json"
    out.write_text(json.dumps({"success": True, "token_type": JWT_TOKEN_TYPE, "id_token": "x"}))
    source = executable(counting_program(tmp_path, success(jwt_token)), clock, metrics, output_file=out)
    with pytest.raises(SourceError, match="missing the version field") as err:
        await source.fetch()
    assert err.value.permanent and runs(tmp_path) == 0


async def test_output_file_requires_expiration_time_in_the_response(
        allow: None, tmp_path: Path, clock: FakeClock, metrics: Metrics, jwt_token: str) -> None:
    source = executable(counting_program(tmp_path, success(jwt_token)), clock, metrics,
                        output_file=tmp_path / "cache.json")
    with pytest.raises(SourceError, match="must include expiration_time") as err:
        await source.fetch()
    assert err.value.permanent


async def test_an_empty_stdout_reads_the_response_from_the_output_file(
        allow: None, tmp_path: Path, clock: FakeClock, metrics: Metrics, jwt_token: str) -> None:
    command = program(tmp_path, f"""
        open(os.environ["GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE"], "w").write(
            json.dumps({success(jwt_token, expiration_time=EXPIRES)!r}))
    """)
    source = executable(command, clock, metrics, output_file=tmp_path / "cache.json")
    assert (await source.fetch()).value == jwt_token


async def test_saml_responses_use_saml_response(allow: None, tmp_path: Path, clock: FakeClock,
                                                metrics: Metrics) -> None:
    response = {"version": 1, "success": True, "token_type": SAML2_TOKEN_TYPE, "saml_response": "PHNhbWw+",
                "expiration_time": EXPIRES}
    source = executable(program(tmp_path, f"print(json.dumps({response!r}))"), clock, metrics,
                        token_type=SAML2_TOKEN_TYPE)
    subject = await source.fetch()
    assert (subject.value, subject.token_type) == ("PHNhbWw+", SAML2_TOKEN_TYPE)


async def test_an_error_response_carries_its_code_and_message(
        allow: None, tmp_path: Path, clock: FakeClock, metrics: Metrics) -> None:
    response = {"version": 1, "success": False, "code": "401", "message": "Caller not authorized."}
    source = executable(program(tmp_path, f"print(json.dumps({response!r}))"), clock, metrics)
    with pytest.raises(SourceError) as err:
        await source.fetch()
    assert err.value.reason == (f"executable {PROGRAM}: Executable returned unsuccessful response: code: 401, "
                                "message: Caller not authorized..")
    assert not err.value.permanent


@pytest.mark.parametrize(("response", "match", "permanent"), [
    ({"version": 1, "success": False}, "Error code and message fields are required", True),
    ({"success": True}, "missing the version field", True),
    ({"version": 1}, "missing the success field", True),
    ({"version": 2, "success": True}, "unsupported version 2", False),
    ({"version": 1, "success": True, "id_token": "x"}, "missing the token_type field", True),
    ({"version": 1, "success": True, "token_type": "urn:x"}, "unsupported token type", False),
    ({"version": 1, "success": True, "token_type": JWT_TOKEN_TYPE}, "missing the id_token field", True),
    ({"version": 1, "success": True, "token_type": JWT_TOKEN_TYPE, "id_token": "x",
      "expiration_time": int(DEFAULT_START.timestamp()) - 1}, "is expired", False),
    ([1, 2], "not a JSON object", True),
])
async def test_responses_are_validated_like_google_auth(
        allow: None, tmp_path: Path, clock: FakeClock, metrics: Metrics, response: Any, match: str,
        permanent: bool) -> None:
    source = executable(program(tmp_path, f"print(json.dumps({response!r}))"), clock, metrics)
    with pytest.raises(SourceError, match=match) as err:
        await source.fetch()
    assert err.value.permanent is permanent


async def test_a_failed_exit_reports_the_code_and_withholds_tokens(
        allow: None, tmp_path: Path, clock: FakeClock, metrics: Metrics, jwt_token: str) -> None:
    noisy = executable(program(tmp_path, "print('cannot reach the identity agent', file=sys.stderr); sys.exit(3)"),
                       clock, metrics)
    with pytest.raises(SourceError) as err:
        await noisy.fetch()
    assert err.value.reason == f"executable {PROGRAM} exited with code 3: cannot reach the identity agent"
    leaky = executable(program(tmp_path, f"print(json.dumps({success(jwt_token)!r})); sys.exit(1)", name="leaky"),
                       clock, metrics)
    with pytest.raises(SourceError) as leak:
        await leaky.fetch()
    assert jwt_token not in leak.value.reason and "withheld" in leak.value.reason


async def test_output_that_is_not_json_is_a_permanent_error(
        allow: None, tmp_path: Path, clock: FakeClock, metrics: Metrics) -> None:
    with pytest.raises(SourceError, match="printed no JSON response: hello") as err:
        await executable(program(tmp_path, "print('hello')"), clock, metrics).fetch()
    assert err.value.permanent


async def test_a_missing_program_is_reported(allow: None, tmp_path: Path, clock: FakeClock,
                                             metrics: Metrics) -> None:
    with pytest.raises(SourceError, match="cannot run executable"):
        await executable(str(tmp_path / "absent"), clock, metrics).fetch()


async def test_an_executable_past_its_timeout_is_killed_with_its_children(
        allow: None, tmp_path: Path, clock: FakeClock, metrics: Metrics) -> None:
    pids = tmp_path / "pids"
    command = program(tmp_path, f"""
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(60)
    """)
    source = executable(command, clock, metrics, timeout_ms=5000)
    fetch = asyncio.ensure_future(source.fetch())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not (pids.exists() and pids.read_text() and clock.pending_sleepers):
        assert loop.time() < deadline, "the executable did not start"
        await asyncio.sleep(0.01)  # waits for a real process to start; virtual time stays put
    clock.advance(5.0)
    with pytest.raises(SourceError, match="did not finish within 5000 ms and was killed"):
        await fetch
    parent, child = (int(p) for p in pids.read_text().split())
    with pytest.raises(ProcessLookupError):
        os.kill(parent, 0)  # killed and reaped
    while _alive(child):  # killed with the process group; reaped by init
        assert loop.time() < deadline, "the executable's child survived"
        await asyncio.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


async def test_executables_must_be_allowed_by_the_environment(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clock: FakeClock, metrics: Metrics) -> None:
    config = ExecutableSourceConfig(command=program(tmp_path, "print('{}')"), token_type=JWT_TOKEN_TYPE)
    for value in (None, "0", "true"):
        if value is None:
            monkeypatch.delenv(ALLOW_EXECUTABLES_ENV, raising=False)
        else:
            monkeypatch.setenv(ALLOW_EXECUTABLES_ENV, value)
        with pytest.raises(ConfigError, match=f"set {ALLOW_EXECUTABLES_ENV} to '1'"):
            build_source(config, context(clock, metrics))


@pytest.mark.parametrize(("raw", "key"), [
    ({"command": ""}, "command"),
    ({"command": "'unterminated"}, "command"),
    ({"command": "x", "timeout_millis": 4999}, "timeout_millis"),
    ({"command": "x", "timeout_millis": 120001}, "timeout_millis"),
    ({"command": "x", "timeout_millis": "30s"}, "timeout_millis"),
    ({"command": "x", "token_type": "urn:ietf:params:oauth:token-type:access_token"}, "token_type"),
    ({"command": "x", "shell": True}, "shell"),
])
def test_executable_configuration_errors_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_source({"type": "executable", **raw}, prefix=PREFIX, base_dir=Path("."))
    assert err.value.key == PREFIX + key


def test_executable_yaml_defaults_and_relative_output_file(tmp_path: Path) -> None:
    config = parse_source({"type": "executable", "command": "/usr/bin/helper --flag 'a b'",
                           "output_file": "cache.json"}, prefix=PREFIX, base_dir=tmp_path)
    assert isinstance(config, ExecutableSourceConfig)
    assert config.argv == ("/usr/bin/helper", "--flag", "a b")
    assert (config.timeout_ms, config.output_file, config.token_type) == (DEFAULT_TIMEOUT_MS,
                                                                          tmp_path / "cache.json", JWT_TOKEN_TYPE)


# ---------------------------------------------------------------- --credential-config (AIP-4117)


def credential_config(tmp_path: Path, credential_source: dict[str, Any]) -> Path:
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({
        "type": "external_account", "audience": AUDIENCE,
        "subject_token_type": JWT_TOKEN_TYPE, "token_url": "https://sts.googleapis.com/v1/token",
        "service_account_impersonation_url": "https://iamcredentials.googleapis.com/v1/projects/-/"
                                             f"serviceAccounts/{SERVICE_ACCOUNT}:generateAccessToken",
        "credential_source": credential_source,
    }))
    return path


def loaded_source(path: Path) -> SourceConfig:
    wi = load_config(path=None, credential_config=path, env={}).workload_identity
    assert wi is not None
    return wi.source


async def test_credential_config_with_a_url_source(
        tmp_path: Path, token_server: str, http: AiohttpClient, clock: FakeClock, metrics: Metrics,
        jwt_token: str) -> None:
    path = credential_config(tmp_path, {"url": f"{token_server}/token.json", "headers": {HEADER: HEADER_VALUE},
                                        "format": {"type": "json", "subject_token_field_name": "access_token"}})
    config = loaded_source(path)
    assert config == UrlSourceConfig(url=f"{token_server}/token.json", token_type=JWT_TOKEN_TYPE,
                                     headers={HEADER: HEADER_VALUE}, format_type="json", field_name="access_token")
    assert (await build_source(config, context(clock, metrics, http)).fetch()).value == jwt_token


async def test_credential_config_with_an_executable_source(
        allow: None, tmp_path: Path, clock: FakeClock, metrics: Metrics, jwt_token: str) -> None:
    command = counting_program(tmp_path, success(jwt_token, expiration_time=EXPIRES))
    path = credential_config(tmp_path, {"executable": {"command": command, "timeout_millis": 5000,
                                                       "output_file": "cache/token.json"}})
    (tmp_path / "cache").mkdir()
    config = loaded_source(path)
    assert isinstance(config, ExecutableSourceConfig)
    assert (config.timeout_ms, config.output_file) == (5000, tmp_path / "cache" / "token.json")
    source = build_source(config, context(clock, metrics))
    assert (await source.fetch()).value == jwt_token
    assert (await source.fetch()).value == jwt_token
    assert runs(tmp_path) == 1


@pytest.mark.parametrize(("credential_source", "problem"), [
    ({"executable": {"timeout_millis": 5000}}, "command"),
    ({"executable": {"command": "x", "timeout_millis": 1000}}, "Timeout must be between 5 and 120 seconds."),
    ({"executable": "x"}, "must be an object"),
    ({"url": "http://x", "format": {"type": "json"}}, "required with type json"),
])
def test_credential_config_errors_are_config_errors(
        tmp_path: Path, credential_source: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as err:
        loaded_source(credential_config(tmp_path, credential_source))
    assert err.value.key.startswith("workload_identity.credential_config (creds.json) credential_source.")
