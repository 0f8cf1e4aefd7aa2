"""``metaemu webhook`` registered with the real kube-apiserver of the test bed (issue #14).

The webhook runs in the test process on 127.0.0.1 (port 0, read back) with a certificate it
generates for that address, as the ``metaemu-webhook`` service account with manifests/webhook's
RBAC applied by kubectl. manifests/webhook's MutatingWebhookConfiguration is registered with a URL
clientConfig pointing at it; the webhook itself writes the caBundle, as in a cluster. Only
namespaces labelled with this fixture's run id are sent to it (the cluster is shared by the whole
session), and the configuration is deleted afterwards.

The API server calls the webhook while a test waits for the API server, so every API call of a
test goes through ``call`` (a worker thread): the event loop stays free to answer the review.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import random
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_sts import WorkloadIdentityProvider
from metaemu.webhook.certs import ServingContext, generate_certificate
from metaemu.webhook.jsonpatch import Operation, encode
from metaemu.webhook.review import allowed, parse_review
from metaemu.webhook.server import WebhookServer
from metaemu.webhook.settings import GeneratedTls, WebhookSettings, parse_settings
from tests.kube.agent import unique
from tests.kube.cluster import ISSUER, KubeCluster, KubeTestbedError, binaries_dir

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION = "metaemu-webhook"  # the name manifests/webhook's RBAC lets the webhook patch
ADDER_CONFIGURATION = "zz-metaemu-test-adder"  # sorts after it: called after the webhook
RUN_LABEL = "metaemu.test/webhook-run"
ADDER_LABEL = "metaemu.test/adder"
AUDIENCE = ("//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/test-pool/"
            "providers/test-cluster")
PROJECT_ID, PROJECT_NUMBER = "test-project", "123456789012"
GOOGLE_ACCOUNT = "app@test-project.iam.gserviceaccount.com"
RBAC_KINDS = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}


def rendered_webhook_manifests() -> list[dict[str, Any]]:
    out = subprocess.run([str(binaries_dir() / "kubectl"), "kustomize", str(ROOT / "manifests/webhook")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@dataclass
class WebhookWorld:
    cluster: KubeCluster
    server: WebhookServer
    google: FakeGoogle
    google_url: str
    run_id: str
    tmp_path: Path
    namespaces: list[str] = field(default_factory=list)

    @property
    def settings(self) -> WebhookSettings:
        return self.server.settings

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def namespace(self, *, labels: dict[str, str] | None = None,
                        annotations: dict[str, str] | None = None) -> str:
        """A fresh namespace sent to this webhook, with a service account ``app`` annotated with
        GOOGLE_ACCOUNT (``plain``: not annotated)."""
        name = unique("inject")
        await self.call(self.cluster.apply, {"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": name, "labels": {RUN_LABEL: self.run_id, **(labels or {})}, "annotations": annotations or {}}})
        # Not cluster.service_account: its server-side apply of a bare Namespace (same field manager)
        # would take this namespace's labels away again.
        for account, annotations in (("app", {"iam.gke.io/gcp-service-account": GOOGLE_ACCOUNT}), ("plain", {})):
            await self.call(self.cluster.apply, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {
                "name": account, "namespace": name, "annotations": annotations}})
        return name

    async def create_pod(self, namespace: str, pod: dict[str, Any], *, dry_run: bool = False) -> tuple[int, Any]:
        query = "?dryRun=All" if dry_run else ""
        reply = await self.call(self.cluster.request, "POST", f"/api/v1/namespaces/{namespace}/pods{query}", pod)
        return reply.status, reply.body

    async def configuration(self, name: str = CONFIGURATION) -> dict[str, Any]:
        path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"
        body: dict[str, Any] = await self.call(self.cluster.ok, "GET", path)
        return body


def app_pod(name: str, *, labels: dict[str, str] | None = None, service_account: str = "app",
            **spec: Any) -> dict[str, Any]:
    """A pod that Pod Security "restricted" admits as it is (no kubelet runs it)."""
    container = {"name": "app", "image": "registry.invalid/app:1",
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
                                     "capabilities": {"drop": ["ALL"]},
                                     "seccompProfile": {"type": "RuntimeDefault"}}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"serviceAccountName": service_account, "automountServiceAccountToken": False,
                     "containers": [container], **spec}}


def _registration(rendered: dict[str, Any], *, url: str, run_id: str) -> dict[str, Any]:
    """manifests/webhook's configuration with a URL clientConfig and this run's namespaces only."""
    configuration = copy.deepcopy(rendered)
    for webhook in configuration["webhooks"]:
        webhook["clientConfig"] = {"url": url}
        webhook["namespaceSelector"]["matchExpressions"].append(
            {"key": RUN_LABEL, "operator": "In", "values": [run_id]})
    return configuration


def _loopback_address() -> str:
    """An address of 127.0.0.0/8 no other test uses, for the sidecar's fixed ports."""
    return f"127.{random.randrange(2, 250)}.{random.randrange(1, 250)}.{random.randrange(1, 250)}"


async def _serve(app: web.Application, **site: Any) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, **site).start()
    return runner, int(runner.addresses[0][1])


