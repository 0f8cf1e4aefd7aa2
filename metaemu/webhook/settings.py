"""The configuration of ``metaemu webhook`` (``--config FILE``): where it listens, its TLS, and the
sidecar it injects. Frozen; every problem raises ``ConfigError`` naming the dotted key.

The sidecar's own ``metaemu serve`` configuration is ``sidecar.config`` with the keys the webhook
decides per pod (``listen``, ``admin_listen``, ``workload_identity``) filled in; it is validated at
start by parsing a sample, so a mistake stops the webhook, not every injected pod.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from metaemu.config import DEFAULT_SA_ANNOTATION, MIN_NODE_TOKEN_S, HostPort
from metaemu.errors import ConfigError

Variant = Literal["loopback", "environment"]
VARIANTS: tuple[Variant, ...] = ("loopback", "environment")
#: Keys of ``sidecar.config`` the webhook sets itself (per variant and per pod).
DECIDED_KEYS = frozenset({"listen", "admin_listen", "workload_identity", "mode", "node", "admin_socket"})
TOP_KEYS = frozenset({"listen", "log_level", "namespace", "kubeconfig", "tls", "sidecar"})
TLS_KEYS = frozenset({"cert_file", "key_file", "generate"})
GENERATE_KEYS = frozenset({"service", "webhook_configuration", "ip_addresses"})
SIDECAR_KEYS = frozenset({"image", "address_image", "default_variant", "audience", "token_expiration_seconds",
                          "service_account_annotation", "environment_listen", "admin_listen", "config"})
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True, kw_only=True)
class GeneratedTls:
    """Generate a CA and a serving certificate at start, for ``SERVICE.NAMESPACE.svc`` (and
    ``ip_addresses``), and write the CA into ``webhook_configuration``'s ``caBundle``."""

    service: str
    webhook_configuration: str
    ip_addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    """Either files (cert-manager's Secret: re-read when they change) or ``generate``."""

    cert_file: Path | None = None
    key_file: Path | None = None
    generate: GeneratedTls | None = None

    def __post_init__(self) -> None:
        files = self.cert_file is not None, self.key_file is not None
        if self.generate is not None and any(files):
            raise ConfigError("tls", "give cert_file and key_file, or generate, not both")
        if self.generate is None and not all(files):
            raise ConfigError("tls", "cert_file and key_file are both required (or generate)")


@dataclass(frozen=True, slots=True, kw_only=True)
class SidecarSettings:
    image: str
    address_image: str = "busybox:1.36"
    default_variant: Variant = "loopback"
    audience: str
    token_expiration_seconds: int = 3600
    service_account_annotation: str = DEFAULT_SA_ANNOTATION
    #: The environment variant's metadata address, on the pod's loopback (GCE_METADATA_HOST).
    environment_listen: HostPort = field(default_factory=lambda: HostPort(host="127.0.0.1", port=8988))
    admin_listen: HostPort = field(default_factory=lambda: HostPort(host="127.0.0.1", port=8989))
    #: The rest of the sidecar's metaemu serve configuration (project_id, endpoints, profile, ...).
    config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.image:
            raise ConfigError("sidecar.image", "required")
        if self.default_variant not in VARIANTS:
            raise ConfigError("sidecar.default_variant", f"must be one of {', '.join(VARIANTS)}")
        if not self.audience.startswith(("//", "identitynamespace:")):
            raise ConfigError("sidecar.audience", "expected the Workload Identity provider's full name "
                              "(//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/POOL/"
                              "providers/PROVIDER)")
        if self.token_expiration_seconds < MIN_NODE_TOKEN_S:
            raise ConfigError("sidecar.token_expiration_seconds", f"must be at least {MIN_NODE_TOKEN_S} "
                              "(kubelet refuses shorter projected tokens)")
        if not self.environment_listen.host.startswith("127.") or self.environment_listen.port == 0:
            raise ConfigError("sidecar.environment_listen", "must be a fixed port on 127.0.0.0/8: the pod's "
                              "loopback only (SEC-16)")
        if self.environment_listen.overlaps(self.admin_listen):
            raise ConfigError("sidecar.admin_listen", "must not share the metadata address (SEC-32)")
        decided = sorted(DECIDED_KEYS & set(self.config))
        if decided:
            raise ConfigError("sidecar.config", f"{decided} are decided by the webhook per pod; remove them")


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookSettings:
    listen: HostPort
    log_level: str = "info"
    #: The webhook's own namespace: never injected, whatever its labels say.
    namespace: str
    kubeconfig: Path | None = None
    tls: TlsSettings
    sidecar: SidecarSettings

    def __post_init__(self) -> None:
        if not _DNS_LABEL.match(self.namespace):
            raise ConfigError("namespace", f"{self.namespace!r} is not a namespace name")
        if self.log_level not in _LOG_LEVELS:
            raise ConfigError("log_level", f"must be one of {', '.join(_LOG_LEVELS)}")


