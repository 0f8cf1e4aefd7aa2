"""The fast path cannot be told from the full handler (issue #12): one corpus of raw request bytes is
sent to a server with the fast path (the default) and to one with ``fast_path: false``, sharing one
Google stand-in and one frozen clock; their answers must be byte-identical but for ``Date`` and for
the access token's value (each server made its own exchange: the two values are mapped one to one,
and they have one length, so Content-Length is compared as is).

The corpus: every path of the tree with the headers real clients send and every header shape the
rules judge (no, wrong, doubled flavor; legacy header; X-Forwarded-For; foreign, missing, ported
Host; Connection; HTTP/1.0; absolute form), the query shapes of the conformance tests, pipelined
and keep-alive sequences, and the fuzz test's generated and mutated requests. The fast server must
have answered a good share of it itself, or the comparison proves nothing. Both profiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaemu import eventloop
from metaemu.server.runner import MetaemuServer
from metaemu.testing.fake_clock import FakeClock
from metaemu.testing.world import SERVICE_ACCOUNT, build_world
from tests.helpers import running_server
from tests.server.test_fuzz_requests import PROFILE, SOCKET_TIMEOUT_S, mutated, requests

SA = "/computeMetadata/v1/instance/service-accounts/"
CACHED_AUDIENCE = "https://cached.example/aud"
#: The scope sets the corpus asks for (None: the default ones).
SCOPE_SETS = [None, ["https://www.googleapis.com/auth/cloud-platform"], ["a", "b"]]


@dataclass
class Pair:
    profile: str
    fast: MetaemuServer
    full: MetaemuServer
    fast_port: int
    full_port: int
    #: Counters once both were serving: start-up itself may count a cache hit or a miss (whether
    #: the first refresh finished before the readiness check looked), so deltas are compared.
    counted_at_start: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = field(default_factory=dict)

    def tokens(self) -> list[tuple[bytes, bytes]]:
        """(fast server's, full server's) access token value, for each scope set both have cached."""
        pairs = []
        for scopes in SCOPE_SETS:
            values = []
            for server in (self.fast, self.full):
                creds = server.components.credentials
                token = creds.access.peek(creds.access_key(scopes))
                values.append(token.value.encode() if token else None)
            if values[0] and values[1]:
                pairs.append((values[0], values[1]))
        return pairs


@pytest.fixture(scope="module", params=["gke", "gce"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    clock = FakeClock()  # frozen: no refresh, no expiry, one expires_in for both
    world = build_world(Path(tmp_path_factory.mktemp("differential")), clock=clock)
    ready: list[Pair] = []
    started, stop = threading.Event(), threading.Event()

    async def serve() -> None:
        async with contextlib.AsyncExitStack() as stack:
            fast = await stack.enter_async_context(running_server(world, clock=clock, profile=request.param))
            full = await stack.enter_async_context(running_server(world, clock=clock, profile=request.param,
                                                                  fast_path=False))
            assert fast.components.fast is not None and fast.components.fast.enabled
            assert full.components.fast is None
            ready.append(Pair(request.param, fast, full, fast.metadata_address.port, full.metadata_address.port))
            started.set()
            while not stop.is_set():
                await asyncio.get_running_loop().run_in_executor(None, stop.wait, 1.0)

    # On the loop `metaemu serve` runs on (uvloop), where the fast path meets real transports.
    thread = threading.Thread(target=eventloop.run, args=(serve(),), name="metaemu-differential")
    thread.start()
    assert started.wait(30), "the servers did not start"
    result = ready[0]
    for port in (result.fast_port, result.full_port):  # an ID token in both caches, for the fast path
        answer = converse(port, [get(f"{SA}default/identity?audience={CACHED_AUDIENCE}")])
        assert answer.startswith(b"HTTP/1.1 200 "), answer
    result.counted_at_start = {"fast": counters(result.fast), "full": counters(result.full)}
    try:
        yield result
    finally:
        stop.set()
        thread.join(30)


# -- talking to a server ----------------------------------------------------------------------------

GOOD = [("Host", "metadata.google.internal"), ("Metadata-Flavor", "Google")]


def get(target: str, fields: list[tuple[str, str]] | None = None, *, method: str = "GET",
        version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}", *(f"{k}: {v}" for k, v in (GOOD if fields is None else fields))]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(s: socket.socket, pending: bytearray) -> None:
    """Read one whole response (head and Content-Length body) into ``pending``."""
    while b"\r\n\r\n" not in pending:
        chunk = s.recv(65536)
        if not chunk:
            return
        pending += chunk
    head = bytes(pending).split(b"\r\n\r\n", 1)[0]
    length = re.search(rb"\r\nContent-Length: (\d+)", head)
    want = len(head) + 4 + (int(length.group(1)) if length else 0)
    while len(pending) < want:
        chunk = s.recv(65536)
        if not chunk:
            return
        pending += chunk


def converse(port: int, sends: list[bytes]) -> bytes:
    """Send each chunk after the answer to the one before (a keep-alive sequence), end our side
    after the last, and return everything the server wrote until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as s:
        received = bytearray()
        for chunk in sends[:-1]:
            s.sendall(chunk)
            _read_response(s, received)
        s.sendall(sends[-1])
        s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(65536):
            received += chunk
    return bytes(received)


