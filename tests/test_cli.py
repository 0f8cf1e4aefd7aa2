"""``metaemu`` as a process: exit codes, bad config, port collisions (SEC-38), SIGTERM with a request
in flight, JSON logs that never contain token material (SEC-33), and the admin listener."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from metaemu import __version__
from metaemu.testing.world import World
from tests.helpers import FLAVOR, SA_PATH, serving_ports

METAEMU = [sys.executable, "-m", "metaemu"]


async def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*METAEMU, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_version() -> None:
    code, out, _ = await run("version")
    assert (code, out) == (0, f"metaemu {__version__}\n")


async def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"project_id": "p", "listen": "127.0.0.1:1", "admin_listen": "127.0.0.1:1",
                                    "workload_identity": {"audience": "//iam.googleapis.com/projects/1/x",
                                                          "source": {"type": "kubernetes", "token_file": "t"}}}))
    code, out, err = await run("serve", "--config", str(path))
    assert code == 2
    assert out == ""
    assert err.startswith("metaemu: configuration error: admin_listen: ")
    assert "must not share the metadata address" in err


async def test_missing_config_exits_2() -> None:
    code, _, err = await run("serve", env={"PATH": "/usr/bin"})
    assert code == 2
    assert "--config (or METAEMU_CONFIG)" in err


@pytest.fixture
async def google_url(world: World) -> AsyncIterator[str]:
    runner = web.AppRunner(world.google.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def write_config(world: World, google_url: str, tmp_path: Path, *, listen: str = "127.0.0.1:0",
                 **extra: Any) -> Path:
    """A config whose listeners default to port 0: the child binds, ``serving_ports`` reads back."""
    raw = world.config(sts_url=f"{google_url}/v1/token", iam_url=f"{google_url}/v1",
                       listen=listen, admin_listen="127.0.0.1:0", **extra)
    path = tmp_path / "metaemu.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


async def wait_ready(session: aiohttp.ClientSession, admin: int, deadline_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while loop.time() < end:
        try:
            async with session.get(f"http://127.0.0.1:{admin}/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)  # polling a child process coming up, bounded by the deadline
    raise AssertionError("metaemu did not become ready")


async def until_metric(session: aiohttp.ClientSession, admin: int, name: str, value: float,
                       deadline_s: float = 15.0) -> None:
    """Poll the child's /metrics until the unlabelled sample ``name`` reads ``value``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while loop.time() < end:
        async with session.get(f"http://127.0.0.1:{admin}/metrics") as r:
            for family in text_string_to_metric_families(await r.text()):
                if any(s.name == name and not s.labels and s.value == value for s in family.samples):
                    return
        await asyncio.sleep(0.02)  # polling another process's state, bounded by the deadline
    raise AssertionError(f"{name} never reached {value}")


async def test_sec38_port_in_use_exits_2_with_a_clear_message(world: World, google_url: str,
                                                              tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(world, google_url, tmp_path, listen=f"127.0.0.1:{port}")
        code, _, err = await run("serve", "--config", str(path))
    assert code == 2
    assert f"listen: cannot listen on 127.0.0.1:{port}" in err


async def test_sigterm_finishes_in_flight_requests_exits_0_and_sec33_logs_no_tokens(
        world: World, google_url: str, tmp_path: Path) -> None:
    path = write_config(world, google_url, tmp_path, log_level="debug")
    proc = await asyncio.create_subprocess_exec(*METAEMU, "serve", "--config", str(path),
                                                stderr=asyncio.subprocess.PIPE)
    secrets: list[str] = [world.token_file.read_text()]
    try:
        port, admin, early_logs = await serving_ports(proc)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, admin)
            async with session.get(f"http://127.0.0.1:{admin}/healthz") as r:
                assert r.status == 200
            async with session.get(base + SA_PATH + "token", headers=FLAVOR) as r:
                secrets.append((await r.json(content_type=None))["access_token"])
            async with session.get(base + SA_PATH + "identity?audience=https://x.example", headers=FLAVOR) as r:
                secrets.append(await r.text())
            # A denial makes metaemu log upstream's reason: still no token in it.
            world.google.revoke("demo-app@demo-project.iam.gserviceaccount.com", world.principal)
            async with session.get(base + SA_PATH + "token?scopes=https://www.googleapis.com/auth/pubsub",
                                   headers=FLAVOR) as r:
                assert r.status == 403
            async with session.get(f"http://127.0.0.1:{admin}/metrics") as r:
                metrics_text = await r.text()
            # A long poll is in flight when SIGTERM arrives: it is answered, not dropped.
            poll = asyncio.create_task(session.get(
                base + "/computeMetadata/v1/project/project-id?wait_for_change=true&timeout_sec=60", headers=FLAVOR))
            await until_metric(session, admin, "metaemu_long_polls_in_flight", 1.0)
            proc.send_signal(signal.SIGTERM)
            async with await asyncio.wait_for(poll, 15) as r:
                assert (r.status, await r.text()) == (200, "demo-project")
            assert await asyncio.wait_for(proc.wait(), 15) == 0
            with pytest.raises(aiohttp.ClientConnectionError):
                async with session.get(base + "/"):
                    pass
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    logs = "".join(early_logs) + (await proc.stderr.read()).decode()
    lines = [json.loads(line) for line in logs.splitlines() if line.strip()]
    assert {"time", "level", "logger", "msg"} <= set(lines[0])
    assert any(line["msg"] == "refresh failed" for line in lines)
    assert any(line["msg"] == "stopped" for line in lines)
    for secret in secrets:  # SEC-33: no access token, ID token or subject JWT in logs or labels
        for fragment in (secret, secret[:40], secret[-40:]):
            assert fragment not in logs
            assert fragment not in metrics_text


async def test_credential_provider_subcommand_speaks_kubelets_contract_on_bad_input() -> None:
    proc = await asyncio.create_subprocess_exec(*METAEMU, "credential-provider", "--audience=//iam.googleapis.com/x",
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(b"not json"), 30)
    assert proc.returncode != 0
    assert out == b""  # kubelet reads stdout: nothing on failure
    assert err
