"""``metaemu demo``: the real server wired to an embedded stand-in for Google STS and IAM Credentials
and a locally minted Kubernetes-style token, all on loopback, so a newcomer sees it work with no cloud
account. The token file is rotated like kubelet does (at 80 % of its lifetime).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
from pathlib import Path

from aiohttp import web

from metaemu import eventloop
from metaemu.clock import SystemClock
from metaemu.config import parse_config
from metaemu.errors import ConfigError
from metaemu.logs import setup_logging
from metaemu.server.runner import MetaemuServer, StartupError, serve_until_signalled
from metaemu.testing.world import KSA, NAMESPACE, SERVICE_ACCOUNT, World, build_world

#: kubelet rewrites a projected token at ~80 % of its lifetime (upstream.md §6).
TOKEN_LIFETIME_S = 3600
TOKEN_ROTATE_S = 0.8 * TOKEN_LIFETIME_S


def run_demo(*, listen: str, admin_listen: str, profile: str, env: dict[str, str]) -> int:
    setup_logging(env.get("METAEMU_LOG_LEVEL", "info"))
    try:
        eventloop.run(_demo(listen=listen, admin_listen=admin_listen, profile=profile))
    except (ConfigError, StartupError) as exc:
        print(f"metaemu demo: {exc}")
        return 2
    return 0


async def _demo(*, listen: str, admin_listen: str, profile: str) -> None:
    with tempfile.TemporaryDirectory(prefix="metaemu-demo-") as tmp:
        world = build_world(Path(tmp))
        google = web.AppRunner(world.google.app(), access_log=None)
        await google.setup()
        await web.TCPSite(google, "127.0.0.1", 0).start()
        google_url = f"http://127.0.0.1:{google.addresses[0][1]}"
        raw = world.config(sts_url=f"{google_url}/v1/token", iam_url=f"{google_url}/v1", listen=listen,
                           admin_listen=admin_listen, profile=profile)
        config = parse_config(raw, hostname=socket.gethostname(), base_dir=Path(tmp))
        server = MetaemuServer(config)
        rotator = asyncio.create_task(_rotate(world), name="token_rotator")
        try:
            await serve_until_signalled(server, started=lambda: print(_banner(server, google_url), flush=True))
        finally:
            rotator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rotator
            await google.cleanup()


async def _rotate(world: World) -> None:
    clock = SystemClock()
    while True:
        await clock.sleep(TOKEN_ROTATE_S)
        world.write_token(lifetime_s=TOKEN_LIFETIME_S)


def _banner(server: MetaemuServer, google_url: str) -> str:
    addr = str(server.metadata_address).replace("0.0.0.0", "127.0.0.1")
    url = server.metadata_url
    return f"""
metaemu demo: serving the GCE metadata API on {url} (admin: {server.admin_url}/metrics)
  workload identity: system:serviceaccount:{NAMESPACE}:{KSA} -> {SERVICE_ACCOUNT}
  Google STS and IAM Credentials: embedded stand-in at {google_url}

Point unmodified Google client libraries at it:
  export GCE_METADATA_HOST={addr} GCE_METADATA_IP={addr} GCE_METADATA_ROOT={addr}

Try it:
  curl -s -H 'Metadata-Flavor: Google' {url}/computeMetadata/v1/instance/service-accounts/default/token
  .venv/bin/python -c 'import google.auth, google.auth.transport.requests as r; c, p = google.auth.default(); \
c.refresh(r.Request()); print(p, c.service_account_email, c.token[:20] + "...")'

Ctrl-C to stop.
"""
