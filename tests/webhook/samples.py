"""Settings and pods shared by the webhook tests (and WEBHOOK_INJECTS.md's sample)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metaemu.webhook.injection import NamespaceView
from metaemu.webhook.settings import WebhookSettings, parse_settings

AUDIENCE = ("//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/my-pool/"
            "providers/my-cluster")
GOOGLE_ACCOUNT = "app@my-project.iam.gserviceaccount.com"


def settings(**sidecar: Any) -> WebhookSettings:
    raw = {"listen": "127.0.0.1:0", "namespace": "metaemu-webhook",
           "tls": {"generate": {"service": "metaemu-webhook", "webhook_configuration": "metaemu-webhook"}},
           "sidecar": {"image": "ghcr.io/metaemu/metaemu:0.1.0", "audience": AUDIENCE,
                       "config": {"project_id": "my-project", "numeric_project_id": "123456789012"}, **sidecar}}
    return parse_settings(raw, base_dir=Path("/"))


def namespace(name: str = "apps", *, labels: dict[str, str] | None = None,
              annotations: dict[str, str] | None = None) -> NamespaceView:
    return NamespaceView(name=name, labels=labels or {}, annotations=annotations or {})


def sample_pod(**spec: Any) -> dict[str, Any]:
    """A Deployment's pod as the API server hands it to the webhook (labels opting in)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "app-7d4b9c-", "namespace": "apps", "labels": {"app": "app",
                                                                                       "metaemu.dev/inject": "true"}},
            "spec": {"serviceAccountName": "app",
                     "containers": [{"name": "app", "image": "registry.example/app:1"}], **spec}}
