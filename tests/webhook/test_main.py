"""``metaemu webhook`` start-up: a configuration it (or the sidecar it would inject) cannot use
exits 2 naming the key, before anything listens."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from metaemu import cli
from metaemu.webhook.settings import load_settings


def write(tmp_path: Path, **sidecar: object) -> Path:
    path = tmp_path / "webhook.yaml"
    path.write_text(yaml.safe_dump({
        "listen": "127.0.0.1:0", "tls": {"generate": {}},
        "sidecar": {"image": "metaemu:1", "audience": "//iam.googleapis.com/projects/1/locations/global/"
                    "workloadIdentityPools/p/providers/q", **sidecar}}))
    return path


def test_without_a_configuration_it_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["webhook"], environ={}) == 2
    assert "--config (or METAEMU_WEBHOOK_CONFIG) is required" in capsys.readouterr().err


@pytest.mark.parametrize(("sidecar", "key"), [
    ({"config": {"project_id": "p", "numeric_project_id": "x1"}}, "numeric_project_id"),
    ({"config": {"project_id": "p", "listen": "0.0.0.0:80"}}, "sidecar.config"),
    ({"environment_listen": "0.0.0.0:8988"}, "sidecar.environment_listen"),
    ({"default_variant": "iptables"}, "sidecar.default_variant"),
])
def test_a_configuration_the_sidecar_could_not_use_exits_2_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], sidecar: dict[str, object], key: str) -> None:
    assert cli.main(["webhook", "--config", str(write(tmp_path, **sidecar))], environ={}) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaemu webhook: configuration error: ") and key in err, err


def test_metaemu_webhook_namespace_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, config={"project_id": "p", "numeric_project_id": "1"})
    assert load_settings(path, env={"METAEMU_WEBHOOK_NAMESPACE": "infra"}).namespace == "infra"


async def test_the_process_serves_https_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    """``metaemu webhook`` as kubelet starts it: JSON logs, the HTTPS listener (port 0, read back
    from its log line), /healthz while the caBundle cannot be written yet (/readyz: 503), SIGTERM."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": "http://127.0.0.1:9"}}],  # nothing listens
        "users": [{"name": "t", "user": {"token": "t"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}]}))
    path = tmp_path / "webhook.yaml"
    path.write_text(yaml.safe_dump({
        "listen": "127.0.0.1:0", "kubeconfig": str(kubeconfig), "tls": {"generate": {"ip_addresses": ["127.0.0.1"]}},
        "sidecar": {"image": "metaemu:1", "audience": "//iam.googleapis.com/projects/1/locations/global/"
                    "workloadIdentityPools/p/providers/q", "config": {"project_id": "p"}}}))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "metaemu", "webhook", "--config", str(path),
                                                stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    try:
        while True:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, "metaemu webhook exited before serving"
            record = json.loads(line)
            if record.get("msg") == "webhook serving":
                break
        port = int(record["listen"].rpartition(":")[2])
        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE  # the CA is the process's own
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{port}/healthz", ssl=insecure) as reply:
                assert reply.status == 200
            async with session.get(f"https://127.0.0.1:{port}/readyz", ssl=insecure) as reply:
                assert reply.status == 503
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
