"""The admin listener: ``/metrics``, ``/healthz`` and ``/readyz``. Never bound on the metadata
address (SEC-32, config refuses it).

``/healthz`` answers 200 whenever the process can run a handler: it never depends on Google or the
Kubernetes API, so an upstream outage does not get metaemu restarted (SEC-36). ``/readyz`` is 200
only when the credentials side is ready (sidecar: the default token is cached; node mode: the pod
watch has synced) *and* the metadata listener answers a real request (a self-request, as the EKS
Pod Identity agent does; SEC-37).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from metaemu.metrics import Metrics

#: The self-probe is a loopback request answered from memory; a second means something is wrong.
SELF_PROBE_TIMEOUT_S = 1.0

_METRICS = web.AppKey("metrics", Metrics)
_READY: web.AppKey[Callable[[], str | None]] = web.AppKey("ready")
_PROBE_URL: web.AppKey[Callable[[], str]] = web.AppKey("probe_url")
_SESSION = web.AppKey("session", aiohttp.ClientSession)


def create_admin_app(*, metrics: Metrics, ready: Callable[[], str | None],
                     metadata_url: Callable[[], str]) -> web.Application:
    """``ready`` returns None when the credentials side is ready, else why not (sidecar: the default
    token is cached; node mode: the pod watch has synced)."""
    app = web.Application()
    app[_METRICS] = metrics
    app[_READY] = ready
    app[_PROBE_URL] = metadata_url
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.cleanup_ctx.append(_probe_session)
    return app


async def _probe_session(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=SELF_PROBE_TIMEOUT_S))
    app[_SESSION] = session
    yield
    await session.close()


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[_METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    reason = request.app[_READY]()
    if reason is not None:
        return web.Response(status=503, text=f"not ready: {reason}\n")
    url = request.app[_PROBE_URL]()
    try:
        async with request.app[_SESSION].get(url, headers={"Metadata-Flavor": "Google"}) as resp:
            ok = resp.status == 200 and resp.headers.get("Metadata-Flavor") == "Google"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return web.Response(status=503, text=f"not ready: metadata listener did not answer ({type(exc).__name__})\n")
    if not ok:
        return web.Response(status=503, text="not ready: metadata listener answered unexpectedly\n")
    return web.Response(text="ok\n")