def load_settings(path: Path, *, env: Mapping[str, str]) -> WebhookSettings:
    """Read ``path``; ``METAEMU_WEBHOOK_NAMESPACE`` (the downward API's namespace) wins over ``namespace``."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{path} must contain a mapping")
    if env.get("METAEMU_WEBHOOK_NAMESPACE"):
        raw["namespace"] = env["METAEMU_WEBHOOK_NAMESPACE"]
    return parse_settings(raw, base_dir=path.parent)


def parse_settings(raw: Mapping[str, Any], *, base_dir: Path) -> WebhookSettings:
    _known("", raw, TOP_KEYS)
    tls_raw = _section(raw, "tls", "")
    _known("tls.", tls_raw, TLS_KEYS)
    generate: GeneratedTls | None = None
    if tls_raw.get("generate") is not None:
        gen = _section(tls_raw, "generate", "tls.")
        _known("tls.generate.", gen, GENERATE_KEYS)
        addresses = gen.get("ip_addresses") or []
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ConfigError("tls.generate.ip_addresses", "must be a list of addresses")
        generate = GeneratedTls(service=_text(gen, "service", "tls.generate.", "metaemu-webhook"),
                                webhook_configuration=_text(gen, "webhook_configuration", "tls.generate.",
                                                            "metaemu-webhook"),
                                ip_addresses=tuple(addresses))
    tls = TlsSettings(cert_file=_path(tls_raw, "cert_file", base_dir), key_file=_path(tls_raw, "key_file", base_dir),
                      generate=generate)
    side = _section(raw, "sidecar", "")
    _known("sidecar.", side, SIDECAR_KEYS)
    expiration = side.get("token_expiration_seconds", 3600)
    if isinstance(expiration, bool) or not isinstance(expiration, int):
        raise ConfigError("sidecar.token_expiration_seconds", f"must be an integer, got {expiration!r}")
    config = side.get("config") or {}
    if not isinstance(config, dict):
        raise ConfigError("sidecar.config", "must be a mapping (keys of metaemu serve's configuration)")
    sidecar = SidecarSettings(
        image=_text(side, "image", "sidecar.", ""),
        address_image=_text(side, "address_image", "sidecar.", "busybox:1.36"),
        default_variant=_text(side, "default_variant", "sidecar.", "loopback"),  # type: ignore[arg-type]
        audience=_text(side, "audience", "sidecar.", ""),
        token_expiration_seconds=expiration,
        service_account_annotation=_text(side, "service_account_annotation", "sidecar.", DEFAULT_SA_ANNOTATION),
        environment_listen=HostPort.parse("sidecar.environment_listen",
                                          _text(side, "environment_listen", "sidecar.", "127.0.0.1:8988")),
        admin_listen=HostPort.parse("sidecar.admin_listen", _text(side, "admin_listen", "sidecar.", "127.0.0.1:8989")),
        config=config,
    )
    kubeconfig = _path(raw, "kubeconfig", base_dir)
    return WebhookSettings(listen=HostPort.parse("listen", _text(raw, "listen", "", "0.0.0.0:8443")),
                           log_level=_text(raw, "log_level", "", "info").lower(),
                           namespace=_text(raw, "namespace", "", "metaemu-system"),
                           kubeconfig=kubeconfig, tls=tls, sidecar=sidecar)


def _known(prefix: str, raw: Mapping[str, Any], known: frozenset[str]) -> None:
    for key in raw:
        if key not in known:
            raise ConfigError(prefix + str(key), f"unknown key (known: {', '.join(sorted(known))})")


def _section(raw: Mapping[str, Any], key: str, prefix: str) -> Mapping[str, Any]:
    value = raw.get(key)
    if value is None:
        raise ConfigError(prefix + key, "required")
    if not isinstance(value, dict):
        raise ConfigError(prefix + key, "must be a mapping")
    return value


def _text(raw: Mapping[str, Any], key: str, prefix: str, default: str) -> str:
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(prefix + key, f"must be a string, got {type(value).__name__}")
    return str(value).strip()


def _path(raw: Mapping[str, Any], key: str, base_dir: Path) -> Path | None:
    text = _text(raw, key, "", "")
    return base_dir / text if text else None