def assert_same(pair: Pair, sends: list[bytes]) -> None:
    fast, full = converse(pair.fast_port, sends), converse(pair.full_port, sends)
    date = re.compile(rb"\r\nDate: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r\n")
    for ours, theirs in pair.tokens():
        fast = fast.replace(ours, theirs)
    normal = date.sub(b"\r\nDate: -\r\n", fast)
    assert normal == date.sub(b"\r\nDate: -\r\n", full), sends


# -- the corpus -------------------------------------------------------------------------------------

FIELD_SHAPES: list[list[tuple[str, str]]] = [
    GOOD,
    [*GOOD, ("User-Agent", "python-requests/2.32"), ("Accept-Encoding", "gzip, deflate"), ("Accept", "*/*"),
     ("Connection", "keep-alive"), ("x-goog-api-client", "gl-python/3.11 auth/2.40")],
    [("host", "169.254.169.254"), ("metadata-flavor", "Google"), ("user-agent", "Go-http-client/1.1"),
     ("accept-encoding", "gzip")],
    [("Host", "metadata.google.internal:80"), ("Metadata-Flavor", "Google")],
    [("Host", "127.0.0.1"), ("Metadata-Flavor", "Google")],
    [("Metadata-Flavor", "Google"), ("Host", "metadata")],
    [*GOOD, ("Connection", "close")],
    [*GOOD, ("Connection", "keep-alive"), ("Connection", "keep-alive")],
    [("Host", "metadata.google.internal")],
    [("Host", "metadata.google.internal"), ("Metadata-Flavor", "google")],
    [*GOOD, ("Metadata-Flavor", "Google")],
    [*GOOD, ("Metadata-Flavor", "Other")],
    [("Host", "metadata.google.internal"), ("X-Google-Metadata-Request", "True")],
    [*GOOD, ("X-Forwarded-For", "1.2.3.4")],
    [("Host", "attacker.example"), ("Metadata-Flavor", "Google")],
    [("Metadata-Flavor", "Google")],
    [("Host", "metadata.google.internal"), ("Host", "attacker.example"), ("Metadata-Flavor", "Google")],
    [("Host", ""), ("Metadata-Flavor", "Google")],
    [*GOOD, ("Content-Length", "0")],
    [*GOOD, ("Metadata-Flavor ", "Google")],
    [("Host", " metadata.google.internal "), ("Metadata-Flavor", "\tGoogle ")],
    [*GOOD, ("X-Padding", "x" * 5000)],
]
QUERIES = ["", "?alt=json", "?alt=text", "?recursive=true", "?recursive=true&alt=text", "?alt=yaml",
           "?wait_for_change=true&timeout_sec=1", "?wait_for_change=true&last_etag=0", "?x=1", "?"]
TOKEN_QUERIES = ["", "?scopes=https://www.googleapis.com/auth/cloud-platform", "?scopes=a,b", "?alt=json",
                 "?audience=x"]
IDENTITY_QUERIES = [f"?audience={CACHED_AUDIENCE}", "?audience=https://new.example", "?audience=",
                    f"?audience={CACHED_AUDIENCE}&format=full", f"?audience={CACHED_AUDIENCE}&format=standard",
                    "?audience=https%3A%2F%2Fcached.example%2Faud", f"?audience={CACHED_AUDIENCE}&licenses=TRUE",
                    f"?format=full&audience={CACHED_AUDIENCE}", f"?audience={CACHED_AUDIENCE}&audience=x", ""]


def tree_paths(pair: Pair) -> list[str]:
    return sorted(pair.fast.components.contexts.default_index)


def test_every_path_with_every_header_shape(pair: Pair) -> None:
    before = _served(pair)
    paths = tree_paths(pair)
    assert f"{SA}default/token" in paths and f"{SA}{SERVICE_ACCOUNT}/email" in paths
    for path in paths:
        for fields in FIELD_SHAPES:
            assert_same(pair, [get(path, fields)])
    assert _served(pair) - before >= len(paths) * 5  # the fast path answered the plain shapes itself


