"""What ``metaemu webhook`` injects into a pod, as Kubernetes API objects (issue #14).

Owns the native sidecar (an ``initContainers`` entry with ``restartPolicy: Always``, Kubernetes
>= 1.29: it is ready before the app starts and outlives it), its configuration document, the
projected service-account token volume with the Workload Identity audience, the loopback-alias
init container (what manifests/sidecar does by hand) and the environment variant's variables.
Every value is built from the settings and the pod's Google account only, so the same inputs give
the same bytes (WEBHOOK_INJECTS.md lists them).

Not owned here: whether to inject, or where in the pod (``injection``).
"""

from __future__ import annotations

import json
from typing import Any

from metaemu.webhook.settings import SidecarSettings, Variant

SIDECAR_NAME = "metaemu"
ADDRESS_NAME = "metaemu-metadata-address"
TOKEN_VOLUME = "metaemu-token"
TOKEN_DIR = "/var/run/secrets/metaemu"
TOKEN_FILE = f"{TOKEN_DIR}/token"
#: The metadata server's address; the loopback variant puts it on the pod's loopback (SEC-16).
METADATA_IP = "169.254.169.254"
METADATA_NAMES = ("metadata.google.internal", "metadata")
#: Read by the Google client libraries: google-auth and Go's metadata package read
#: GCE_METADATA_HOST, Node's gcp-metadata also GCE_METADATA_IP (its detection ping), and older
#: google-auth and gcloud GCE_METADATA_ROOT. All three name the sidecar's host:port.
METADATA_VARIABLES = ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT")
#: The sysctl that lets uid 65532 bind port 80 without a capability; a "safe" sysctl that Pod
#: Security "baseline" allows (the loopback variant's listen address is 169.254.169.254:80).
UNPRIVILEGED_PORT_SYSCTL = "net.ipv4.ip_unprivileged_port_start"
METADATA_PORT = 80
#: The variable through which the sidecar receives its whole configuration (metaemu serve).
CONFIG_VARIABLE = "METAEMU_CONFIG_YAML"
#: metaemu's image runs as this non-root user (Dockerfile).
SIDECAR_UID = 65532


def listen_address(settings: SidecarSettings, variant: Variant) -> str:
    return f"{METADATA_IP}:{METADATA_PORT}" if variant == "loopback" else str(settings.environment_listen)


def config_document(settings: SidecarSettings, variant: Variant, google_account: str | None) -> str:
    """The sidecar's ``metaemu serve`` configuration: ``sidecar.config`` plus what the webhook
    decides. JSON (a YAML document too), keys sorted, no spaces: one fixed spelling."""
    workload_identity: dict[str, Any] = {"audience": settings.audience,
                                         "source": {"type": "kubernetes", "token_file": TOKEN_FILE}}
    if google_account is not None:
        workload_identity["service_account"] = google_account
    document = {**settings.config, "listen": listen_address(settings, variant),
                "admin_listen": str(settings.admin_listen), "workload_identity": workload_identity}
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def environment(settings: SidecarSettings) -> list[dict[str, str]]:
    """The environment variant's variables, each naming the sidecar's host:port."""
    address = str(settings.environment_listen)
    return [{"name": name, "value": address} for name in METADATA_VARIABLES]


def _probe(path: str, settings: SidecarSettings) -> list[str]:
    # The image's own Python (no shell, no curl in it); the admin listener is the pod's loopback.
    url = f"http://{settings.admin_listen}{path}"
    return ["python", "-c", f"import urllib.request as u; u.urlopen('{url}', timeout=2)"]


def sidecar_container(settings: SidecarSettings, variant: Variant, google_account: str | None) -> dict[str, Any]:
    return {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "restartPolicy": "Always",
        "args": ["serve"],
        "env": [{"name": CONFIG_VARIABLE, "value": config_document(settings, variant, google_account)}],
        "startupProbe": {"exec": {"command": _probe("/readyz", settings)}, "periodSeconds": 1,
                         "failureThreshold": 30},
        "readinessProbe": {"exec": {"command": _probe("/readyz", settings)}, "periodSeconds": 10},
        "livenessProbe": {"exec": {"command": _probe("/healthz", settings)}, "periodSeconds": 20},
        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        # Pod Security "restricted" as it is written (the environment variant's default there).
        "securityContext": {"runAsNonRoot": True, "runAsUser": SIDECAR_UID, "runAsGroup": SIDECAR_UID,
                            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}],
    }


def address_container(settings: SidecarSettings) -> dict[str, Any]:
    """The loopback variant's init container: adds 169.254.169.254/32 to the pod's ``lo`` and exits.
    Idempotent: a restarted pod keeps its network namespace and the address."""
    script = f"ip addr show dev lo | grep -q {METADATA_IP}/32 || ip addr add {METADATA_IP}/32 dev lo"
    return {
        "name": ADDRESS_NAME,
        "image": settings.address_image,
        "command": ["sh", "-c", script],
        "resources": {"requests": {"cpu": "10m", "memory": "8Mi"}, "limits": {"memory": "16Mi"}},
        # NET_ADMIN on the pod's own network namespace only, for the one command above.
        "securityContext": {"runAsUser": 0, "runAsNonRoot": False, "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}},
    }


def token_volume(settings: SidecarSettings) -> dict[str, Any]:
    """The pod's service-account token for the provider audience, rotated by kubelet."""
    return {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
        "path": "token", "audience": settings.audience, "expirationSeconds": settings.token_expiration_seconds}}]}}


def host_alias() -> dict[str, Any]:
    return {"ip": METADATA_IP, "hostnames": list(METADATA_NAMES)}


def port_sysctl() -> dict[str, str]:
    return {"name": UNPRIVILEGED_PORT_SYSCTL, "value": str(METADATA_PORT)}
