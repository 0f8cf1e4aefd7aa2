"""Every kustomization renders with `kubectl kustomize` and every built-in resource validates
against the Kubernetes schemas, strictly (unknown fields rejected), on the oldest Kubernetes
each supports (native sidecars: 1.29; node mode's admission policy: 1.30) and the newest the
validator knows. Custom resources
(PodMonitor, PrometheusRule, cert-manager's Issuer and Certificate) are checked for their apiVersion
and kind."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
KUSTOMIZATIONS = sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))
CUSTOM = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
          ("monitoring.coreos.com/v1", "ServiceMonitor"),
          ("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}

#: Kustomizations whose oldest supported Kubernetes is newer than 1.29: node mode ships a
#: ValidatingAdmissionPolicy, admissionregistration.k8s.io/v1 from 1.30.
OLDEST_VERSION = {"node": "1.30.0"}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def render(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(MANIFESTS)))
@pytest.mark.parametrize("version", ["oldest", kubernetes_validate.latest_version()])
def test_kustomization_renders_and_validates(directory: Path, version: str) -> None:
    if version == "oldest":
        version = OLDEST_VERSION.get(directory.relative_to(MANIFESTS).as_posix(), "1.29.0")
    resources = render(directory)
    assert resources
    for resource in resources:
        if (resource["apiVersion"], resource["kind"]) in CUSTOM:
            assert resource["metadata"]["name"]
            continue
        kubernetes_validate.validate(resource, version, strict=True)