def test_queries_methods_versions_and_spellings(pair: Pair) -> None:
    paths = tree_paths(pair)
    for path in paths:
        queries = (TOKEN_QUERIES if path.endswith("/token") else IDENTITY_QUERIES if path.endswith("/identity")
                   else QUERIES)
        for query in queries:
            assert_same(pair, [get(path + query)])
    for path in (f"{SA}default/token", f"{SA}default/email", "/computeMetadata/v1/project/project-id"):
        for method in ("HEAD", "POST", "get", "OPTIONS"):
            assert_same(pair, [get(path, method=method)])
        for version in ("HTTP/1.0", "HTTP/1.2", "http/1.1"):
            assert_same(pair, [get(path, version=version)])
        for spelling in (path.upper(), path + "/", path.replace("/v1/", "/v1//"), path.replace("/v1/", "/./v1/"),
                         path.replace("e", "%65", 1), "http://metadata.google.internal" + path,
                         "http://attacker.example" + path, path + "#frag"):
            assert_same(pair, [get(spelling)])


def test_pipelined_keep_alive_partial_and_bodied_requests(pair: Pair) -> None:
    token, email = get(f"{SA}default/token"), get(f"{SA}default/email")
    identity = get(f"{SA}default/identity?audience={CACHED_AUDIENCE}")
    assert_same(pair, [token + email])  # pipelined: the full handler answers both, in order
    assert_same(pair, [token, email, identity, token])  # keep-alive: each answered in turn
    assert_same(pair, [token, token + email, email])  # fast, then pipelined: handed over mid-connection
    assert_same(pair, [token[:20]])  # a partial head, then the end of our side
    assert_same(pair, [email, token[:-2]])
    assert_same(pair, [token[:-4] + b"\r\nContent-Length: 5\r\n\r\nhello"])
    assert_same(pair, [token + b"x"])  # a byte after the head: a second, broken request
    assert_same(pair, [token.replace(b"\r\n", b"\n")])  # bare LF line ends
    assert_same(pair, [token.replace(b"\r\nHost", b"\r\n Host")])  # obs-fold
    assert_same(pair, [token.replace(b"GET", b"GET ", 1)])  # two spaces


@settings(settings.get_profile(PROFILE), max_examples=300)
@given(data=requests() | mutated())
def test_fuzzed_requests_get_the_same_answer(pair: Pair, data: bytes) -> None:
    assert_same(pair, [data])


@settings(settings.get_profile(PROFILE), max_examples=100)
@given(first=st.sampled_from([f"{SA}default/token", f"{SA}default/email", "/computeMetadata/v1/project/project-id"]),
       data=requests())
def test_a_fast_answer_then_anything_gets_the_same_answers(pair: Pair, first: str, data: bytes) -> None:
    assert_same(pair, [get(first), data])


def _served(pair: Pair) -> int:
    fast = pair.fast.components.fast
    assert fast is not None
    return fast.served


COUNTED = ("metaemu_requests_total", "metaemu_token_cache_total", "metaemu_blocked_requests_total",
           "metaemu_request_duration_seconds_count")


def counters(server: MetaemuServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in server.metrics.registry.collect() for s in family.samples if s.name in COUNTED}


def test_zz_both_servers_counted_the_same_requests(pair: Pair) -> None:
    """After the same corpus, the request, cache and refusal counters agree: the fast path counts
    exactly what the full handler counts (runs last in the module: ``zz``)."""
    fast, full = (_delta(counters(s), pair.counted_at_start[n]) for s, n in ((pair.fast, "fast"), (pair.full, "full")))
    assert fast == full
    # The fixed corpus alone answers 49 (gke) and 51 (gce) token requests with 200. The generated
    # share varies with the *set of modules loaded*, not only the seed: Hypothesis draws constants
    # from every local module in sys.modules (hypothesis.internal.constants_ast), so a new module
    # anywhere in the session changes the corpus (issue #11's passthrough modules took it from 100+
    # to 77). Bound by what the fixed corpus guarantees.
    assert fast[("metaemu_requests_total", (("code", "200"), ("route", ROUTE_TOKEN)))] > 40
    assert _served(pair) > 300  # and a good share of them were the fast path's


ROUTE_TOKEN = "/computeMetadata/v1/instance/service-accounts/{account}/token"


def _delta(now: dict[Any, float], before: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in now.items() if v != before.get(k, 0.0)}
