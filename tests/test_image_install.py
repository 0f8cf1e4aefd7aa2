"""What the Dockerfile does, without a container engine (issue #5): metaemu's wheel installs into
a fresh virtual environment from the same hash-checked requirements.lock, and `metaemu serve`
starts and serves a token as a non-root uid from a read-only working directory, reading a
read-only configuration. (The install itself is the session fixture ``image_install``, tests/conftest.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from metaemu.testing.world import SERVICE_ACCOUNT, World
from tests.helpers import FLAVOR, SA_PATH, serving_ports

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to run metaemu as another uid")


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    for dep in ("aiohttp", "cachetools", "prometheus-client", "pyyaml", "pyjwt", "botocore", "google-auth", "uvloop"):
        assert f"\n{dep}==" in f"\n{lock}", dep
    assert lock.count("--hash=sha256:") > 20


@pytest.fixture
async def google_url(world: World) -> AsyncIterator[str]:
    runner = web.AppRunner(world.google.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_installed_wheel_serves_as_non_root_from_a_read_only_directory(
        image_install: Path, world: World, google_url: str) -> None:
    etc = image_install / "etc"
    etc.mkdir(exist_ok=True)
    token = etc / "token"
    token.write_text(world.token_file.read_text())
    raw = world.config(sts_url=f"{google_url}/v1/token", iam_url=f"{google_url}/v1", listen="127.0.0.1:0",
                       admin_listen="127.0.0.1:0")
    raw["workload_identity"]["source"]["token_file"] = str(token)
    (etc / "metaemu.yaml").write_text(yaml.safe_dump(raw))
    for path in (etc, token, etc / "metaemu.yaml"):
        path.chmod(0o555 if path.is_dir() else 0o444)
    env = {"PATH": f"{image_install}/venv/bin:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = await asyncio.create_subprocess_exec(
        "setpriv", "--reuid=65532", "--regid=65532", "--clear-groups", "--",
        str(image_install / "venv/bin/metaemu"), "serve", "--config", str(etc / "metaemu.yaml"),
        cwd=str(etc), env=env, stderr=asyncio.subprocess.PIPE)
    try:
        port, _, lines = await serving_ports(proc)
        serving = json.loads(lines[-1])
        assert serving["event_loop"] == "uvloop"  # the image runs on uvloop (issue #12)
        async with aiohttp.ClientSession() as session:
            body = await _first_token(session, f"http://127.0.0.1:{port}", proc)
            assert body["token_type"] == "Bearer"
            async with session.get(f"http://127.0.0.1:{port}{SA_PATH}email", headers=FLAVOR) as r:
                assert await r.text() == SERVICE_ACCOUNT
        status = await asyncio.to_thread(Path(f"/proc/{proc.pid}/status").read_text)
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {"65532"}
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def _first_token(session: aiohttp.ClientSession, base: str, proc: asyncio.subprocess.Process) -> dict[str, str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while loop.time() < deadline:
        assert proc.returncode is None, "metaemu exited"
        try:
            async with session.get(base + SA_PATH + "token", headers=FLAVOR) as r:
                if r.status == 200:
                    body: dict[str, str] = await r.json(content_type=None)
                    return body
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)  # a child process coming up, bounded by the deadline
    raise AssertionError("no token from the installed wheel")
