"""The API calls ``metaemu webhook`` makes, over the ``HttpClient`` seam (RBAC in manifests/webhook):
get a Namespace (its opt-in label, variant annotation and Pod Security level), get a
ServiceAccount (its ``iam.gke.io/gcp-service-account`` annotation), and get and JSON-patch its own
MutatingWebhookConfiguration's ``caBundle`` (``resourceNames``: that object only).

Every failure is an ``UpstreamError`` with ``service="k8s"`` keeping status and body.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from metaemu.clock import Clock
from metaemu.credentials.upstream import UpstreamCaller
from metaemu.metrics import Metrics
from metaemu.pods.kube_client import BearerToken, KubeConnection
from metaemu.transport import HttpClient, HttpRequest
from metaemu.webhook.injection import NamespaceView
from metaemu.webhook.jsonpatch import Operation, encode, pointer

SERVICE = "k8s"
WEBHOOK_CONFIGURATIONS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


class WebhookKubeClient:
    def __init__(self, *, connection: KubeConnection, http: HttpClient, clock: Clock, metrics: Metrics,
                 timeout_s: float) -> None:
        self._server = connection.server
        self._caller = UpstreamCaller(http=http, metrics=metrics, backend=SERVICE)
        self._token = BearerToken(connection, clock=clock)
        self._timeout_s = timeout_s

    async def get_namespace(self, name: str) -> NamespaceView:
        body = await self._get(f"/api/v1/namespaces/{_segment(name)}")
        meta = _dict(body.get("metadata"))
        return NamespaceView(name=name, labels=_strings(meta.get("labels")),
                             annotations=_strings(meta.get("annotations")))

    async def get_google_account(self, namespace: str, service_account: str, *, annotation: str) -> str | None:
        """The service account's ``annotation`` (None when absent or empty)."""
        body = await self._get(f"/api/v1/namespaces/{_segment(namespace)}/serviceaccounts/{_segment(service_account)}")
        meta = _dict(body.get("metadata"))
        value = _strings(meta.get("annotations")).get(annotation, "").strip()
        return value or None

    async def ensure_ca_bundle(self, name: str, ca_bundle: str) -> bool:
        """Make every webhook of MutatingWebhookConfiguration ``name`` trust ``ca_bundle`` (base64
        PEM); True when it had to patch. Each change is guarded by a ``test`` of that webhook's
        name, so a configuration edited in between fails the patch (422) instead of patching the
        wrong entry."""
        path = f"{WEBHOOK_CONFIGURATIONS}/{_segment(name)}"
        body = await self._get(path)
        webhooks = body.get("webhooks")
        ops: list[Operation] = []
        for index, webhook in enumerate(webhooks if isinstance(webhooks, list) else []):
            config = webhook.get("clientConfig") if isinstance(webhook, dict) else None
            if not isinstance(config, dict) or config.get("caBundle") == ca_bundle:
                continue
            ops += [Operation(op="test", path=pointer("webhooks", index, "name"), value=webhook.get("name")),
                    Operation(op="add", path=pointer("webhooks", index, "clientConfig", "caBundle"), value=ca_bundle)]
        if not ops:
            return False
        headers = {**await self._headers(), "Content-Type": "application/json-patch+json"}
        await self._caller.call_json(HttpRequest(method="PATCH", url=self._server + path, headers=headers,
                                                 body=encode(ops), timeout_s=self._timeout_s))
        return True

    async def _get(self, path: str) -> dict[str, Any]:
        return await self._caller.call_json(HttpRequest(method="GET", url=self._server + path,
                                                        headers=await self._headers(), timeout_s=self._timeout_s))

    async def _headers(self) -> dict[str, str]:
        return {"Authorization": await self._token.header(), "Accept": "application/json"}


def _segment(name: str) -> str:
    if not name or len(name) > 253 or "/" in name or name in (".", ".."):
        raise ValueError(f"not a Kubernetes object name: {name!r}")
    return quote(name, safe="")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def describe(error_body: Any) -> str:
    """A Status body's message, for a refusal (never a token: the API server's words)."""
    if isinstance(error_body, dict) and isinstance(error_body.get("message"), str):
        return str(error_body["message"])[:300]
    return json.dumps(error_body)[:300] if not isinstance(error_body, str) else error_body[:300]
