"""The configuration: loaded once from file, flags and environment into a frozen tree.

Owns parsing and validation of the YAML file (``--config`` / ``METAEMU_CONFIG``), the standard
Google ``external_account`` credential configuration (``--credential-config``), and the environment
overrides of ``ENV_OVERRIDES``. Every problem raises
``ConfigError`` naming the dotted key. Nothing here reads ``os.environ`` itself: the caller passes
the environment in.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from metaemu.credentials.sources.config import SourceConfig, parse_credential_source, parse_source
from metaemu.errors import ConfigError

DEFAULT_STS_URL = "https://sts.googleapis.com/v1/token"
DEFAULT_IAM_CREDENTIALS_URL = "https://iamcredentials.googleapis.com/v1"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
#: generateAccessToken accepts at most 1 h unless the org policy
#: constraints/iam.allowServiceAccountCredentialLifetimeExtension allows up to 12 h (upstream.md §2.1).
MAX_TOKEN_LIFETIME_S = 12 * 3600
#: Below this a served token could not honour the 300 s serving floor for long (T-05).
MIN_TOKEN_LIFETIME_S = 600
#: Attributes the GKE metadata server exposes under instance/attributes/ (K-14).
GKE_INSTANCE_ATTRIBUTES = frozenset({"cluster-location", "cluster-name", "cluster-uid"})

Profile = Literal["gce", "gke"]
_SA_EMAIL = re.compile(r"^[^@\s]+@([a-z][a-z0-9-]{4,28}[a-z0-9])\.iam\.gserviceaccount\.com$")
_ANY_SA_EMAIL = re.compile(r"^[^@/\s]+@[^@/\s]+\.[a-z]{2,}$")
_AUDIENCE_PROJECT = re.compile(r"^//iam\.googleapis\.com/projects/(\d+)/")
_LOG_LEVELS = ("debug", "info", "warning", "error")
#: Environment variables that override a key of the file (METAEMU_SERVICE_ACCOUNT sets
#: workload_identity.service_account), e.g. for docker compose where the file is shared.
ENV_OVERRIDES = {
    "METAEMU_LISTEN": "listen",
    "METAEMU_ADMIN_LISTEN": "admin_listen",
    "METAEMU_LOG_LEVEL": "log_level",
    "METAEMU_PROJECT_ID": "project_id",
    "METAEMU_NUMERIC_PROJECT_ID": "numeric_project_id",
    "METAEMU_SERVICE_ACCOUNT": "service_account",
    "METAEMU_NODE_NAME": "node.name",
    "METAEMU_NODE_IPS": "node.host_addresses",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, key: str, text: str) -> HostPort:
        """``host:port`` or ``[v6]:port``."""
        m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
        if not m:
            raise ConfigError(key, f"expected HOST:PORT (or [IPv6]:PORT), got {text!r}")
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4))
        if not 0 <= port <= 65535:
            raise ConfigError(key, f"port {port} is out of range 0-65535")
        return cls(host=host, port=port)

    def overlaps(self, other: HostPort) -> bool:
        """Would both fail to bind at once (same port, same or wildcard host)?"""
        if self.port != other.port or self.port == 0:
            return False
        wild = {"0.0.0.0", "::", ""}
        return self.host == other.host or self.host in wild or other.host in wild

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceConfig:
    id: str
    zone: str | None = None
    hostname: str
    name: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.id.isdigit() or int(self.id) >= 2**64:
            raise ConfigError("instance.id", "must be an unsigned 64-bit decimal (K-03)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoints:
    sts: str = DEFAULT_STS_URL
    iam_credentials: str = DEFAULT_IAM_CREDENTIALS_URL
    timeout_seconds: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadIdentity:
    audience: str
    service_account: str | None
    scopes: tuple[str, ...]
    token_lifetime_seconds: int
    source: SourceConfig

    def __post_init__(self) -> None:
        # The google kind uses Google credentials as they are: no STS exchange, so no audience.
        audience_optional = self.source.kind == "google" and not self.audience
        if not audience_optional and not self.audience.startswith(("//", "identitynamespace:")):
            raise ConfigError("workload_identity.audience",
                              "expected //iam.googleapis.com/projects/N/locations/global/"
                              "workloadIdentityPools/POOL/providers/PROVIDER or identitynamespace:…")
        if self.service_account is not None and not _ANY_SA_EMAIL.match(self.service_account):
            raise ConfigError("workload_identity.service_account",
                              f"{self.service_account!r} is not a service-account email")
        if not self.scopes:
            raise ConfigError("workload_identity.scopes", "must list at least one scope")
        if not MIN_TOKEN_LIFETIME_S <= self.token_lifetime_seconds <= MAX_TOKEN_LIFETIME_S:
            raise ConfigError("workload_identity.token_lifetime_seconds",
                              f"must be between {MIN_TOKEN_LIFETIME_S} and {MAX_TOKEN_LIFETIME_S}")


#: TokenRequest bounds: the API server refuses < 10 min (upstream.md §6).
MIN_NODE_TOKEN_S = 600
MAX_NODE_TOKEN_S = 48 * 3600
DEFAULT_SA_ANNOTATION = "iam.gke.io/gcp-service-account"
#: The taint the agent removes from its node once it can serve (SEC-02; metaemu.pods.startup_taint).
DEFAULT_STARTUP_TAINT = "metaemu.dev/agent-not-ready"
#: A taint key is a qualified name: an optional DNS-subdomain prefix and "/", then a name of at most 63.
_TAINT_KEY = re.compile(r"^(?:(?=.{1,253}/)[a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?"
                        r"(?=.{1,63}$)[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


#: The clouds whose own metadata service ``node.passthrough`` relays to, each with the first path
#: segment its requests start with (AWS's dated API versions, ``/2021-07-15/``, are judged as
#: ``/latest/``; metaemu.server.passthrough).
PASSTHROUGH_CLOUDS: Mapping[str, str] = {"aws": "latest", "azure": "metadata"}
PassthroughCloud = Literal["aws", "azure"]
#: SECURITY (security.md §3 item 3: a pass-through "must never carry node credentials"): paths
#: never relayed, whatever node.passthrough_paths says (a rule allowing one is a ConfigError, and
#: the relay refuses them before its rules). AWS: the instance profile's role credentials, the
#: instance-identity role credentials, and the *signed* identity documents (PKCS#7, signature,
#: RSA-2048: an attestation that logs the node in elsewhere, e.g. Vault's aws auth method of type
#: ec2). Azure: managed-identity tokens and the attested (signed) document. Judged like every rule:
#: after normalisation, case-insensitively, AWS's dated versions as /latest/.
NEVER_RELAYED: Mapping[str, tuple[str, ...]] = {
    "aws": ("/latest/meta-data/iam/security-credentials", "/latest/meta-data/identity-credentials",
            "/latest/dynamic/instance-identity/pkcs7", "/latest/dynamic/instance-identity/signature",
            "/latest/dynamic/instance-identity/rsa2048"),
    "azure": ("/metadata/identity", "/metadata/attested"),
}
#: Where the cloud's metadata service answers the node itself: the same link-local address on EC2
#: (IMDS) and Azure (IMDS). The agent's own connections to it are not redirected (the interception
#: rules only see packets arriving from pods), so the relay reaches the real service.
DEFAULT_PASSTHROUGH_ADDRESS = HostPort(host="169.254.169.254", port=80)
#: IMDS answers from the instance's own hypervisor in milliseconds; AWS SDKs give it 1 s per attempt
#: (botocore's metadata_service_timeout), Azure's 2-5 s. 5 s bounds how long a relay holds a slot of
#: node.max_concurrent_requests, and stays under Kubernetes' default probe and SDK retry budgets.
DEFAULT_PASSTHROUGH_TIMEOUT_S = 5.0
MAX_PASSTHROUGH_TIMEOUT_S = 60.0
#: A rule of node.passthrough_paths: an optional "!" (refuse), then a canonical absolute path of
#: the characters a relayed path may hold (metaemu.server.passthrough.RELAY_PATH).
_PASSTHROUGH_RULE = re.compile(r"^!?/[A-Za-z0-9._~:@+=,/-]*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """``mode: node``: one agent per node serving every pod with its own identity (issue #4)."""

    name: str
    audience: str
    service_account_annotation: str = DEFAULT_SA_ANNOTATION
    token_expiration_seconds: int = 3600
    host_network: Literal["deny"] = "deny"
    kubeconfig: Path | None = None
    #: The node's own addresses (callers from them are host processes or hostNetwork pods: 403).
    host_addresses: tuple[str, ...] = ()
    scopes: tuple[str, ...] = (CLOUD_PLATFORM_SCOPE,)
    token_lifetime_seconds: int = 3600
    #: Per-pod token bucket (SEC-34): sustained requests per second and burst.
    rate_limit_per_second: float = 20.0
    rate_limit_burst: int = 40
    #: Requests handled at once before new ones get 503 (SEC-35; GKE documents 500 per node).
    max_concurrent_requests: int = 500
    #: When set, the agent re-checks the node-setup interception rules periodically and repairs drift
    #: (SEC-04; needs NET_ADMIN): pod interface patterns, or the node's own interface.
    intercept_pod_interfaces: tuple[str, ...] = ()
    intercept_node_interface: str | None = None
    #: Removed from this node once the agent is ready (SEC-02); empty: leave the node's taints alone.
    startup_taint: str = DEFAULT_STARTUP_TAINT
    #: Clouds whose own metadata service pods' non-Google requests are relayed to (issue #11);
    #: empty: none, every request is metaemu's (fail closed).
    passthrough: tuple[PassthroughCloud, ...] = ()
    passthrough_address: HostPort = DEFAULT_PASSTHROUGH_ADDRESS
    #: Path rules of the relay (metaemu.server.passthrough); empty: each cloud's default rules.
    passthrough_paths: tuple[str, ...] = ()
    passthrough_timeout_seconds: float = DEFAULT_PASSTHROUGH_TIMEOUT_S

    def __post_init__(self) -> None:
        self._check_passthrough()
        if self.startup_taint and not _TAINT_KEY.match(self.startup_taint):
            raise ConfigError("node.startup_taint", f"{self.startup_taint!r} is not a taint key (an optional "
                              "DNS-subdomain prefix and '/', then a name of at most 63 characters)")
        if not self.name:
            raise ConfigError("node.name", "required (the downward API's spec.nodeName, e.g. via METAEMU_NODE_NAME)")
        if not self.audience.startswith(("//", "identitynamespace:")):
            raise ConfigError("node.audience", "expected the Workload Identity provider's full name (//iam.googleapis."
                              "com/projects/N/locations/global/workloadIdentityPools/POOL/providers/PROVIDER)")
        if not MIN_NODE_TOKEN_S <= self.token_expiration_seconds <= MAX_NODE_TOKEN_S:
            raise ConfigError("node.token_expiration_seconds",
                              f"must be between {MIN_NODE_TOKEN_S} and {MAX_NODE_TOKEN_S} (TokenRequest limits)")
        if self.rate_limit_per_second <= 0 or self.rate_limit_burst < 1:
            raise ConfigError("node.rate_limit_per_second", "rate and burst must be positive")
        if self.max_concurrent_requests < 1:
            raise ConfigError("node.max_concurrent_requests", "must be at least 1")

    def _check_passthrough(self) -> None:
        unknown = sorted(set(self.passthrough) - set(PASSTHROUGH_CLOUDS))
        if unknown or len(set(self.passthrough)) != len(self.passthrough):
            raise ConfigError("node.passthrough", f"expected a list of distinct clouds out of "
                              f"{', '.join(PASSTHROUGH_CLOUDS)}, got {list(self.passthrough)}")
        address = self.passthrough_address
        if address.port == 0 or address.host in ("0.0.0.0", "::", ""):
            raise ConfigError("node.passthrough_address", f"{address} is not an address to connect to")
        if not 0 < self.passthrough_timeout_seconds <= MAX_PASSTHROUGH_TIMEOUT_S:
            raise ConfigError("node.passthrough_timeout_seconds", f"must be above 0 and at most "
                              f"{MAX_PASSTHROUGH_TIMEOUT_S:g}")
        if self.passthrough_paths and not self.passthrough:
            raise ConfigError("node.passthrough_paths", "only with node.passthrough")
        self._check_passthrough_paths()

    def _check_passthrough_paths(self) -> None:
        """Each rule canonical, in a configured cloud's namespace, never allowing a NEVER_RELAYED
        path; and every configured cloud allows some path (else it relays nothing: a mistake)."""
        namespaces = {PASSTHROUGH_CLOUDS[cloud]: cloud for cloud in self.passthrough}
        allowed: set[str] = set()
        for rule in self.passthrough_paths:
            path = rule.removeprefix("!")
            segments = path.split("/")[1:]
            if (not _PASSTHROUGH_RULE.match(rule) or any(s in ("", ".", "..") for s in segments[:-1])
                    or segments[-1] in (".", "..")):
                raise ConfigError("node.passthrough_paths", f"{rule!r} is not an optional '!' and a canonical "
                                  "path (no //, . or .., no percent-encoding)")
            cloud = namespaces.get(segments[0].lower())
            if cloud is None:
                raise ConfigError("node.passthrough_paths", f"{rule!r} is no path of "
                                  f"{', '.join(self.passthrough)} (they start with "
                                  f"{', '.join('/' + n + '/' for n in namespaces)})")
            if not rule.startswith("!"):
                allowed.add(cloud)
                judged = "/".join(["", PASSTHROUGH_CLOUDS[cloud], *segments[1:]]).lower().rstrip("/")
                floor = next((f for f in NEVER_RELAYED[cloud] if judged == f or judged.startswith(f + "/")), None)
                if floor is not None:
                    raise ConfigError("node.passthrough_paths", f"{rule!r} would relay {floor}: node credentials "
                                      "are never relayed (security.md §3 item 3)")
        missing = sorted(set(self.passthrough) - allowed) if self.passthrough_paths else []
        if missing:
            raise ConfigError("node.passthrough_paths", f"allows no path of {', '.join(missing)}: remove it from "
                              "node.passthrough or allow a path")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    listen: HostPort
    admin_listen: HostPort
    #: The admin app on a Unix socket as well: node mode's exec probes reach this process's own
    #: /readyz through it while two agents share admin_listen in a surge upgrade (issue #11).
    admin_socket: Path | None = None
    profile: Profile = "gke"
    log_level: str = "info"
    project_id: str
    numeric_project_id: str
    project_attributes: Mapping[str, str] = field(default_factory=dict)
    instance: InstanceConfig
    #: Sidecar mode: the one identity served. None in node mode (each pod has its own).
    workload_identity: WorkloadIdentity | None
    mode: Literal["sidecar", "node"] = "sidecar"
    node: NodeConfig | None = None
    endpoints: Endpoints = field(default_factory=Endpoints)
    allowed_hosts: tuple[str, ...] = ()
    #: Answer the common cached GETs at the protocol level (metaemu.server.fast_path, issue #12).
    fast_path: bool = True

    def __post_init__(self) -> None:
        if self.listen.overlaps(self.admin_listen):
            raise ConfigError("admin_listen", f"{self.admin_listen} must not share the metadata address "
                              f"{self.listen}: pods must never reach /metrics or probes (SEC-32)")
        if not self.numeric_project_id.isdigit():
            raise ConfigError("numeric_project_id", "must be digits only (K-02: gcloud checks .isdigit())")
        node = self.node
        # SECURITY: the only way a relayed request could reach metaemu again (a loop) is this
        # address naming metaemu's own listener: the interception rules never redirect the agent's
        # own connections (metaemu.interception: PREROUTING sees only packets arriving from pods).
        if node is not None and node.passthrough and self.listen.overlaps(node.passthrough_address):
            raise ConfigError("node.passthrough_address", f"{node.passthrough_address} is metaemu's own listen "
                              f"address {self.listen}: relayed requests would come back to metaemu")
        if self.profile == "gke":
            extra = sorted(set(self.instance.attributes) - GKE_INSTANCE_ATTRIBUTES)
            if extra:
                raise ConfigError("instance.attributes", f"{extra} are not served by the gke profile (K-14); "
                                  f"allowed: {sorted(GKE_INSTANCE_ATTRIBUTES)}")

    @property
    def email(self) -> str:
        """The account served as ``default`` in sidecar mode (GKE-05); the workload pool in node mode,
        where each pod's own account is resolved per request."""
        wi = self.workload_identity
        return (wi.service_account if wi else None) or f"{self.project_id}.svc.id.goog"

    @property
    def scopes(self) -> tuple[str, ...]:
        if self.workload_identity is not None:
            return self.workload_identity.scopes
        return self.node.scopes if self.node else (CLOUD_PLATFORM_SCOPE,)


# ---------------------------------------------------------------- loading


def load_config(
    *,
    path: Path | None,
    credential_config: Path | None = None,
    env: Mapping[str, str],
    hostname: str = "localhost",
    document: str | None = None,
) -> Config:
    """Build the ``Config`` from a YAML file (or ``document``, the file's text itself), an optional
    credential configuration and ``env``."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(path)
    elif document is not None:
        raw = _parse_yaml(document, "METAEMU_CONFIG_YAML")
    if credential_config is not None:
        wi = raw.setdefault("workload_identity", {})
        if not isinstance(wi, dict):
            raise ConfigError("workload_identity", "must be a mapping")
        wi["credential_config"] = str(credential_config)
    for var, key in ENV_OVERRIDES.items():
        if not env.get(var):
            continue
        section, _, leaf = key.rpartition(".")
        if key == "service_account":
            section, leaf = "workload_identity", key
        target = raw.setdefault(section, {}) if section else raw
        if not isinstance(target, dict):
            raise ConfigError(section, "must be a mapping")
        target[leaf] = [a.strip() for a in env[var].split(",") if a.strip()] if leaf == "host_addresses" else env[var]
    return parse_config(raw, hostname=hostname, base_dir=path.parent if path else Path.cwd())


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror or exc}") from None
    return _parse_yaml(text, str(path))


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    key = "--config" if where != "METAEMU_CONFIG_YAML" else where
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"{where} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(key, f"{where} must contain a mapping at the top level")
    return data


#: Every key the file accepts, by section (the README's configuration reference is tested against these).
TOP_KEYS = frozenset({"listen", "admin_listen", "admin_socket", "profile", "log_level", "project_id",
                      "numeric_project_id", "project_attributes", "instance", "workload_identity", "endpoints",
                      "allowed_hosts", "mode", "node", "fast_path"})
NODE_KEYS = frozenset({"name", "audience", "service_account_annotation", "token_expiration_seconds",
                       "host_network", "kubeconfig", "host_addresses", "scopes", "token_lifetime_seconds",
                       "rate_limit_per_second", "rate_limit_burst", "max_concurrent_requests",
                       "intercept_pod_interfaces", "intercept_node_interface", "startup_taint", "passthrough",
                       "passthrough_address", "passthrough_paths", "passthrough_timeout_seconds"})
INSTANCE_KEYS = frozenset({"id", "zone", "hostname", "name", "attributes", "tags"})
WORKLOAD_IDENTITY_KEYS = frozenset({"audience", "service_account", "scopes", "token_lifetime_seconds", "source",
                                    "credential_config"})
ENDPOINTS_KEYS = frozenset({"sts", "iam_credentials", "timeout_seconds"})


def parse_config(raw: Mapping[str, Any], *, hostname: str, base_dir: Path) -> Config:
    _reject_unknown("", raw, TOP_KEYS)
    profile = _str(raw, "profile", "gke")
    if profile not in ("gce", "gke"):
        raise ConfigError("profile", f"must be 'gce' or 'gke', got {profile!r}")
    log_level = _str(raw, "log_level", "info").lower()
    if log_level not in _LOG_LEVELS:
        raise ConfigError("log_level", f"must be one of {', '.join(_LOG_LEVELS)}")
    mode = _str(raw, "mode", "sidecar")
    if mode not in ("sidecar", "node"):
        raise ConfigError("mode", f"must be 'sidecar' or 'node', got {mode!r}")
    endpoints_raw = _mapping(raw, "endpoints")
    wi: WorkloadIdentity | None = None
    node: NodeConfig | None = None
    if mode == "node":
        if raw.get("workload_identity") is not None:
            raise ConfigError("workload_identity", "not used in node mode: each pod's own service account is its "
                              "identity (configure node.audience)")
        node = _parse_node(_mapping(raw, "node", required=True), base_dir=base_dir)
        endpoints = _parse_endpoints(endpoints_raw)
        audience, service_account = node.audience, None
    else:
        if raw.get("node") is not None:
            raise ConfigError("node", "only with mode: node")
        wi, endpoints = _parse_workload_identity(_mapping(raw, "workload_identity", required=True), endpoints_raw,
                                                 base_dir=base_dir)
        audience, service_account = wi.audience, wi.service_account
    project_id = _opt_str(raw, "project_id") or _project_from_email(service_account)
    if not project_id:
        raise ConfigError("project_id", "required (it cannot be derived: no service_account in "
                          "the *.iam.gserviceaccount.com form is configured)")
    numeric = _opt_str(raw, "numeric_project_id") or _project_number(audience)
    if not numeric:
        raise ConfigError("numeric_project_id", "required (it cannot be derived from the audience)")
    return Config(
        listen=HostPort.parse("listen", _str(raw, "listen", "127.0.0.1:8080")),
        admin_listen=HostPort.parse("admin_listen", _str(raw, "admin_listen", "127.0.0.1:8081")),
        admin_socket=_admin_socket(raw, base_dir=base_dir),
        profile=profile,  # type: ignore[arg-type]  # checked above
        log_level=log_level,
        project_id=project_id,
        numeric_project_id=numeric,
        project_attributes=_str_map(raw, "project_attributes"),
        instance=_parse_instance(_mapping(raw, "instance"), hostname=hostname, project_id=project_id),
        workload_identity=wi,
        mode=mode,  # type: ignore[arg-type]  # checked above
        node=node,
        endpoints=endpoints,
        allowed_hosts=_str_list(raw, "allowed_hosts", "allowed_hosts"),
        fast_path=_bool(raw, "fast_path", True),
    )


def _parse_instance(raw: Mapping[str, Any], *, hostname: str, project_id: str) -> InstanceConfig:
    _reject_unknown("instance.", raw, INSTANCE_KEYS)
    name = _opt_str(raw, "name", "instance.") or hostname.split(".")[0]
    host = _opt_str(raw, "hostname", "instance.") or f"{name}.c.{project_id}.internal"
    return InstanceConfig(
        id=_opt_str(raw, "id", "instance.") or _stable_instance_id(f"{project_id}/{host}"),
        zone=_opt_str(raw, "zone", "instance."),
        hostname=host,
        name=name,
        attributes=_str_map(raw, "attributes", "instance."),
        tags=_str_list(raw, "tags", "instance.tags"),
    )


def _stable_instance_id(seed: str) -> str:
    """A deterministic 19-digit id so restarts keep the same instance/id (K-03)."""
    return str(10**18 + int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") % (9 * 10**18))


def _parse_workload_identity(
    raw: Mapping[str, Any], endpoints_raw: Mapping[str, Any], *, base_dir: Path
) -> tuple[WorkloadIdentity, Endpoints]:
    p = "workload_identity."
    _reject_unknown(p, raw, WORKLOAD_IDENTITY_KEYS)
    scopes = _str_list(raw, "scopes", p + "scopes") or (CLOUD_PLATFORM_SCOPE,)
    lifetime = _int(raw, "token_lifetime_seconds", 3600, p)
    endpoints = _parse_endpoints(endpoints_raw)
    cc_path = _opt_str(raw, "credential_config", p)
    if cc_path is not None:
        clash = sorted({"audience", "service_account", "source"} & set(raw)) + (["endpoints"] if endpoints_raw else [])
        if clash:
            raise ConfigError(p + "credential_config", f"replaces {clash}; configure one or the other")
        return _from_credential_config(base_dir / cc_path, scopes=scopes, lifetime=lifetime, timeout=endpoints)
    audience = _opt_str(raw, "audience", p)
    source_raw = _mapping(raw, "source", required=True, prefix=p)
    if not audience and source_raw.get("type") != "google":
        raise ConfigError(p + "audience", "required (or give workload_identity.credential_config)")
    wi = WorkloadIdentity(
        audience=audience or "", service_account=_opt_str(raw, "service_account", p), scopes=scopes,
        token_lifetime_seconds=lifetime, source=parse_source(source_raw, prefix=p + "source.", base_dir=base_dir),
    )
    return wi, endpoints


def _parse_endpoints(raw: Mapping[str, Any]) -> Endpoints:
    _reject_unknown("endpoints.", raw, ENDPOINTS_KEYS)
    return Endpoints(
        sts=_url(raw, "sts", DEFAULT_STS_URL),
        iam_credentials=_url(raw, "iam_credentials", DEFAULT_IAM_CREDENTIALS_URL).rstrip("/"),
        timeout_seconds=_positive_float(raw, "timeout_seconds", 10.0, "endpoints."),
    )


def _parse_node(raw: Mapping[str, Any], *, base_dir: Path) -> NodeConfig:
    p = "node."
    _reject_unknown(p, raw, NODE_KEYS)
    host_network = _str(raw, "host_network", "deny", p)
    if host_network != "deny":
        raise ConfigError(p + "host_network", "only 'deny' is supported: hostNetwork callers share the node's "
                          "address and cannot be told apart (SEC-14)")
    kubeconfig = _opt_str(raw, "kubeconfig", p)
    rate = raw.get("rate_limit_per_second", 20.0)
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise ConfigError(p + "rate_limit_per_second", f"must be a number, got {rate!r}")
    return NodeConfig(
        name=_opt_str(raw, "name", p) or "",
        audience=_opt_str(raw, "audience", p) or "",
        service_account_annotation=_str(raw, "service_account_annotation", DEFAULT_SA_ANNOTATION, p),
        token_expiration_seconds=_int(raw, "token_expiration_seconds", 3600, p),
        kubeconfig=base_dir / kubeconfig if kubeconfig else None,
        host_addresses=_str_list(raw, "host_addresses", p + "host_addresses"),
        scopes=_str_list(raw, "scopes", p + "scopes") or (CLOUD_PLATFORM_SCOPE,),
        token_lifetime_seconds=_int(raw, "token_lifetime_seconds", 3600, p),
        rate_limit_per_second=float(rate),
        rate_limit_burst=_int(raw, "rate_limit_burst", 40, p),
        max_concurrent_requests=_int(raw, "max_concurrent_requests", 500, p),
        intercept_pod_interfaces=_str_list(raw, "intercept_pod_interfaces", p + "intercept_pod_interfaces"),
        intercept_node_interface=_opt_str(raw, "intercept_node_interface", p),
        # Absent: the default taint; null or "": none (nothing to remove, no access to nodes needed).
        startup_taint=(_opt_str(raw, "startup_taint", p) or "") if "startup_taint" in raw else DEFAULT_STARTUP_TAINT,
        # Checked in NodeConfig (a ConfigError naming node.passthrough for anything but a known cloud).
        passthrough=cast("tuple[PassthroughCloud, ...]", _str_list(raw, "passthrough", p + "passthrough")),
        passthrough_address=HostPort.parse(p + "passthrough_address", _str(raw, "passthrough_address",
                                                                           str(DEFAULT_PASSTHROUGH_ADDRESS), p)),
        passthrough_paths=_str_list(raw, "passthrough_paths", p + "passthrough_paths"),
        passthrough_timeout_seconds=_positive_float(raw, "passthrough_timeout_seconds",
                                                    DEFAULT_PASSTHROUGH_TIMEOUT_S, p),
    )


_IMPERSONATION_URL = re.compile(r"^(https?://[^/]+(?:/[^/]+)*?)/projects/-/serviceAccounts/([^/:]+):generateAccessToken$")


def _from_credential_config(
    path: Path, *, scopes: tuple[str, ...], lifetime: int, timeout: Endpoints
) -> tuple[WorkloadIdentity, Endpoints]:
    """A Google ``external_account`` credential configuration (AIP-4117)."""
    key = "workload_identity.credential_config"
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(key, f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("type") != "external_account":
        raise ConfigError(key, f"{path}: expected a JSON object with \"type\": \"external_account\"")
    audience = data.get("audience")
    if not isinstance(audience, str) or not audience:
        raise ConfigError(key, f"{path}: \"audience\" is required")
    sts = data.get("token_url") or DEFAULT_STS_URL
    iam = DEFAULT_IAM_CREDENTIALS_URL
    sa = None
    if imp := data.get("service_account_impersonation_url"):
        m = _IMPERSONATION_URL.match(str(imp))
        if not m:
            raise ConfigError(key, f"{path}: service_account_impersonation_url {imp!r} is not "
                              ".../projects/-/serviceAccounts/EMAIL:generateAccessToken")
        iam, sa = m.group(1), m.group(2)
    opts = data.get("service_account_impersonation") or {}
    if isinstance(opts, dict) and isinstance(opts.get("token_lifetime_seconds"), int):
        lifetime = opts["token_lifetime_seconds"]
    source = parse_credential_source(data.get("credential_source"), subject_token_type=data.get("subject_token_type"),
                                     prefix=f"{key} ({path.name}) credential_source.", base_dir=path.parent)
    wi = WorkloadIdentity(audience=audience, service_account=sa, scopes=scopes,
                          token_lifetime_seconds=lifetime, source=source)
    return wi, Endpoints(sts=str(sts), iam_credentials=iam, timeout_seconds=timeout.timeout_seconds)


def _project_from_email(email: str | None) -> str | None:
    m = _SA_EMAIL.match(email or "")
    return m.group(1) if m else None


def _project_number(audience: str) -> str | None:
    m = _AUDIENCE_PROJECT.match(audience)
    return m.group(1) if m else None


# ---------------------------------------------------------------- typed accessors


def _reject_unknown(prefix: str, raw: Mapping[str, Any], known: frozenset[str]) -> None:
    for k in raw:
        if k not in known:
            raise ConfigError(prefix + str(k), f"unknown key (known: {', '.join(sorted(known))})")


def _mapping(raw: Mapping[str, Any], key: str, *, required: bool = False, prefix: str = "") -> Mapping[str, Any]:
    value = raw.get(key)
    if value is None:
        if required:
            raise ConfigError(prefix + key, "required")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(prefix + key, f"must be a mapping, got {type(value).__name__}")
    return value


#: sun_path holds 108 bytes with the terminating NUL (unix(7)).
_MAX_SOCKET_PATH_BYTES = 107


def _admin_socket(raw: Mapping[str, Any], *, base_dir: Path) -> Path | None:
    value = _opt_str(raw, "admin_socket")
    if value is None:
        return None
    path = base_dir / value
    if len(str(path).encode()) > _MAX_SOCKET_PATH_BYTES:
        raise ConfigError("admin_socket", f"{path} is longer than a Unix socket path may be "
                          f"({_MAX_SOCKET_PATH_BYTES} bytes)")
    return path


def _opt_str(raw: Mapping[str, Any], key: str, prefix: str = "") -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(prefix + key, f"must be a string, got {type(value).__name__}")
    return str(value).strip() or None


def _str(raw: Mapping[str, Any], key: str, default: str, prefix: str = "") -> str:
    return _opt_str(raw, key, prefix) or default


def _bool(raw: Mapping[str, Any], key: str, default: bool, prefix: str = "") -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(prefix + key, f"must be true or false, got {value!r}")
    return value


def _int(raw: Mapping[str, Any], key: str, default: int, prefix: str = "") -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(prefix + key, f"must be an integer, got {value!r}")
    return value


def _positive_float(raw: Mapping[str, Any], key: str, default: float, prefix: str = "") -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(prefix + key, f"must be a positive number, got {value!r}")
    return float(value)


def _url(raw: Mapping[str, Any], key: str, default: str) -> str:
    value = _str(raw, key, default, "endpoints.")
    if not re.match(r"^https?://[^/\s]+", value):
        raise ConfigError("endpoints." + key, f"must be an http(s) URL, got {value!r}")
    return value


def _str_list(raw: Mapping[str, Any], key: str, name: str) -> tuple[str, ...]:
    value = raw.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(name, "must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def _str_map(raw: Mapping[str, Any], key: str, prefix: str = "") -> dict[str, str]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(prefix + key, "must be a mapping of strings")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", k):
            raise ConfigError(f"{prefix}{key}.{k}", "keys may contain only letters, digits, '_', '.', '-'")
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise ConfigError(f"{prefix}{key}.{k}", "must be a string")
        out[k] = str(v)
    return out
