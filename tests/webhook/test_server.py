"""The webhook's review path with a stand-in API server (a handler, no sockets): the AdmissionReview
answer's shape, which reads it makes, refusals when they fail or stall, and the caBundle writer's
guarded patch. The real API server and TLS are tests/kube/test_webhook.py's."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest

from metaemu.testing.fake_clock import FakeClock
from metaemu.testing.inprocess import InProcessClient
from metaemu.transport import HttpRequest, HttpResponse
from metaemu.webhook.review import AdmissionRequest, ReviewError, parse_review
from metaemu.webhook.server import API_TIMEOUT_S, WebhookServer
from metaemu.webhook.settings import WebhookSettings
from tests.webhook.samples import GOOGLE_ACCOUNT, sample_pod, settings


class StandInApi:
    """Namespace ``apps`` (opted in) and its service account ``app``; records every request."""

    def __init__(self) -> None:
        self.requests: list[HttpRequest] = []
        self.namespace: dict[str, Any] = {"metadata": {"name": "apps", "labels": {"metaemu.dev/inject": "true"}}}
        self.configuration: dict[str, Any] = {"webhooks": [{"name": "a", "clientConfig": {}},
                                                           {"name": "b", "clientConfig": {"caBundle": "old"}}]}
        self.status = 200
        self.stall: asyncio.Event | None = None

    async def handle(self, request: HttpRequest) -> HttpResponse:
        self.requests.append(request)
        if self.stall is not None:
            await self.stall.wait()
        if self.status != 200:
            status = {"kind": "Status", "message": "etcd down"}
            return HttpResponse(status=self.status, body=json.dumps(status).encode())
        path = request.url.split("://", 1)[1].split("/", 1)[1]
        if path == "api/v1/namespaces/apps":
            body: Any = self.namespace
        elif path == "api/v1/namespaces/apps/serviceaccounts/app":
            body = {"metadata": {"annotations": {"iam.gke.io/gcp-service-account": GOOGLE_ACCOUNT}}}
        elif path.startswith("apis/admissionregistration.k8s.io/") and request.method == "GET":
            body = self.configuration
        else:
            body = {}
        return HttpResponse(status=200, body=json.dumps(body).encode())


def server_with(api: StandInApi, tmp_path: Path, *, clock: FakeClock | None = None) -> WebhookServer:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "t", "user": {"token": "t"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}]}))
    base: WebhookSettings = settings()
    configured = WebhookSettings(listen=base.listen, namespace=base.namespace, kubeconfig=kubeconfig,
                                 tls=base.tls, sidecar=base.sidecar)
    return WebhookServer(configured, env={}, http=InProcessClient(api.handle, clock=clock), clock=clock)


def review(obj: dict[str, Any], *, kind: str = "Pod", operation: str = "CREATE") -> AdmissionRequest:
    return AdmissionRequest(uid="0f3c", kind=kind, operation=operation, namespace="apps", object=obj)


def test_the_wire_format_is_admission_k8s_io_v1() -> None:
    parsed = parse_review(json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
                    "namespace": "apps", "object": {"spec": {}}}}).encode())
    assert (parsed.uid, parsed.kind, parsed.operation, parsed.namespace) == ("u-1", "Pod", "CREATE", "apps")
    for body in (b"{}", b"not json", json.dumps({"apiVersion": "admission.k8s.io/v1beta1",
                                                  "kind": "AdmissionReview", "request": {"uid": "u"}}).encode()):
        with pytest.raises(ReviewError):
            parse_review(body)


async def test_an_injection_answers_the_uid_with_a_base64_json_patch(tmp_path: Path) -> None:
    api = StandInApi()
    answer = await server_with(api, tmp_path).review(review(sample_pod()))
    response = answer["response"]
    assert (answer["apiVersion"], answer["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    assert (response["uid"], response["allowed"], response["patchType"]) == ("0f3c", True, "JSONPatch")
    patch = json.loads(base64.b64decode(response["patch"]))
    assert patch[0] == {"op": "add", "path": "/metadata/annotations", "value": {"metaemu.dev/injected": "loopback"}}
    assert [r.url.rsplit("/", 2)[-2:] for r in api.requests] == [["namespaces", "apps"], ["serviceaccounts", "app"]]


async def test_anything_but_a_pod_create_is_allowed_unchanged_without_an_api_call(tmp_path: Path) -> None:
    api = StandInApi()
    server = server_with(api, tmp_path)
    for request in (review(sample_pod(), operation="UPDATE"), review({}, kind="Deployment")):
        assert (await server.review(request))["response"] == {"uid": "0f3c", "allowed": True}
    opted_out = sample_pod()
    opted_out["metadata"]["labels"]["metaemu.dev/inject"] = "false"
    assert (await server.review(review(opted_out)))["response"] == {"uid": "0f3c", "allowed": True}
    assert api.requests == []


async def test_a_failed_api_read_refuses_the_pod_naming_the_cause(tmp_path: Path) -> None:
    api = StandInApi()
    api.status = 500
    response = (await server_with(api, tmp_path).review(review(sample_pod())))["response"]
    assert response["allowed"] is False and response["status"]["code"] == 500
    assert "apps/app" in response["status"]["message"] and "etcd down" in response["status"]["message"]


async def test_a_stalled_api_read_is_refused_after_its_timeout_not_allowed(tmp_path: Path) -> None:
    api, clock = StandInApi(), FakeClock()
    api.stall = asyncio.Event()
    pending = asyncio.create_task(server_with(api, tmp_path, clock=clock).review(review(sample_pod())))
    await clock.wait_for_sleepers(1)
    clock.advance(API_TIMEOUT_S)
    response = (await pending)["response"]
    assert response["allowed"] is False and "status 0" in response["status"]["message"]


async def test_the_ca_bundle_is_written_into_each_webhook_guarded_by_its_name(tmp_path: Path) -> None:
    api = StandInApi()
    server = server_with(api, tmp_path)
    assert await server._kube.ensure_ca_bundle("metaemu-webhook", "Q0E=")
    (patch,) = [r for r in api.requests if r.method == "PATCH"]
    assert patch.headers["Content-Type"] == "application/json-patch+json"
    assert json.loads(patch.body) == [
        {"op": "test", "path": "/webhooks/0/name", "value": "a"},
        {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": "Q0E="},
        {"op": "test", "path": "/webhooks/1/name", "value": "b"},
        {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": "Q0E="}]
    api.configuration = {"webhooks": [{"name": "a", "clientConfig": {"caBundle": "Q0E="}}]}
    assert not await server._kube.ensure_ca_bundle("metaemu-webhook", "Q0E=")  # nothing to do: no PATCH
    assert len([r for r in api.requests if r.method == "PATCH"]) == 1
