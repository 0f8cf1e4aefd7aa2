"""manifests/webhook (issue #14): what the rendered objects promise, asserted on them; the schemas
are tests/test_manifests.py's, the behaviour tests/kube/test_webhook.py's (a real API server)."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaemu.webhook.main import check_sidecar_config
from metaemu.webhook.server import REVIEW_DEADLINE_S
from metaemu.webhook.settings import parse_settings

ROOT = Path(__file__).resolve().parents[2]
BASE, CERT_MANAGER = ROOT / "manifests/webhook", ROOT / "manifests/webhook/cert-manager"
EXCLUDED = {"kube-system", "kube-node-lease", "kube-public", "metaemu-webhook", "metaemu-system"}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(directory: Path, kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [d for d in render(directory) if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def settings_of(directory: Path) -> Any:
    text = one(directory, "ConfigMap")["data"]["webhook.yaml"]
    return parse_settings(yaml.safe_load(text), base_dir=Path("/etc/metaemu-webhook"))


@pytest.mark.parametrize("directory", [BASE, CERT_MANAGER], ids=["generate", "cert-manager"])
def test_the_configuration_and_the_sidecar_it_injects_parse(directory: Path) -> None:
    settings = settings_of(directory)
    check_sidecar_config(settings)
    assert settings.namespace == "metaemu-webhook"


@pytest.mark.parametrize("directory", [BASE, CERT_MANAGER], ids=["generate", "cert-manager"])
def test_only_opted_in_pods_are_sent_and_each_at_most_once(directory: Path) -> None:
    by_namespace, by_pod = one(directory, "MutatingWebhookConfiguration")["webhooks"]
    for webhook in (by_namespace, by_pod):
        assert webhook["failurePolicy"] == "Fail" and webhook["reinvocationPolicy"] == "IfNeeded"
        assert webhook["sideEffects"] == "None" and webhook["admissionReviewVersions"] == ["v1"]
        assert REVIEW_DEADLINE_S < webhook["timeoutSeconds"] <= 10
        assert webhook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                     "resources": ["pods"], "scope": "Namespaced"}]
        names, _inject = webhook["namespaceSelector"]["matchExpressions"]
        assert names["key"] == "kubernetes.io/metadata.name" and names["operator"] == "NotIn"
        assert set(names["values"]) == EXCLUDED
        assert webhook["clientConfig"]["service"] == {"name": "metaemu-webhook", "namespace": "metaemu-webhook",
                                                      "path": "/mutate", "port": 443}
    # Disjoint: the namespace one takes labelled namespaces, the pod one every other namespace.
    assert by_namespace["namespaceSelector"]["matchExpressions"][1] == {
        "key": "metaemu.dev/inject", "operator": "In", "values": ["true"]}
    assert by_namespace["objectSelector"]["matchExpressions"] == [
        {"key": "metaemu.dev/inject", "operator": "NotIn", "values": ["false"]}]
    assert by_pod["namespaceSelector"]["matchExpressions"][1] == {
        "key": "metaemu.dev/inject", "operator": "NotIn", "values": ["true"]}
    assert by_pod["objectSelector"] == {"matchLabels": {"metaemu.dev/inject": "true"}}


def test_rbac_reads_namespaces_and_service_accounts_and_patches_only_its_own_configuration() -> None:
    rules = {r["metadata"]["name"]: r["rules"] for r in render(BASE) if r["kind"] == "ClusterRole"}
    assert rules == {
        "metaemu-webhook": [{"apiGroups": [""], "resources": ["namespaces", "serviceaccounts"], "verbs": ["get"]}],
        "metaemu-webhook-ca-bundle": [{"apiGroups": ["admissionregistration.k8s.io"],
                                       "resources": ["mutatingwebhookconfigurations"],
                                       "resourceNames": ["metaemu-webhook"], "verbs": ["get", "patch"]}]}
    assert settings_of(BASE).tls.generate.webhook_configuration == "metaemu-webhook"
    # With cert-manager the CA injector writes the bundle: no access to the configuration at all.
    assert {r["metadata"]["name"] for r in render(CERT_MANAGER) if r["kind"] == "ClusterRole"} == {"metaemu-webhook"}
    annotations = one(CERT_MANAGER, "MutatingWebhookConfiguration")["metadata"]["annotations"]
    assert annotations == {"cert-manager.io/inject-ca-from": "metaemu-webhook/metaemu-webhook"}


def test_the_generated_certificate_names_the_service_the_configuration_calls() -> None:
    from metaemu.webhook.certs import dns_names

    generate = settings_of(BASE).tls.generate
    service = one(BASE, "Service")
    assert generate.service == service["metadata"]["name"]
    assert f"{generate.service}.{service['metadata']['namespace']}.svc" in dns_names(generate, "metaemu-webhook")
    certificate = one(CERT_MANAGER, "Certificate")
    assert "metaemu-webhook.metaemu-webhook.svc" in certificate["spec"]["dnsNames"]
    deployment = one(CERT_MANAGER, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": certificate["spec"]["secretName"]}} in deployment["volumes"]


def test_the_webhook_pod_is_restricted() -> None:
    spec = one(BASE, "Deployment")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"]}}
    assert one(BASE, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_readmes_webhook_configuration_parses_and_its_sidecar_too() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- webhook-config -->\n```yaml\n", 1)[1].split("```", 1)[0]
    settings = parse_settings(yaml.safe_load(block), base_dir=Path("/"))
    check_sidecar_config(settings)
    assert settings.sidecar.default_variant == "loopback"
