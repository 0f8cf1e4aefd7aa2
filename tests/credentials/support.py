"""Shared pieces for the credential-pipeline tests.

- ``CannedClient``: an ``HttpClient`` answering from a script, for response shapes the fake Google
  never produces (string ``expires_in``, fractional ``expireTime``, transport failures).
- ``MemorySource``: a subject-token source without a file or a thread.
- ``build_pipeline`` / ``build_credentials``: the pipeline and its caches wired the way
  ``metaemu/server/app.py::build_components`` wires them, minus the server (the ``Refresher`` is
  never started, so nothing runs in the background).
- ``serve``: an aiohttp app on 127.0.0.1, port 0 (for google-auth and ``AiohttpClient``).
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from aiohttp import web

from metaemu.cache.credentials import CachedCredentials
from metaemu.cache.refresher import Refresher
from metaemu.clock import Clock
from metaemu.credentials.impersonation import IamCredentialsClient
from metaemu.credentials.pipeline import Identity, Pipeline
from metaemu.credentials.sources import SubjectTokenSource
from metaemu.credentials.sts import StsClient
from metaemu.credentials.tokens import JWT_TOKEN_TYPE, SubjectToken
from metaemu.credentials.upstream import UpstreamCaller
from metaemu.metrics import Metrics
from metaemu.testing.world import AUDIENCE
from metaemu.transport import HttpClient, HttpRequest, HttpResponse

STS_URL = "https://sts.googleapis.test/v1/token"
IAM_URL = "https://iamcredentials.googleapis.test/v1"
IAM_SCOPE = "https://www.googleapis.com/auth/iam"
CLOUD_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
STORAGE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
#: The configured default (``endpoints.timeout_seconds``); only the in-process deadline reads it.
TIMEOUT_S = 10.0


class CannedClient:
    """``HttpClient`` that records each request and answers with the next scripted reply.

    A reply that is an exception is raised instead (``TransportFailure`` plays "no response").
    ``on_send`` runs before answering, e.g. to advance a fake clock by the network latency.
    """

    def __init__(self, *replies: HttpResponse | Exception, on_send: Callable[[], None] | None = None) -> None:
        self.requests: list[HttpRequest] = []
        self._replies: deque[HttpResponse | Exception] = deque(replies)
        self._on_send = on_send

    async def send(self, request: HttpRequest) -> HttpResponse:
        self.requests.append(request)
        if self._on_send is not None:
            self._on_send()
        reply = self._replies.popleft()
        if isinstance(reply, Exception):
            raise reply
        return reply


class MemorySource:
    """A ``SubjectTokenSource`` answering from memory: no worker thread, so a test that counts loop
    iterations (``settle()``) sees the exchange start deterministically."""

    kind = "memory"

    def __init__(self, token: str, *, token_type: str = JWT_TOKEN_TYPE) -> None:
        self.token = token
        self.token_type = token_type
        self.fetches = 0

    async def fetch(self) -> SubjectToken:
        self.fetches += 1
        return SubjectToken(value=self.token, token_type=self.token_type)


def json_reply(payload: Any, *, status: int = 200) -> HttpResponse:
    return HttpResponse(status=status, headers={"Content-Type": "application/json; charset=UTF-8"},
                        body=json.dumps(payload).encode())


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def build_pipeline(*, http: HttpClient, clock: Clock, metrics: Metrics, source: SubjectTokenSource,
                   service_account: str | None, scopes: Sequence[str] = (CLOUD_SCOPE,),
                   lifetime_s: int = 3600, audience: str = AUDIENCE, sts_url: str = STS_URL,
                   iam_url: str = IAM_URL) -> Pipeline:
    """One identity's pipeline, as ``build_components`` assembles it from a ``Config``."""
    return Pipeline(
        identity=Identity(audience=audience, service_account=service_account, default_scopes=tuple(scopes),
                          lifetime_s=lifetime_s),
        source=source,
        sts=StsClient(caller=UpstreamCaller(http=http, metrics=metrics, backend="sts"), url=sts_url,
                      clock=clock, timeout_s=TIMEOUT_S),
        iam=IamCredentialsClient(caller=UpstreamCaller(http=http, metrics=metrics, backend="iam"),
                                 base_url=iam_url, clock=clock, timeout_s=TIMEOUT_S),
    )


def build_credentials(pipeline: Pipeline, *, clock: Clock, metrics: Metrics) -> CachedCredentials:
    """The caches over ``pipeline`` with a ``Refresher`` that is never started."""
    return CachedCredentials(pipeline=pipeline, clock=clock, metrics=metrics, refresher=Refresher(clock=clock))


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 at a free port; yields the base URL (no trailing slash)."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
