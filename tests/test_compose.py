"""docker-compose.yml, rendered by the real docker compose (the current CLI, built from its source
by scripts/install-clients.sh, and Debian's docker-compose 1.29): the demo profile needs no Google
variable, the development stack explains each missing one when it starts, and the two metadata
servers never claim one address (issue #13). No container engine runs here, so the rendered
services are checked, and the start-up check is run with /bin/sh exactly as compose renders it."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaemu.config import load_config

ROOT = Path(__file__).resolve().parents[1]
GO_MOD = (ROOT / "scripts/compose/go.mod").read_text()
COMPOSE_VERSION = re.search(r"github\.com/docker/compose/v5 (v\S+)", GO_MOD).group(1)  # type: ignore[union-attr]
BUILT = Path.home() / ".cache/metaemu" / f"docker-compose-{COMPOSE_VERSION}" / "docker-compose"
GOOGLE_ENV = {"GOOGLE_IMPERSONATE_SERVICE_ACCOUNT": "app@my-project.iam.gserviceaccount.com",
              "GOOGLE_CLOUD_PROJECT_NUMBER": "123456789012", "HOME": "/home/dev"}


def composers() -> list[Any]:
    return [pytest.param([str(BUILT)], id=f"docker-compose-{COMPOSE_VERSION}"),
            pytest.param(["docker-compose"], id="debian-docker-compose-1.29", marks=pytest.mark.skipif(
                shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed"))]


@pytest.fixture(params=composers())
def compose(request: pytest.FixtureRequest) -> list[str]:
    command: list[str] = request.param
    if command[0] == str(BUILT):  # make test builds it (scripts/install-clients.sh): never skipped
        assert BUILT.exists(), f"{BUILT} is missing: run bash scripts/install-clients.sh"
    return command


def render(compose: list[str], env: dict[str, str], *profiles: str) -> subprocess.CompletedProcess[str]:
    args = [a for p in profiles for a in ("--profile", p)]
    return subprocess.run([*compose, "-f", str(ROOT / "docker-compose.yml"), *args, "config"], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})


def services(compose: list[str], env: dict[str, str], *profiles: str) -> dict[str, Any]:
    """The services ``docker compose --profile ... up`` would start (``config`` prints them all)."""
    out = render(compose, env, *profiles)
    assert out.returncode == 0, out.stderr
    rendered: dict[str, Any] = yaml.safe_load(out.stdout)["services"]
    return {name: s for name, s in rendered.items() if not s.get("profiles") or set(s["profiles"]) & set(profiles)}


def volumes(service: dict[str, Any]) -> set[str]:
    """Volumes as SOURCE:TARGET[:ro] (compose 2 prints the long form)."""
    out = set()
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            v = f"{v['source']}:{v['target']}" + (":ro" if v.get("read_only") else "")
        out.add(str(v))
    return out


def hosts(service: dict[str, Any]) -> set[str]:
    """extra_hosts as NAME:ADDRESS (compose 2 prints NAME=ADDRESS)."""
    return {entry.replace("=", ":", 1) for entry in service.get("extra_hosts", [])}


def test_the_demo_profile_renders_with_no_google_variable_set(compose: list[str]) -> None:
    rendered = services(compose, {}, "demo")  # README: "No cloud account? docker compose --profile demo up demo-app"
    assert {"metaemu-demo", "demo-app"} <= set(rendered)
    assert "169.254.169.253:80" in rendered["metaemu-demo"]["command"]


def test_the_development_stack_renders_with_the_variables(compose: list[str]) -> None:
    rendered = services(compose, GOOGLE_ENV)
    assert set(rendered) == {"metaemu", "app"}
    metaemu = rendered["metaemu"]
    assert metaemu["environment"] == {"METAEMU_SERVICE_ACCOUNT": GOOGLE_ENV["GOOGLE_IMPERSONATE_SERVICE_ACCOUNT"],
                                      "METAEMU_NUMERIC_PROJECT_ID": GOOGLE_ENV["GOOGLE_CLOUD_PROJECT_NUMBER"]}
    assert "/home/dev/.config/gcloud:/gcloud:ro" in volumes(metaemu)  # the developer's ADC, read-only
    assert metaemu["networks"]["metadata"]["ipv4_address"] == "169.254.169.254"
    app = rendered["app"]
    assert "metadata.google.internal:169.254.169.254" in hosts(app)
    assert app["depends_on"]["metaemu"]["condition"] == "service_healthy"
    assert "environment" not in app  # no GCE_METADATA_*: the app finds the server as on GCE


def test_both_profiles_together_never_claim_one_address_twice(compose: list[str]) -> None:
    rendered = services(compose, GOOGLE_ENV, "demo")
    claimed: dict[tuple[str, str], str] = {}
    for name, service in rendered.items():
        for network, settings in (service.get("networks") or {}).items():
            address = (settings or {}).get("ipv4_address")
            if address:
                assert (network, address) not in claimed, f"{name}, {claimed[(network, address)]}: {address}"
                claimed[(network, address)] = name
    assert claimed == {("metadata", "169.254.169.254"): "metaemu", ("metadata", "169.254.169.253"): "metaemu-demo"}
    demo_app = rendered["demo-app"]
    assert {demo_app["environment"][k] for k in ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT")} == {
        "169.254.169.253"}
    assert "metadata.google.internal:169.254.169.253" in hosts(demo_app)
    for server in ("metaemu", "metaemu-demo"):  # unprivileged and read-only, both
        assert rendered[server]["sysctls"]["net.ipv4.ip_unprivileged_port_start"] == "80"
        assert rendered[server]["read_only"] is True
        assert rendered[server]["cap_drop"] == ["ALL"]


def start_check(compose: list[str]) -> list[str]:
    """The metaemu service's entrypoint as the container would run it: compose turns ``$$`` into
    ``$`` when it creates the container (``config`` prints the escaped form)."""
    entrypoint = services(compose, {})["metaemu"]["entrypoint"]
    assert entrypoint[:2] == ["/bin/sh", "-c"]
    return [part.replace("$$", "$") for part in entrypoint]


@pytest.fixture
def fake_metaemu(tmp_path: Path) -> Path:
    """A ``metaemu`` on PATH that prints its arguments, standing in for the image's entry point."""
    path = tmp_path / "bin" / "metaemu"
    path.parent.mkdir()
    path.write_text('#!/bin/sh\necho "metaemu $*"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path.parent


@pytest.mark.parametrize(("given", "missing"), [
    ({}, ["GOOGLE_IMPERSONATE_SERVICE_ACCOUNT", "GOOGLE_CLOUD_PROJECT_NUMBER"]),
    ({"METAEMU_SERVICE_ACCOUNT": "app@p.iam.gserviceaccount.com"}, ["GOOGLE_CLOUD_PROJECT_NUMBER"]),
    ({"METAEMU_NUMERIC_PROJECT_ID": "1"}, ["GOOGLE_IMPERSONATE_SERVICE_ACCOUNT"]),
])
def test_docker_compose_up_names_each_missing_variable_and_stops(compose: list[str], fake_metaemu: Path,
                                                                 given: dict[str, str], missing: list[str]) -> None:
    # What the container sees when the variable was unset: compose passes the empty value.
    env = {"PATH": f"{fake_metaemu}:/usr/bin:/bin", "METAEMU_SERVICE_ACCOUNT": "", "METAEMU_NUMERIC_PROJECT_ID": "",
           **given}
    out = subprocess.run(start_check(compose), capture_output=True, text=True, timeout=30, env=env)
    assert (out.returncode, out.stdout) == (2, "")
    assert [line.split()[2] for line in out.stderr.splitlines()] == missing  # "metaemu: set NAME to ..."


def test_with_both_variables_the_service_starts_metaemu_serve(compose: list[str], fake_metaemu: Path) -> None:
    env = {"PATH": f"{fake_metaemu}:/usr/bin:/bin", "METAEMU_SERVICE_ACCOUNT": "app@p.iam.gserviceaccount.com",
           "METAEMU_NUMERIC_PROJECT_ID": "1"}
    out = subprocess.run(start_check(compose), capture_output=True, text=True, timeout=30, env=env)
    assert (out.returncode, out.stdout, out.stderr) == (0, "metaemu serve --config /etc/metaemu/metaemu.yaml\n", "")


def test_the_compose_metaemu_config_with_its_environment_is_valid() -> None:
    config = load_config(path=ROOT / "compose/metaemu.yaml", env={
        "METAEMU_SERVICE_ACCOUNT": GOOGLE_ENV["GOOGLE_IMPERSONATE_SERVICE_ACCOUNT"],
        "METAEMU_NUMERIC_PROJECT_ID": GOOGLE_ENV["GOOGLE_CLOUD_PROJECT_NUMBER"]})
    assert config.workload_identity is not None and config.workload_identity.source.kind == "google"
    assert (config.project_id, config.email) == ("my-project", GOOGLE_ENV["GOOGLE_IMPERSONATE_SERVICE_ACCOUNT"])
    assert str(config.listen) == "169.254.169.254:80"


def test_the_built_compose_is_the_pinned_version() -> None:
    out = subprocess.run([str(BUILT), "version"], capture_output=True, text=True, timeout=30, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"Docker Compose version {COMPOSE_VERSION}"
