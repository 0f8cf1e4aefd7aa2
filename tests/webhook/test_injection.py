"""What the webhook injects and when (issue #14), decided on pods as the API server sends them and
checked by applying the patch (RFC 6902, the jsonpatch library) and validating the result against
the Kubernetes schemas, strictly. The real API server applies the same patches in
tests/kube/test_webhook.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest

from metaemu.config import parse_config
from metaemu.webhook.injection import Injected, NamespaceView, Refused, Untouched, decide
from metaemu.webhook.jsonpatch import encode, escape, pointer
from metaemu.webhook.pod_shape import parse_pod
from metaemu.webhook.settings import WebhookSettings
from tests.webhook.samples import AUDIENCE, GOOGLE_ACCOUNT, namespace, sample_pod, settings

VARIABLES = ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT")


def run(pod: dict[str, Any], ns: NamespaceView | None = None, *, account: str | None = GOOGLE_ACCOUNT,
        config: WebhookSettings | None = None) -> Injected | Refused | Untouched:
    config = config or settings()
    return decide(parse_pod(pod), ns or namespace(), google_account=account, settings=config.sidecar,
                  own_namespace=config.namespace)


def injected(pod: dict[str, Any], ns: NamespaceView | None = None, **kw: Any) -> dict[str, Any]:
    decision = run(pod, ns, **kw)
    assert isinstance(decision, Injected), decision
    patched: dict[str, Any] = jsonpatch.JsonPatch(json.loads(encode(decision.operations))).apply(copy.deepcopy(pod))
    return patched


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_pointers_escape_tilde_before_slash_rfc6901() -> None:
    assert escape("metaemu.dev/injected") == "metaemu.dev~1injected"
    assert escape("a~/b") == "a~0~1b"
    assert pointer("metadata", "annotations", "x/y~z") == "/metadata/annotations/x~1y~0z"
    assert pointer("spec", "containers", 0, "env", "-") == "/spec/containers/0/env/-"


def test_environment_variant_injects_the_sidecar_token_and_variables_on_every_container() -> None:
    pod = sample_pod(initContainers=[{"name": "migrate", "image": "registry.example/migrate:1"}])
    pod["spec"]["containers"].append({"name": "worker", "image": "registry.example/app:1",
                                      "env": [{"name": "MODE", "value": "worker"}]})
    out = injected(pod, namespace(annotations={"metaemu.dev/variant": "environment"}))
    spec = out["spec"]
    assert out["metadata"]["annotations"] == {"metaemu.dev/injected": "environment"}
    sidecar, migrate = spec["initContainers"]
    assert (sidecar["name"], sidecar["restartPolicy"], migrate["name"]) == ("metaemu", "Always", "migrate")
    for container in (migrate, *spec["containers"]):
        assert {k: env_of(container)[k] for k in VARIABLES} == dict.fromkeys(VARIABLES, "127.0.0.1:8988")
    assert env_of(spec["containers"][1])["MODE"] == "worker"  # appended, not replaced
    assert "GCE_METADATA_HOST" not in env_of(sidecar)
    (volume,) = spec["volumes"]
    assert volume == {"name": "metaemu-token", "projected": {"sources": [{"serviceAccountToken": {
        "path": "token", "audience": AUDIENCE, "expirationSeconds": 3600}}]}}
    assert sidecar["volumeMounts"] == [{"name": "metaemu-token", "mountPath": "/var/run/secrets/metaemu",
                                        "readOnly": True}]
    assert "securityContext" not in spec and "hostAliases" not in spec  # nothing the loopback variant needs


def test_the_sidecar_configuration_is_a_valid_metaemu_serve_configuration_for_the_pods_account() -> None:
    out = injected(sample_pod(), namespace(annotations={"metaemu.dev/variant": "environment"}))
    (env,) = out["spec"]["initContainers"][0]["env"]
    assert env["name"] == "METAEMU_CONFIG_YAML"
    config = parse_config(json.loads(env["value"]), hostname="pod", base_dir=Path("/"))
    assert str(config.listen) == "127.0.0.1:8988" and str(config.admin_listen) == "127.0.0.1:8989"
    assert config.workload_identity is not None
    assert config.workload_identity.service_account == GOOGLE_ACCOUNT
    assert config.workload_identity.audience == AUDIENCE
    unannotated = injected(sample_pod(), account=None)
    document = json.loads(unannotated["spec"]["initContainers"][1]["env"][0]["value"])
    assert "service_account" not in document["workload_identity"]  # the federated principal (GKE-05)


def test_loopback_variant_adds_the_address_init_container_sysctl_and_host_aliases() -> None:
    out = injected(sample_pod())
    spec = out["spec"]
    address, sidecar = spec["initContainers"]
    assert address["name"] == "metaemu-metadata-address"
    assert address["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert json.loads(sidecar["env"][0]["value"])["listen"] == "169.254.169.254:80"
    assert spec["securityContext"] == {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "80"}]}
    assert spec["hostAliases"] == [{"ip": "169.254.169.254", "hostnames": ["metadata.google.internal", "metadata"]}]
    assert all("env" not in c for c in spec["containers"])
    assert out["metadata"]["annotations"] == {"metaemu.dev/injected": "loopback"}


def test_existing_arrays_and_objects_are_appended_to_never_replaced() -> None:
    pod = sample_pod(volumes=[{"name": "data", "emptyDir": {}}],
                     initContainers=[{"name": "setup", "image": "registry.example/setup:1"}],
                     securityContext={"runAsNonRoot": True, "sysctls": [{"name": "net.ipv4.tcp_syncookies",
                                                                         "value": "1"}]},
                     hostAliases=[{"ip": "10.0.0.1", "hostnames": ["db"]}])
    pod["metadata"]["annotations"] = {"team": "a"}
    out = injected(pod)
    spec = out["spec"]
    assert [v["name"] for v in spec["volumes"]] == ["data", "metaemu-token"]
    assert [c["name"] for c in spec["initContainers"]] == ["metaemu-metadata-address", "metaemu", "setup"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert [s["name"] for s in spec["securityContext"]["sysctls"]] == ["net.ipv4.tcp_syncookies",
                                                                      "net.ipv4.ip_unprivileged_port_start"]
    assert [a["ip"] for a in spec["hostAliases"]] == ["10.0.0.1", "169.254.169.254"]
    assert out["metadata"]["annotations"] == {"team": "a", "metaemu.dev/injected": "loopback"}
    ops = run(pod)
    assert isinstance(ops, Injected)
    assert {"op": "add", "path": "/metadata/annotations/metaemu.dev~1injected", "value": "loopback"} in [
        o.to_json() for o in ops.operations]


@pytest.mark.parametrize("variant", ["loopback", "environment"])
def test_reinvoking_on_the_injected_pod_changes_nothing(variant: str) -> None:
    ns = namespace(annotations={"metaemu.dev/variant": variant})
    once = injected(sample_pod(initContainers=[{"name": "setup", "image": "x"}]), ns)
    again = run(once, ns)
    assert again == Injected(variant=variant, operations=())  # type: ignore[arg-type]


def test_a_container_added_by_a_later_webhook_gets_the_variables_on_reinvocation() -> None:
    ns = namespace(annotations={"metaemu.dev/variant": "environment"})
    once = injected(sample_pod(), ns)
    once["spec"]["containers"].append({"name": "proxy", "image": "registry.example/proxy:1"})
    twice = injected(once, ns)
    assert [c["name"] for c in twice["spec"]["initContainers"]] == ["metaemu"]  # never a second sidecar
    assert len(twice["spec"]["volumes"]) == 1
    assert {k: env_of(twice["spec"]["containers"][1])[k] for k in VARIABLES} == dict.fromkeys(
        VARIABLES, "127.0.0.1:8988")


def test_a_pod_with_a_metaemu_sidecar_of_its_own_is_left_untouched() -> None:
    pod = sample_pod(initContainers=[{"name": "metaemu", "image": "metaemu:latest", "restartPolicy": "Always"}])
    assert isinstance(run(pod), Untouched)
    pod = sample_pod()
    pod["spec"]["containers"].append({"name": "metaemu", "image": "metaemu:latest"})
    assert isinstance(run(pod), Untouched)


@pytest.mark.parametrize(("pod_label", "namespace_label", "expected"), [
    ("true", None, Injected), ("true", "false", Injected), (None, "true", Injected),
    ("false", "true", Untouched), (None, None, Untouched), (None, "false", Untouched),
    ("yes", None, Refused), (None, "1", Refused)])
def test_the_pod_label_wins_over_the_namespace_label(pod_label: str | None, namespace_label: str | None,
                                                     expected: type) -> None:
    pod = sample_pod()
    del pod["metadata"]["labels"]["metaemu.dev/inject"]
    if pod_label is not None:
        pod["metadata"]["labels"]["metaemu.dev/inject"] = pod_label
    labels = {"metaemu.dev/inject": namespace_label} if namespace_label is not None else {}
    assert isinstance(run(pod, namespace(labels=labels)), expected)


@pytest.mark.parametrize("name", ["kube-system", "kube-public", "metaemu-system", "metaemu-webhook"])
def test_kube_system_node_mode_and_the_webhooks_own_namespace_are_never_injected(name: str) -> None:
    assert settings().namespace == "metaemu-webhook"  # the webhook's own, from its configuration
    assert isinstance(run(sample_pod(), namespace(name, labels={"metaemu.dev/inject": "true"})), Untouched)


@pytest.mark.parametrize("level", ["restricted", "baseline"])
def test_the_environment_variant_is_the_default_where_pod_security_forbids_net_admin(level: str) -> None:
    decision = run(sample_pod(), namespace(labels={"pod-security.kubernetes.io/enforce": level}))
    assert isinstance(decision, Injected) and decision.variant == "environment"
    decision = run(sample_pod(), namespace(labels={"pod-security.kubernetes.io/enforce": "privileged"}))
    assert isinstance(decision, Injected) and decision.variant == "loopback"


def test_the_pod_annotation_wins_over_the_namespace_annotation() -> None:
    pod = sample_pod()
    pod["metadata"]["annotations"] = {"metaemu.dev/variant": "environment"}
    decision = run(pod, namespace(annotations={"metaemu.dev/variant": "loopback"}))
    assert isinstance(decision, Injected) and decision.variant == "environment"


def test_the_loopback_variant_under_restricted_is_refused_with_the_reason() -> None:
    pod = sample_pod()
    pod["metadata"]["annotations"] = {"metaemu.dev/variant": "loopback"}
    decision = run(pod, namespace(labels={"pod-security.kubernetes.io/enforce": "restricted"}))
    assert isinstance(decision, Refused) and "NET_ADMIN" in decision.message and "restricted" in decision.message


@pytest.mark.parametrize("entry", [{"name": "GCE_METADATA_HOST", "value": "metadata.google.internal"},
                                   {"name": "GCE_METADATA_IP", "valueFrom": {"configMapKeyRef": {
                                       "name": "c", "key": "k"}}}])
def test_a_container_setting_the_variables_differently_is_refused(entry: dict[str, Any]) -> None:
    pod = sample_pod(initContainers=[{"name": "setup", "image": "x", "env": [entry]}])
    decision = run(pod, namespace(annotations={"metaemu.dev/variant": "environment"}))
    assert isinstance(decision, Refused)
    assert "init container 'setup' sets " + entry["name"] in decision.message
    assert "127.0.0.1:8988" in decision.message


def test_a_container_already_setting_the_same_value_is_not_given_it_twice() -> None:
    pod = sample_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": "GCE_METADATA_HOST", "value": "127.0.0.1:8988"}]
    out = injected(pod, namespace(annotations={"metaemu.dev/variant": "environment"}))
    names = [e["name"] for e in out["spec"]["containers"][0]["env"]]
    assert names == ["GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"]


@pytest.mark.parametrize(("spec", "words"), [
    ({"hostNetwork": True}, "hostNetwork"),
    ({"volumes": [{"name": "metaemu-token", "emptyDir": {}}]}, "'metaemu-token'"),
    ({"securityContext": {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "1024"}]}},
     "ip_unprivileged_port_start=1024"),
    ({"hostAliases": [{"ip": "10.1.1.1", "hostnames": ["metadata.google.internal"]}]}, "10.1.1.1"),
])
def test_pods_the_sidecar_cannot_work_in_are_refused(spec: dict[str, Any], words: str) -> None:
    decision = run(sample_pod(**spec))
    assert isinstance(decision, Refused) and words in decision.message, decision


def test_a_google_account_annotation_that_is_no_email_is_refused() -> None:
    decision = run(sample_pod(), account="not an email")
    assert isinstance(decision, Refused) and "iam.gke.io/gcp-service-account" in decision.message


@pytest.mark.parametrize("variant", ["loopback", "environment"])
@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_the_injected_pod_validates_against_the_kubernetes_schemas(variant: str, version: str) -> None:
    pod = sample_pod(initContainers=[{"name": "setup", "image": "x"}])
    pod["metadata"]["name"] = "app"
    out = injected(pod, namespace(annotations={"metaemu.dev/variant": variant}))
    kubernetes_validate.validate(out, version, strict=True)
