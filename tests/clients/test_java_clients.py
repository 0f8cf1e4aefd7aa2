"""The real Java client library, google-auth-library-java, against a running metaemu (clients.md §8.2,
CL-01, CL-07, CL-09..CL-13), in two flavours users run: the current release from Maven Central (pinned in
``tests/clients/java/current/pom.xml``) and Debian's ``libgoogle-auth-java`` 0.18 (2019). Each obtains an
access token through application default credentials, the account email, a ``format=full`` ID token and,
where the library can, the project id and universe domain.

Every metadata request the client sends passes through a recording proxy, so each test also checks its
request list (clients.md §8.2, CL-12). Both flavours detect the server with ``GET /`` (CL-01; on failure the
current one would also read ``/sys/class/dmi/id/product_name``), default to ``http://metadata.google.internal``
without ``GCE_METADATA_HOST``, send ``Metadata-Flavor: Google`` on every request (CL-04), and ask for the ID
token with ``format=full`` and the audience raw, not percent-encoded (CL-10). Where they differ:

* token: 0.18 drops the scopes of ``createScoped`` (no ``scopes`` parameter); the current library sends
  ``?scopes=…`` (CL-09);
* account: 0.18's ``getAccount()`` reads ``service-accounts/?recursive=true`` and needs the JSON map keyed
  by account (CL-07); the current one reads ``service-accounts/default/email``;
* project and universe domain: only the current library has ``getProjectId()`` (``project/project-id``,
  CL-06) and ``getUniverseDomain()`` (``universe/universe-domain``, CL-11); with 0.18 neither is judged;
* headers: the current library adds ``x-goog-api-client: gl-java/… auth/1.58.0 auth-request-type/{mds,at,it}``
  on the ping, token and identity requests; both send ``User-Agent: Google-HTTP-Java-Client/…``
  (1.42.0 for 0.18, 2.2.0 for the current one).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from metaemu.testing.world import PROJECT_ID, SERVICE_ACCOUNT
from tests.clients import harness, java_harness
from tests.clients.conftest import AUDIENCE, Live

pytestmark = pytest.mark.skipif(shutil.which("java") is None,
                                reason="java is not installed (scripts/install-clients.sh)")

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
SA = "/computeMetadata/v1/instance/service-accounts"

#: Not forwarded by the recording proxy: hop-by-hop (RFC 9110 §7.6.1) and what aiohttp recomputes. Bodies
#: pass through still encoded (auto_decompress=False), so Content-Encoding is forwarded.
_HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade",
                          "te", "trailer", "proxy-connection"})


@dataclass(frozen=True, slots=True, kw_only=True)
class SeenRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    raw_query: str
    headers: CIMultiDict[str]


@dataclass
class RecordingProxy:
    """Forwards every request to metaemu unchanged (no redirects followed) and records it."""

    addr: str = ""
    seen: list[SeenRequest] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [r.path for r in self.seen]

    def only(self, path: str) -> SeenRequest:
        found = [r for r in self.seen if r.path == path]
        assert len(found) == 1, (path, self.paths())
        return found[0]


@asynccontextmanager
async def recording_proxy(upstream: str) -> AsyncIterator[RecordingProxy]:
    proxy = RecordingProxy()
    async with aiohttp.ClientSession(auto_decompress=False) as session:

        async def forward(request: web.Request) -> web.StreamResponse:
            split = urlsplit(request.raw_path)
            proxy.seen.append(SeenRequest(method=request.method, path=split.path, query=parse_qs(split.query),
                                          raw_query=split.query, headers=CIMultiDict(request.headers)))
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
            async with session.request(request.method, f"http://{upstream}{request.raw_path}", headers=headers,
                                       data=await request.read(), allow_redirects=False) as resp:
                body = await resp.read()
                out = CIMultiDict((k, v) for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS)
                return web.Response(status=resp.status, headers=out, body=body)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        proxy.addr = f"127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield proxy
        finally:
            await runner.cleanup()


async def run_flavour(flavour: java_harness.Flavour, live: Live, tmp_path: Path) -> tuple[dict[str, object],
                                                                                            RecordingProxy]:
    missing = java_harness.java_missing(flavour)
    assert missing is None, missing  # never skip silently once java is here
    client = await asyncio.to_thread(java_harness.build_java_client, tmp_path / "java", flavour)
    async with recording_proxy(live.addr) as proxy:
        env = harness.client_env(proxy.addr, tmp_path)
        out = await asyncio.to_thread(java_harness.run_java_client, client, env, AUDIENCE)
    out["library_version"] = client.library_version
    return out, proxy


def assert_common(out: dict[str, object], proxy: RecordingProxy, live: Live) -> None:
    """What both flavours must get, and send, the same way."""
    assert out["available"] is True, out  # CL-01: GET / answered with Metadata-Flavor: Google
    assert out["adc_type"] == "com.google.auth.oauth2.ComputeEngineCredentials"
    assert out["access_token"] == live.current_token()  # what the Google stand-in issued, via metaemu
    assert isinstance(out["expiry_unix"], int)
    assert out["email"] == SERVICE_ACCOUNT  # getAccount(); which request it sends differs (see the tests)
    assert isinstance(out["id_token"], str)
    live.verify_id_token(out["id_token"], email=True)  # format=full carries the email claim
    assert proxy.seen[0].path == "/"  # detection comes first
    for request in proxy.seen:  # CL-04
        assert request.method == "GET"
        assert request.headers.get("Metadata-Flavor") == "Google", request
    identity = proxy.only(f"{SA}/default/identity")
    assert f"audience={AUDIENCE}" in identity.raw_query  # CL-10: the audience is sent raw, not encoded
    assert identity.query == {"audience": [AUDIENCE], "format": ["full"]}  # no licenses=, as asked


async def test_cl12_current_java_library_gets_token_account_id_token_project_and_universe(
    live: Live, tmp_path: Path
) -> None:
    out, proxy = await run_flavour("current", live, tmp_path)
    assert out["library_version"] == "1.58.0"  # the pin in tests/clients/java/current/pom.xml
    assert_common(out, proxy, live)
    # Only the current library looks up the project (CL-06) and the universe domain (CL-11).
    assert (out["project_api"], out["project"]) == (True, PROJECT_ID)
    assert (out["universe_api"], out["universe_domain"]) == (True, "googleapis.com")
    assert proxy.paths() == ["/", f"{SA}/default/token", f"{SA}/default/email", f"{SA}/default/identity",
                             "/computeMetadata/v1/project/project-id",
                             "/computeMetadata/v1/universe/universe-domain"]
    # Unlike 0.18, the scopes of createScoped reach the token request (CL-09).
    token_request = proxy.only(f"{SA}/default/token")
    assert token_request.query == {"scopes": [SCOPE]}
    assert "auth-request-type/at cred-type/mds" in token_request.headers["x-goog-api-client"]


async def test_cl12_debian_java_0_18_gets_token_without_scopes_account_and_id_token(live: Live, tmp_path: Path) -> None:
    out, proxy = await run_flavour("debian", live, tmp_path)
    assert out["library_version"] == "0.18.0"  # Debian bookworm's libgoogle-auth-java 0.18.0-2
    assert_common(out, proxy, live)
    # 0.18 has no getProjectId() or getUniverseDomain(): project and universe domain cannot be judged here.
    assert (out["project_api"], out["project"]) == (False, None)
    assert (out["universe_api"], out["universe_domain"]) == (False, None)
    # clients.md §8.2: exactly these four requests. The token request has NO scopes parameter even after
    # createScoped (0.18 ignores scopes), so metaemu answers with the default scopes (CL-09); getAccount()
    # reads the recursive listing, which must be the JSON map keyed by account (CL-07).
    assert proxy.paths() == ["/", f"{SA}/default/token", f"{SA}/", f"{SA}/default/identity"]
    assert proxy.only(f"{SA}/default/token").query == {}
    assert proxy.only(f"{SA}/").query == {"recursive": ["true"]}
    assert proxy.seen[0].headers["User-Agent"].startswith("Google-HTTP-Java-Client/1.42.0")
    assert all("x-goog-api-client" not in r.headers for r in proxy.seen)