@contextlib.asynccontextmanager
async def webhook_world(cluster: KubeCluster, tmp_path: Path) -> AsyncIterator[WebhookWorld]:
    rendered = rendered_webhook_manifests()
    rbac = [d for d in rendered if d["kind"] in RBAC_KINDS]
    applied = await asyncio.to_thread(cluster.kubectl, "apply", "-f", "-", stdin=yaml.safe_dump_all(rbac))
    assert applied.returncode == 0, applied.stderr
    reply = await asyncio.to_thread(cluster.token_request, "metaemu-webhook", "metaemu-webhook",
                                    {"expirationSeconds": 3600})
    assert reply.status == 201, reply.body
    kubeconfig = cluster.kubeconfig(tmp_path / "webhook.kubeconfig", token=reply.body["status"]["token"])

    google = FakeGoogle()
    google.add_provider(WorkloadIdentityProvider(audience=AUDIENCE, issuer=ISSUER, jwks=cluster.jwks()))
    google.add_service_account(GOOGLE_ACCOUNT)
    google_runner, google_port = await _serve(google.app())
    google_url = f"http://127.0.0.1:{google_port}"
    loopback = _loopback_address()
    settings = parse_settings({
        "listen": "127.0.0.1:0", "namespace": "metaemu-webhook", "kubeconfig": str(kubeconfig),
        "tls": {"generate": {"service": "metaemu-webhook", "webhook_configuration": CONFIGURATION,
                             "ip_addresses": ["127.0.0.1"]}},
        "sidecar": {"image": "metaemu:test", "audience": AUDIENCE, "environment_listen": f"{loopback}:8988",
                    "admin_listen": f"{loopback}:8989",
                    "config": {"project_id": PROJECT_ID, "numeric_project_id": PROJECT_NUMBER,
                               "endpoints": {"sts": f"{google_url}/v1/token", "iam_credentials": f"{google_url}/v1"}}},
    }, base_dir=tmp_path)
    run_id = unique("run")
    (template,) = [d for d in rendered if d["kind"] == "MutatingWebhookConfiguration"]
    base = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
    # Registered first (at a port nothing listens on; no namespace of this run exists yet), so the
    # webhook's first caBundle write finds it; then pointed at the webhook's real port.
    await asyncio.to_thread(cluster.ok, "POST", base, _registration(template, url="https://127.0.0.1:9/mutate",
                                                                    run_id=run_id))
    server = WebhookServer(settings, env={})
    try:
        await server.start()
        await asyncio.wait_for(server.bundle_written.wait(), 30)
        ops = [Operation(op="replace", path=f"/webhooks/{i}/clientConfig/url",
                         value=f"https://127.0.0.1:{server.port}/mutate") for i in range(len(template["webhooks"]))]
        await asyncio.to_thread(cluster.ok, "PATCH", f"{base}/{CONFIGURATION}", [o.to_json() for o in ops],
                                content_type="application/json-patch+json")
        world = WebhookWorld(cluster=cluster, server=server, google=google, google_url=google_url, run_id=run_id,
                             tmp_path=tmp_path)
        await _until_injecting(world)
        yield world
    finally:
        await asyncio.to_thread(cluster.request, "DELETE", f"{base}/{CONFIGURATION}")
        await server.stop()
        await google_runner.cleanup()


async def _until_injecting(world: WebhookWorld) -> None:
    """The API server reads webhook configurations through an informer: wait until it calls this
    webhook (a dry-run create of an opted-in pod comes back with the sidecar)."""
    probe = await world.namespace(labels={"metaemu.dev/inject": "true"})

    last: list[Any] = []

    def injecting() -> bool:
        reply = world.cluster.request("POST", f"/api/v1/namespaces/{probe}/pods?dryRun=All", app_pod("probe"))
        last[:] = [reply.status, reply.body]
        return reply.status == 201 and any(c["name"] == "metaemu" for c in reply.body["spec"].get("initContainers", []))

    try:
        await asyncio.to_thread(world.cluster.wait_until, "the webhook configuration in use", injecting, 20)
    except KubeTestbedError as exc:
        raise AssertionError(f"the last dry run answered {last}") from exc


@contextlib.asynccontextmanager
async def container_adder(world: WebhookWorld) -> AsyncIterator[None]:
    """A second mutating webhook, called after metaemu's, that adds a container ``late`` to pods of
    namespaces labelled ADDER_LABEL: the API server then reinvokes metaemu's (IfNeeded)."""
    generated = generate_certificate(GeneratedTls(service="adder", webhook_configuration=ADDER_CONFIGURATION,
                                                  ip_addresses=("127.0.0.1",)), namespace="test",
                                     now=dt.datetime.now(dt.UTC))
    tls = ServingContext(generated.cert_file, generated.key_file)

    async def add(request: web.Request) -> web.Response:
        review = parse_review(await request.read())
        names = [c["name"] for c in review.object["spec"]["containers"]]
        if "late" in names:
            return web.json_response(allowed(review.uid))
        op = Operation(op="add", path="/spec/containers/-", value={"name": "late", "image": "registry.invalid/late:1"})
        return web.json_response(allowed(review.uid, patch=encode([op])))

    app = web.Application()
    app.router.add_post("/add", add)
    runner, port = await _serve(app, ssl_context=tls.context)
    base = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
    await world.call(world.cluster.ok, "POST", base, {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": ADDER_CONFIGURATION},
        "webhooks": [{"name": "adder.test.metaemu.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                      "failurePolicy": "Fail", "timeoutSeconds": 10,
                      "clientConfig": {"url": f"https://127.0.0.1:{port}/add", "caBundle": generated.ca_bundle},
                      "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                 "resources": ["pods"]}],
                      "namespaceSelector": {"matchLabels": {RUN_LABEL: world.run_id, ADDER_LABEL: "true"}}}]})
    try:
        probe = await world.namespace(labels={ADDER_LABEL: "true"})

        def adding() -> bool:
            reply = world.cluster.request("POST", f"/api/v1/namespaces/{probe}/pods?dryRun=All", app_pod("probe"))
            return reply.status == 201 and len(reply.body["spec"]["containers"]) == 2

        await world.call(world.cluster.wait_until, "the adder in use", adding)
        yield
    finally:
        await world.call(world.cluster.request, "DELETE", f"{base}/{ADDER_CONFIGURATION}")
        await runner.cleanup()
