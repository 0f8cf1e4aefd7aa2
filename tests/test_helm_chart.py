"""charts/metaemu (issue #14), judged by a real helm built from helm.sh/helm/v4 (scripts/helm.sh):
lint --strict clean; its defaults render exactly the objects of manifests/node (+ metrics,
monitoring and manifests/webhook when switched on); cross-referenced values come from one value;
bad values fail."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts/metaemu"
NAMESPACE = "metaemu-system"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                  "ValidatingAdmissionPolicyBinding"}
CUSTOM = {"PodMonitor", "PrometheusRule"}


@cache
def helm() -> str:
    out = subprocess.run(["bash", str(ROOT / "scripts/helm.sh"), "--print-dir"], stdout=subprocess.PIPE,
                         text=True, timeout=1800, check=True)
    return str(Path(out.stdout.strip()) / "helm")


def template(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), "template", "metaemu", str(CHART), "-n", NAMESPACE, *args],
                          capture_output=True, text=True, timeout=120)


def objects(*args: str) -> dict[tuple[str, str], dict[str, Any]]:
    out = template(*args)
    assert out.returncode == 0, out.stderr
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}


def kustomize(directory: str) -> dict[tuple[str, str], dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    found = {}
    for d in yaml.safe_load_all(out.stdout):
        if not d:
            continue
        if d["kind"] in CLUSTER_SCOPED:  # kustomize stamps its namespace on kinds it does not know
            d["metadata"].pop("namespace", None)
        else:
            d["metadata"].setdefault("namespace", NAMESPACE)  # manifests/monitoring names none
        found[(d["kind"], d["metadata"]["name"])] = d
    return found


def test_the_chart_lints_strictly() -> None:
    out = subprocess.run([helm(), "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_defaults_render_exactly_manifests_node() -> None:
    assert objects() == kustomize("manifests/node")


def test_metrics_and_monitoring_render_exactly_their_manifests() -> None:
    rendered = objects("--set", "metrics.enabled=true", "--set", "monitoring.podMonitor=true",
                       "--set", "monitoring.prometheusRule=true", "--set", "monitoring.dashboard=true")
    expected = kustomize("manifests/node") | kustomize("manifests/node/metrics") | kustomize("manifests/monitoring")
    assert rendered == expected


def test_the_charts_monitoring_files_are_the_manifests_own() -> None:
    for name in ("prometheusrule.yaml", "metaemu-dashboard.json"):
        assert (CHART / "files" / name).read_bytes() == (ROOT / "manifests/monitoring" / name).read_bytes()


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_non_default_values_render_and_validate_strictly(version: str) -> None:
    audience = "//iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/p/providers/c"
    rendered = objects("--set", f"node.audience={audience}", "--set", "node.passthrough={aws}",
                       "--set", "node.agentUid=61000", "--set", "metrics.enabled=true",
                       "--set", "monitoring.prometheusRule=true", "--set", "monitoring.dashboard=true",
                       "--set", "webhook.enabled=true", "--set", "webhook.defaultVariant=environment")
    assert ("MutatingWebhookConfiguration", "metaemu-webhook") in rendered
    for (kind, _), resource in rendered.items():
        if kind not in CUSTOM:
            kubernetes_validate.validate(resource, version, strict=True)
    config = yaml.safe_load(rendered[("ConfigMap", "metaemu")]["data"]["metaemu.yaml"])
    assert config["node"]["audience"] == audience and config["node"]["passthrough"] == ["aws"]
    token_policy = rendered[("ValidatingAdmissionPolicy", "metaemu-token-request")]["spec"]["variables"]
    assert {"name": "wifAudience", "expression": f"'{audience}'"} in token_policy
    uid_policy = rendered[("ValidatingAdmissionPolicy", "metaemu-agent-uid")]["spec"]["variables"]
    assert {"name": "agentUid", "expression": "61000"} in uid_policy
    agent = rendered[("DaemonSet", "metaemu")]["spec"]["template"]["spec"]["containers"][0]
    assert agent["securityContext"]["runAsUser"] == 61000


def test_bad_values_fail_with_the_schemas_message() -> None:
    out = template("--set", "node.passthrough={gcp}")
    assert out.returncode != 0 and "node.passthrough" in out.stderr.replace("/", ".")
    out = template("--set", "webhook.enabled=true", "--set", "webhook.defaultVariant=hostpath")
    assert out.returncode != 0 and "defaultVariant" in out.stderr


def test_the_webhook_renders_exactly_manifests_webhook() -> None:
    """Sidecar injection (#14): webhook.enabled adds manifests/webhook's objects, in their own
    namespace, and changes nothing of node mode's."""
    rendered = objects("--set", "webhook.enabled=true")
    webhook = {key: obj for key, obj in kustomize("manifests/webhook").items()}
    for obj in webhook.values():  # its own namespace, not the release's (kustomize() defaults that)
        if obj["kind"] not in CLUSTER_SCOPED | {"MutatingWebhookConfiguration"}:
            assert obj["metadata"]["namespace"] == "metaemu-webhook"
    webhook[("MutatingWebhookConfiguration", "metaemu-webhook")]["metadata"].pop("namespace", None)
    assert rendered == kustomize("manifests/node") | webhook


def test_the_webhooks_sidecars_exchange_at_the_nodes_audience_unless_told_otherwise() -> None:
    def sidecar(*args: str) -> dict[str, Any]:
        config = objects("--set", "webhook.enabled=true", *args)[("ConfigMap", "metaemu-webhook")]
        found: dict[str, Any] = yaml.safe_load(config["data"]["webhook.yaml"])["sidecar"]
        return found
    node = "//iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/p/providers/c"
    other = "//iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/p/providers/apps"
    assert sidecar("--set", f"node.audience={node}")["audience"] == node
    chosen = sidecar("--set", f"node.audience={node}", "--set", f"webhook.audience={other}",
                     "--set", "webhook.defaultVariant=environment", "--set", "projectId=other-project")
    assert (chosen["audience"], chosen["default_variant"], chosen["config"]["project_id"]) == (
        other, "environment", "other-project")


def test_no_startup_taint_drops_the_nodes_rule_and_the_taint_policy() -> None:
    rendered = objects("--set", "node.startupTaint=")
    config = yaml.safe_load(rendered[("ConfigMap", "metaemu")]["data"]["metaemu.yaml"])
    assert config["node"]["startup_taint"] == ""
    assert ("ValidatingAdmissionPolicy", "metaemu-node-taint") not in rendered
    assert ("ValidatingAdmissionPolicyBinding", "metaemu-node-taint") not in rendered
    rules = rendered[("ClusterRole", "metaemu-node")]["rules"]
    assert ["nodes"] not in [r["resources"] for r in rules]
