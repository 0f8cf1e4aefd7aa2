"""``metaemu webhook`` start-up: a configuration it (or the sidecar it would inject) cannot use
exits 2 naming the key, before anything listens."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metaemu import cli


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
    from metaemu.webhook.settings import load_settings

    path = write(tmp_path, config={"project_id": "p", "numeric_project_id": "1"})
    assert load_settings(path, env={"METAEMU_WEBHOOK_NAMESPACE": "infra"}).namespace == "infra"
