"""FileSource: the projected service-account token and ``credential_source.file`` (text and JSON),
re-read on each fetch, off the event loop, failing with a clear, token-free SourceError
(upstream.md §6, AIP-4117; UP-16, UP-20, SEC-33)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from metaemu.credentials.sources import SourceContext, build_source
from metaemu.credentials.sources.config import FileSourceConfig, parse_credential_source, parse_source
from metaemu.credentials.sources.file import MAX_TOKEN_FILE_BYTES, FileSource
from metaemu.credentials.tokens import ACCESS_TOKEN_TYPE, ID_TOKEN_TYPE, JWT_TOKEN_TYPE
from metaemu.errors import ConfigError, SourceError
from metaemu.metrics import create_metrics
from metaemu.testing.fake_clock import DEFAULT_START, FakeClock, settle
from metaemu.testing.inprocess import InProcessClient
from metaemu.testing.world import AUDIENCE, KSA, NAMESPACE, World
from metaemu.transport import HttpRequest, HttpResponse

#: Bounds the FIFO writer only when the event loop is (wrongly) blocked; a passing run never waits.
_BLOCKED_LOOP_GRACE_S = 5.0


def kube_token(world: World, *, now: dt.datetime | None = None, lifetime_s: float = 3600) -> str:
    return world.issuer.mint_kubernetes(namespace=NAMESPACE, service_account=KSA, audience=AUDIENCE, now=now,
                                        lifetime_s=lifetime_s)


async def test_reads_the_projected_token_with_its_type_and_jwt_expiry_up16(
        world: World, source: FileSource) -> None:
    world.token_file.write_text(world.token_file.read_text() + "\n")  # kubelet files may end in a newline
    subject = await source.fetch()
    assert subject.value == world.token_file.read_text().strip()
    assert subject.token_type == JWT_TOKEN_TYPE
    assert subject.expiry == DEFAULT_START + dt.timedelta(hours=1)
    assert source.kind == "kubernetes"


async def test_the_file_is_re_read_on_every_fetch_up16(world: World, clock: FakeClock, source: FileSource) -> None:
    first = (await source.fetch()).value
    clock.advance(48 * 60)
    rotated = world.write_token()
    second = await source.fetch()
    assert rotated != first
    assert second.value == rotated
    assert second.expiry == DEFAULT_START + dt.timedelta(minutes=48, hours=1)


async def test_a_list_valued_aud_is_accepted_up16(world: World, source: FileSource) -> None:
    world.token_file.write_text(kube_token(world))  # mint_kubernetes always writes aud as a list
    assert (await source.fetch()).value == world.token_file.read_text()


# -- failures: clear, naming the path, never echoing the token -----------------------------------

#: Each case prepares the file (or not) and returns the text that must not appear in the message.
Case = Callable[[World, Path], str]


def _missing(world: World, path: Path) -> str:
    return "no-such-file"


def _empty(world: World, path: Path) -> str:
    path.write_text("")
    return "never-present"


def _blank(world: World, path: Path) -> str:
    path.write_text(" \n\t\n")
    return "never-present"


def _not_a_jwt(world: World, path: Path) -> str:
    secret = "opaque-secret-looking-value-0123456789"
    path.write_text(secret)
    return secret


def _expired(world: World, path: Path) -> str:
    token = kube_token(world, now=DEFAULT_START - dt.timedelta(hours=2), lifetime_s=3600)
    path.write_text(token)
    return token


def _no_exp(world: World, path: Path) -> str:
    token = world.issuer.mint(sub="system:serviceaccount:default:demo-app", audience=[AUDIENCE],
                              claims={"exp": None})
    path.write_text(token)
    return token


def _oversized(world: World, path: Path) -> str:
    token = kube_token(world)
    path.write_text((token + "\n") * (MAX_TOKEN_FILE_BYTES // len(token) + 1))
    return token


def _directory(world: World, path: Path) -> str:
    path.mkdir()
    return "never-present"


@pytest.mark.parametrize(("case", "says"), [
    (_missing, "does not exist"),
    (_empty, "is empty"),
    (_blank, "is empty"),
    (_not_a_jwt, "does not hold a JWT"),
    (_expired, "expired at 2026-11-22T04:00:00Z"),
    (_no_exp, "does not hold a JWT"),
    (_oversized, f"larger than {MAX_TOKEN_FILE_BYTES} bytes"),
    (_directory, "cannot read"),
], ids=["missing", "empty", "blank", "not-a-jwt", "expired", "no-exp", "oversized", "directory"])
async def test_unusable_token_file_is_a_source_error_naming_the_path_without_the_token_up16(
        world: World, clock: FakeClock, tmp_path: Path, case: Case, says: str) -> None:
    path = tmp_path / "projected" / "token"
    path.parent.mkdir()
    secret = case(world, path)
    with pytest.raises(SourceError) as caught:
        await FileSource.kubernetes(path, clock=clock).fetch()
    message = str(caught.value)
    assert caught.value.reason == message
    assert str(path) in message
    assert says in message
    assert secret not in message  # SEC-33
    assert caught.value.__cause__ is None  # nothing chained that might carry the content


async def test_a_token_file_of_exactly_the_size_limit_is_read(world: World, clock: FakeClock) -> None:
    token = kube_token(world)
    world.token_file.write_text(token + "\n" * (MAX_TOKEN_FILE_BYTES - len(token)))
    assert world.token_file.stat().st_size == MAX_TOKEN_FILE_BYTES
    assert (await FileSource.kubernetes(world.token_file, clock=clock).fetch()).value == token


async def test_a_jwt_with_an_out_of_range_exp_is_a_source_error(world: World, clock: FakeClock) -> None:
    world.token_file.write_text(world.issuer.mint(sub="x", audience=[AUDIENCE], claims={"exp": 10**20}))
    with pytest.raises(SourceError):
        await FileSource.kubernetes(world.token_file, clock=clock).fetch()


# -- credential_source.file: text and JSON formats -----------------------------------------------


async def test_json_format_reads_the_subject_token_field_name_field(world: World, clock: FakeClock,
                                                                    tmp_path: Path) -> None:
    token = kube_token(world)
    (tmp_path / "creds.json").write_text(json.dumps({"id_token": token, "token_type": "Bearer"}))
    config = parse_credential_source(
        {"file": "creds.json", "format": {"type": "json", "subject_token_field_name": "id_token"}},
        subject_token_type=ID_TOKEN_TYPE, prefix="credential_source.", base_dir=tmp_path)
    assert config == FileSourceConfig(path=tmp_path / "creds.json", token_type=ID_TOKEN_TYPE,
                                      format_type="json", field_name="id_token")
    subject = await build_source(config, context(clock)).fetch()
    assert (subject.value, subject.token_type) == (token, ID_TOKEN_TYPE)
    assert subject.expiry == DEFAULT_START + dt.timedelta(hours=1)


@pytest.mark.parametrize(("content", "says"), [
    ("{not json", "is not JSON"),
    ('["a", "b"]', "has no string field 'id_token'"),
    ('{"access_token": "x"}', "has no string field 'id_token'"),
    ('{"id_token": 42}', "has no string field 'id_token'"),
    ('{"id_token": ""}', "is empty"),
], ids=["not-json", "array", "field-missing", "field-not-string", "field-empty"])
async def test_json_format_problems_are_source_errors_naming_the_path(
        clock: FakeClock, tmp_path: Path, content: str, says: str) -> None:
    path = tmp_path / "creds.json"
    path.write_text(content)
    source = FileSource(FileSourceConfig(path=path, token_type=JWT_TOKEN_TYPE, format_type="json",
                                         field_name="id_token"), clock=clock)
    with pytest.raises(SourceError) as caught:
        await source.fetch()
    assert str(path) in str(caught.value)
    assert says in str(caught.value)


def test_json_format_without_a_field_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_credential_source({"file": "creds.json", "format": {"type": "json"}},
                                subject_token_type=JWT_TOKEN_TYPE, prefix="credential_source.", base_dir=Path("/"))
    assert caught.value.key == "credential_source.format.subject_token_field_name"


async def test_a_non_jwt_token_type_is_passed_through_without_jwt_checks(clock: FakeClock, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("ya29.an-opaque-google-access-token\n")
    source = FileSource(FileSourceConfig(path=path, token_type=ACCESS_TOKEN_TYPE), clock=clock)
    subject = await source.fetch()
    assert (subject.value, subject.token_type, subject.expiry) == (
        "ya29.an-opaque-google-access-token", ACCESS_TOKEN_TYPE, None)


async def test_kubernetes_source_config_builds_a_kubernetes_file_source(world: World, clock: FakeClock) -> None:
    config = parse_source({"type": "kubernetes", "token_file": world.token_file.name}, prefix="source.",
                          base_dir=world.token_file.parent)
    source = build_source(config, context(clock))
    assert source.kind == "kubernetes"
    assert (await source.fetch()).value == world.token_file.read_text()


# -- UP-20: reads never block the event loop -----------------------------------------------------


async def test_a_blocking_read_runs_off_the_event_loop_up20(world: World, clock: FakeClock, tmp_path: Path) -> None:
    # A named pipe blocks its reader until a writer shows up: if the read ran on the loop thread,
    # the loop would freeze until the writer's grace period ran out and fetch would be done by the
    # time settle() returns.
    fifo = tmp_path / "token.fifo"
    os.mkfifo(fifo)
    token = kube_token(world)
    loop_ran = threading.Event()

    def kubelet() -> None:
        loop_ran.wait(_BLOCKED_LOOP_GRACE_S)
        with fifo.open("w") as f:
            f.write(token)

    writer = threading.Thread(target=kubelet, name="fifo-writer", daemon=True)
    writer.start()
    fetch = asyncio.create_task(FileSource.kubernetes(fifo, clock=clock).fetch())
    await settle()
    assert not fetch.done()  # the read is still blocked, yet this coroutine kept running
    loop_ran.set()
    subject = await fetch
    await asyncio.to_thread(writer.join, _BLOCKED_LOOP_GRACE_S)
    assert subject.value == token


def context(clock: FakeClock) -> SourceContext:
    """A file source needs only the clock; the rest is there for sources that call out."""
    return SourceContext(clock=clock, http=InProcessClient(_no_http), metrics=create_metrics(), audience="//aud")


async def _no_http(request: HttpRequest) -> HttpResponse:
    raise AssertionError(f"a file source made an HTTP request: {request!r}")
