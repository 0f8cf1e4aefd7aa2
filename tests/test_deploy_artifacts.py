"""The shipped deployment artefacts are valid: the sidecar manifests render, the configuration
they embed is one metaemu accepts, and the compose file wires the demo to 169.254.169.254."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaemu.config import Config, WorkloadIdentity, parse_config

ROOT = Path(__file__).resolve().parents[1]


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_sidecar_configmap_holds_a_valid_metaemu_config() -> None:
    (configmap,) = load_all(ROOT / "manifests/sidecar/base/configmap.yaml")
    config = parse_config(yaml.safe_load(configmap["data"]["metaemu.yaml"]), hostname="pod", base_dir=Path("/"))
    assert str(config.listen) == "169.254.169.254:80"  # on the pod's loopback (SEC-16)
    assert config.admin_listen.host == "127.0.0.1"  # SEC-32
    (deployment,) = load_all(ROOT / "manifests/sidecar/base/deployment.yaml")
    spec = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "gcp-token"]
    token = volume["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == _wi(config).audience  # the projected token is for the provider
    init, sidecar = spec["initContainers"]
    assert "ip addr add 169.254.169.254/32 dev lo" in init["command"][-1]  # what test_sidecar_netns does
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "80"} in spec["securityContext"]["sysctls"]
    assert spec["hostAliases"] == [{"ip": "169.254.169.254", "hostnames": ["metadata.google.internal", "metadata"]}]
    assert "env" not in spec["containers"][0]  # the app needs no change at all


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_sidecar_kustomization_renders() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "manifests/sidecar")], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out) if d)
    assert kinds == ["ConfigMap", "Deployment", "ServiceAccount"]


COMPOSE_ENV = {"GOOGLE_IMPERSONATE_SERVICE_ACCOUNT": "app@my-project.iam.gserviceaccount.com",
               "GOOGLE_CLOUD_PROJECT_NUMBER": "123456789012", "HOME": "/home/dev"}


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "--profile", "demo", "config"],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})


def test_compose_metaemu_config_with_its_environment_is_valid() -> None:
    from metaemu.config import load_config

    config = load_config(path=ROOT / "compose/metaemu.yaml", env={
        "METAEMU_SERVICE_ACCOUNT": COMPOSE_ENV["GOOGLE_IMPERSONATE_SERVICE_ACCOUNT"],
        "METAEMU_NUMERIC_PROJECT_ID": COMPOSE_ENV["GOOGLE_CLOUD_PROJECT_NUMBER"]})
    assert _wi(config).source.kind == "google"
    assert (config.project_id, config.email) == ("my-project", COMPOSE_ENV["GOOGLE_IMPERSONATE_SERVICE_ACCOUNT"])
    assert str(config.listen) == "169.254.169.254:80"


def test_dockerfile_runs_as_non_root_with_metaemu_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 65532:65532" in text
    assert 'ENTRYPOINT ["metaemu"]' in text
    assert 'CMD ["serve"]' in text


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_compose_wiring_for_development_and_demo() -> None:
    out = compose_config(COMPOSE_ENV)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    for name in ("metaemu", "metaemu-demo"):  # the real metadata address, unprivileged, read-only
        server = services[name]
        assert server["networks"]["metadata"]["ipv4_address"] == "169.254.169.254"
        assert server["sysctls"]["net.ipv4.ip_unprivileged_port_start"] == "80"
        assert server["read_only"] is True
    metaemu = services["metaemu"]
    assert "/home/dev/.config/gcloud:/gcloud:ro" in metaemu["volumes"]  # the developer's ADC, read-only
    assert metaemu["environment"]["METAEMU_SERVICE_ACCOUNT"] == COMPOSE_ENV["GOOGLE_IMPERSONATE_SERVICE_ACCOUNT"]
    assert "169.254.169.254:80" in services["metaemu-demo"]["command"]
    for app, server_name in (("app", "metaemu"), ("demo-app", "metaemu-demo")):
        assert "metadata.google.internal:169.254.169.254" in services[app]["extra_hosts"]
        assert services[app]["depends_on"][server_name]["condition"] == "service_healthy"
        assert "environment" not in services[app]  # no GCE_METADATA_* needed: no code or config change


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_compose_refuses_to_start_without_the_service_account() -> None:
    out = compose_config({"HOME": "/home/dev", "GOOGLE_CLOUD_PROJECT_NUMBER": "1"})
    assert out.returncode != 0
    assert "GOOGLE_IMPERSONATE_SERVICE_ACCOUNT" in out.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize(("variant", "kind"), [("", "kubernetes"), ("overlays/eks", "aws"),
                                               ("overlays/serviceauthcentral", "oidc")])
def test_every_sidecar_variant_embeds_a_config_metaemu_accepts(variant: str, kind: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "manifests/sidecar" / variant)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out) if d}
    config = parse_config(yaml.safe_load(docs["ConfigMap"]["data"]["metaemu.yaml"]), hostname="pod",
                          base_dir=Path("/"))
    assert _wi(config).source.kind == kind
    assert str(config.listen) == "169.254.169.254:80"
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in spec["initContainers"][1]["volumeMounts"]}
    source = _wi(config).source
    token_file = getattr(source, "token_file", None) or getattr(source, "assertion_file", None)
    if token_file is not None:  # the file the config reads is mounted
        assert str(Path(str(token_file)).parent) in mounts
    if kind == "aws":
        sa = docs["ServiceAccount"]["metadata"]["annotations"]
        assert sa["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
        assert all(v["name"] != "gcp-token" for v in spec["volumes"])


def _wi(config: Config) -> WorkloadIdentity:
    """The sidecar-mode identity of ``config`` (None only in node mode)."""
    assert config.workload_identity is not None
    return config.workload_identity
