"""``metaemu webhook`` against the real kube-apiserver (issue #14): its MutatingWebhookConfiguration
(manifests/webhook's, with a URL clientConfig) registered, its caBundle written by the webhook
through manifests/webhook's RBAC, pods created through the API coming back injected in both
variants, opted-out pods untouched, reinvocation after another webhook, refusals, Pod Security
"restricted" admitting the environment variant, the stored pods valid against the schemas, and a
real client (google-auth) getting its token from the injected sidecar run as a local process.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from metaemu.webhook.sidecar import TOKEN_FILE
from tests.clients import harness
from tests.helpers import serving_ports
from tests.kube.cluster import KubeCluster
from tests.kube.webhook_world import (
    ADDER_LABEL,
    AUDIENCE,
    GOOGLE_ACCOUNT,
    PROJECT_ID,
    WebhookWorld,
    app_pod,
    container_adder,
    webhook_world,
)

pytestmark = pytest.mark.kube
VARIABLES = ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT")
CHECK = """
import google.auth, google.auth.transport.requests
creds, project = google.auth.default()
creds.refresh(google.auth.transport.requests.Request())
print(creds.token, project, creds.service_account_email)
"""


@pytest.fixture
async def world(cluster: KubeCluster, tmp_path: Path) -> AsyncIterator[WebhookWorld]:
    async with webhook_world(cluster, tmp_path) as started:
        yield started


def names(pod: dict[str, Any], field: str = "initContainers") -> list[str]:
    return [c["name"] for c in pod["spec"].get(field, [])]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def validate(pod: dict[str, Any]) -> None:
    """The stored pod, strictly, against the oldest Kubernetes with native sidecars and the newest."""
    for version in ("1.29.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(pod, version, strict=True)


async def test_the_webhook_writes_its_ca_into_both_webhooks_with_rbac_for_that_object_only(world: WebhookWorld) -> None:
    configuration = await world.configuration()
    bundles = {w["clientConfig"]["caBundle"] for w in configuration["webhooks"]}
    assert world.server.ca_pem is not None
    assert bundles == {base64.b64encode(world.server.ca_pem).decode()}
    # manifests/webhook's RBAC allows exactly that object: no other configuration, no lists, no secrets.
    me = "system:serviceaccount:metaemu-webhook:metaemu-webhook"
    configurations = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
    for method, path, body in (("GET", f"{configurations}/another", None), ("GET", configurations, None),
                               ("PATCH", f"{configurations}/another", []), ("GET", "/api/v1/serviceaccounts", None),
                               ("GET", "/api/v1/namespaces/metaemu-webhook/secrets", None)):
        reply = await world.call(world.cluster.request, method, path, body, impersonate=me,
                                 content_type="application/json-patch+json")
        assert reply.status == 403, (method, path, reply.body)


async def test_a_pod_of_an_opted_in_namespace_comes_back_with_the_loopback_variant(world: WebhookWorld) -> None:
    namespace = await world.namespace(labels={"metaemu.dev/inject": "true"})
    status, pod = await world.create_pod(namespace, app_pod("app", initContainers=[
        {"name": "setup", "image": "registry.invalid/setup:1"}]))
    assert status == 201, pod
    assert names(pod) == ["metaemu-metadata-address", "metaemu", "setup"]
    assert pod["spec"]["initContainers"][1]["restartPolicy"] == "Always"
    assert pod["metadata"]["annotations"]["metaemu.dev/injected"] == "loopback"
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "80"} in pod["spec"]["securityContext"]["sysctls"]
    assert pod["spec"]["hostAliases"] == [{"ip": "169.254.169.254",
                                           "hostnames": ["metadata.google.internal", "metadata"]}]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "metaemu-token")
    assert volume["projected"]["sources"][0]["serviceAccountToken"]["audience"] == AUDIENCE
    document = json.loads(env_of(pod["spec"]["initContainers"][1])["METAEMU_CONFIG_YAML"])
    assert document["listen"] == "169.254.169.254:80"
    assert document["workload_identity"]["service_account"] == GOOGLE_ACCOUNT
    validate(pod)
    # An unannotated service account: the federated principal, no Google account to impersonate.
    status, plain = await world.create_pod(namespace, app_pod("plain", service_account="plain"))
    assert status == 201, plain
    (sidecar,) = [c for c in plain["spec"]["initContainers"] if c["name"] == "metaemu"]
    assert "service_account" not in json.loads(env_of(sidecar)["METAEMU_CONFIG_YAML"])["workload_identity"]


async def test_restricted_namespaces_get_the_environment_variant_and_pod_security_admits_it(
        world: WebhookWorld) -> None:
    namespace = await world.namespace(labels={"metaemu.dev/inject": "true",
                                              "pod-security.kubernetes.io/enforce": "restricted"})
    status, pod = await world.create_pod(namespace, app_pod("app", initContainers=[
        {**app_pod("x")["spec"]["containers"][0], "name": "setup"}]))
    assert status == 201, pod  # PodSecurity (restricted) ran after the webhook and admitted the result
    assert names(pod) == ["metaemu", "setup"]
    address = f"{world.settings.sidecar.environment_listen}"
    for container in (pod["spec"]["initContainers"][1], pod["spec"]["containers"][0]):
        assert {k: env_of(container)[k] for k in VARIABLES} == dict.fromkeys(VARIABLES, address)
    assert "hostAliases" not in pod["spec"] and pod["metadata"]["annotations"]["metaemu.dev/injected"] == "environment"
    validate(pod)
    # The loopback variant asked for there is refused by the webhook, with the reason.
    loopback = app_pod("loop")
    loopback["metadata"]["annotations"] = {"metaemu.dev/variant": "loopback"}
    status, body = await world.create_pod(namespace, loopback)
    assert status == 403 and "NET_ADMIN" in body["message"], body


async def test_the_pod_label_opts_in_and_out_whatever_the_namespace_says(world: WebhookWorld) -> None:
    plain = await world.namespace()
    status, pod = await world.create_pod(plain, app_pod("in", labels={"metaemu.dev/inject": "true"}))
    assert status == 201 and "metaemu" in names(pod), pod
    status, pod = await world.create_pod(plain, app_pod("unlabelled"))
    assert status == 201 and "initContainers" not in pod["spec"] and "annotations" not in pod["metadata"]
    opted_in = await world.namespace(labels={"metaemu.dev/inject": "true"},
                                     annotations={"metaemu.dev/variant": "environment"})
    sent = app_pod("out", labels={"metaemu.dev/inject": "false"})
    status, pod = await world.create_pod(opted_in, sent)
    assert status == 201, pod
    assert "initContainers" not in pod["spec"] and "env" not in pod["spec"]["containers"][0]
    assert "annotations" not in pod["metadata"]


async def test_a_pod_that_already_sets_the_variables_differently_is_refused_with_a_message(
        world: WebhookWorld) -> None:
    namespace = await world.namespace(labels={"metaemu.dev/inject": "true"},
                                      annotations={"metaemu.dev/variant": "environment"})
    pod = app_pod("app")
    pod["spec"]["containers"][0]["env"] = [{"name": "GCE_METADATA_HOST", "value": "metadata.google.internal"}]
    status, body = await world.create_pod(namespace, pod)
    assert status == 403, body
    assert body["message"] == (
        'admission webhook "namespace.inject.metaemu.dev" denied the request: metaemu: container \'app\' sets '
        f"GCE_METADATA_HOST to 'metadata.google.internal', but the injected sidecar answers at "
        f"{world.settings.sidecar.environment_listen}; remove the variable, or opt the pod out "
        '(metaemu.dev/inject: "false")')


@pytest.mark.parametrize("variant", ["loopback", "environment"])
async def test_an_already_injected_pod_is_not_injected_again(world: WebhookWorld, variant: str) -> None:
    namespace = await world.namespace(labels={"metaemu.dev/inject": "true"},
                                      annotations={"metaemu.dev/variant": variant})
    status, first = await world.create_pod(namespace, app_pod("first"))
    assert status == 201, first
    again = {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "again", "annotations": first["metadata"]["annotations"]},
             "spec": copy.deepcopy(first["spec"])}
    status, second = await world.create_pod(namespace, again)
    assert status == 201, second
    assert second["spec"] == first["spec"]


async def test_a_container_another_webhook_adds_later_gets_the_variables_on_reinvocation(
        world: WebhookWorld) -> None:
    async with container_adder(world):
        namespace = await world.namespace(labels={"metaemu.dev/inject": "true", ADDER_LABEL: "true"},
                                          annotations={"metaemu.dev/variant": "environment"})
        status, pod = await world.create_pod(namespace, app_pod("app"))
    assert status == 201, pod
    assert names(pod, "containers") == ["app", "late"]
    assert names(pod) == ["metaemu"]  # reinvoked, never a second sidecar
    address = f"{world.settings.sidecar.environment_listen}"
    for container in pod["spec"]["containers"]:
        assert {k: env_of(container)[k] for k in VARIABLES} == dict.fromkeys(VARIABLES, address)
    validate(pod)


async def test_a_real_client_with_the_injected_environment_gets_its_token_from_the_injected_sidecar(
        world: WebhookWorld, tmp_path: Path) -> None:
    namespace = await world.namespace(labels={"metaemu.dev/inject": "true",
                                              "pod-security.kubernetes.io/enforce": "restricted"})
    world.google.grant(GOOGLE_ACCOUNT, world.google.principal_for(AUDIENCE, f"system:serviceaccount:{namespace}:app"))
    status, pod = await world.create_pod(namespace, app_pod("app"))
    assert status == 201, pod
    (sidecar,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "metaemu"]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "metaemu-token"]
    projection = volume["projected"]["sources"][0]["serviceAccountToken"]
    # What kubelet writes into the projected volume: a TokenRequest for that audience, bound to the pod.
    reply = await world.call(world.cluster.token_request, namespace, "app", {
        "audiences": [projection["audience"]], "expirationSeconds": projection["expirationSeconds"],
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "app", "uid": pod["metadata"]["uid"]}})
    assert reply.status == 201, reply.body
    token_file = tmp_path / "token"
    token_file.write_text(reply.body["status"]["token"])
    # The sidecar as kubelet would start it: the image's entrypoint (metaemu) with its args and env;
    # only the token's path differs (there is no volume mount here).
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert TOKEN_FILE in env["METAEMU_CONFIG_YAML"]
    env["METAEMU_CONFIG_YAML"] = env["METAEMU_CONFIG_YAML"].replace(TOKEN_FILE, str(token_file))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "metaemu", *sidecar["args"],
                                                env={"PATH": os.environ.get("PATH", os.defpath), **env},
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        port, _, _ = await serving_ports(proc)
        app_env = env_of(pod["spec"]["containers"][0])
        assert app_env["GCE_METADATA_HOST"].endswith(f":{port}")
        client_env = {k: v for k, v in harness.client_env(app_env["GCE_METADATA_HOST"], tmp_path).items()
                      if k not in VARIABLES}
        client_env.update({k: app_env[k] for k in VARIABLES})  # exactly what was injected
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", CHECK], env=client_env,
                                       capture_output=True, text=True, timeout=harness.DEFAULT_TIMEOUT)
    finally:
        proc.terminate()
        await proc.wait()
    assert done.returncode == 0, done.stderr[-2000:]
    token, project, email = done.stdout.split()
    info = world.google.token_info(token)
    assert info is not None and info.email == GOOGLE_ACCOUNT
    assert (project, email) == (PROJECT_ID, GOOGLE_ACCOUNT)
