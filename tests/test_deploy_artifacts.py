"""The shipped deployment artefacts are valid: the sidecar manifests render, the configuration
they embed is one metaemu accepts (the compose file: tests/test_compose.py)."""

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


def test_dockerfile_runs_as_non_root_with_metaemu_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 65532:65532" in text
    assert 'ENTRYPOINT ["metaemu"]' in text
    assert 'CMD ["serve"]' in text


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
