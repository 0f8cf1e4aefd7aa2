"""A minimal Kubernetes API client for node mode, over the ``HttpClient`` / ``HttpStreamClient`` seam.

Owns where the API server is and how to authenticate (``KubeConnection``: in-cluster service-account
token and CA, or a kubeconfig for tests), the bearer token re-read from its file (kubelet rotates it),
and the calls node mode makes: list pods by field selector, watch pods from a resourceVersion,
get a service account, watch every service account (from the collection's resourceVersion),
create a TokenRequest (upstream.md §6), and read and JSON-patch this node's taints (the startup
taint, SEC-02). Every failure is an ``UpstreamError`` with ``service="k8s"`` that keeps the HTTP
status and the decoded ``Status`` body; a watch that has fallen out of the history window surfaces
as ``status == 410`` whether the server answered 410 or sent an ``ERROR`` event with code 410.

Not owned here: what to do with the pods (``watch``), who is calling (``identity``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import ssl
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlencode, urlsplit

import yaml

from metaemu.clock import Clock
from metaemu.credentials.upstream import UpstreamCaller
from metaemu.errors import ConfigError, UpstreamError
from metaemu.metrics import Metrics
from metaemu.pods.objects import (
    KubeToken,
    PodRecord,
    ServiceAccountRecord,
    parse_pod,
    parse_service_account,
    parse_timestamp,
)
from metaemu.pods.stream import HttpStreamClient
from metaemu.transport import HttpClient, HttpRequest, TransportFailure

SERVICE = "k8s"
#: Where kubelet mounts the pod's own service-account credentials (upstream.md §6).
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: client-go's in-cluster config re-reads the token file once a minute; kubelet rewrites it at 80 %
#: of a lifetime of at least 10 minutes, so a minute-old copy is always still valid.
TOKEN_REREAD_S = 60.0
#: The API server answers a node-scoped list or a get in milliseconds; 10 s bounds a stuck one.
DEFAULT_TIMEOUT_S = 10.0
#: TokenRequest bounds enforced by the API server (``ValidateTokenRequest``, upstream.md §6).
MIN_EXPIRATION_S = 600
MAX_EXPIRATION_S = 1 << 32
#: Kubernetes object names are DNS labels or subdomains: at most 253 characters.
_MAX_NAME_CHARS = 253

_T = TypeVar("_T", PodRecord, ServiceAccountRecord)


@dataclass(frozen=True, slots=True, kw_only=True)
class KubeConnection:
    """How to reach one API server. ``server`` is a base URL (``https://10.0.0.1:443``)."""

    server: str
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    ca_file: Path | None = None
    ca_data: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("kubernetes.server", f"not an http(s) URL: {self.server!r}")
        # SECURITY: the bearer token can mint tokens for service accounts; never send it in clear
        # text except to a loopback test server.
        if parts.scheme == "http" and not _is_loopback_host(parts.hostname):
            raise ConfigError("kubernetes.server", "plain http is only allowed to a loopback address")
        if self.token is None and self.token_file is None:
            raise ConfigError("kubernetes.token", "a bearer token or token file is required")
        object.__setattr__(self, "server", self.server.rstrip("/"))

    @classmethod
    def in_cluster(cls, env: Mapping[str, str], *, secrets_dir: Path = SERVICE_ACCOUNT_DIR) -> KubeConnection:
        """The API server from ``KUBERNETES_SERVICE_HOST``/``_PORT``, with the mounted token and CA."""
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise ConfigError("kubernetes", "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set "
                              "(not running in a pod?); configure a kubeconfig instead")
        if ":" in host:
            host = f"[{host}]"  # an IPv6 service address
        return cls(server=f"https://{host}:{port}", token_file=secrets_dir / "token", ca_file=secrets_dir / "ca.crt")

    @classmethod
    def from_kubeconfig(cls, path: Path, *, context: str | None = None) -> KubeConnection:
        """The cluster and user of ``context`` (default: ``current-context``) in a kubeconfig.

        Supports ``server``, ``certificate-authority(-data)`` and ``token``/``tokenFile`` users;
        raises ``ConfigError`` for anything else (client certificates, exec plugins).
        """
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError("kubernetes.kubeconfig", f"cannot read {path}: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError("kubernetes.kubeconfig", f"{path} is not a kubeconfig")
        name = context or doc.get("current-context")
        ctx = _named(doc, "contexts", "context", name)
        cluster = _named(doc, "clusters", "cluster", ctx.get("cluster"))
        user = _named(doc, "users", "user", ctx.get("user"))
        if user.keys() - {"token", "tokenFile"}:
            raise ConfigError("kubernetes.kubeconfig", "only token and tokenFile users are supported, not "
                              + ", ".join(sorted(user.keys() - {"token", "tokenFile"})))
        ca_file = cluster.get("certificate-authority")
        token_file = user.get("tokenFile")
        return cls(
            server=str(cluster.get("server") or ""),
            token=str(user["token"]) if user.get("token") else None,
            token_file=(path.parent / token_file) if token_file else None,
            ca_file=(path.parent / ca_file) if ca_file else None,
            ca_data=_decoded_ca(cluster.get("certificate-authority-data")),
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """A context trusting only the cluster CA (None for plain http or the system store)."""
        if not self.server.startswith("https:") or (self.ca_file is None and self.ca_data is None):
            return None
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None, cadata=self.ca_data)


class BearerToken:
    """The ``Authorization`` header value, re-read from ``token_file`` at most every
    ``TOKEN_REREAD_S`` (and right after a 401). Reads run in a worker thread."""

    def __init__(self, connection: KubeConnection, *, clock: Clock) -> None:
        self._connection = connection
        self._clock = clock
        self._value: str | None = connection.token
        self._read_at = float("-inf")

    def invalidate(self) -> None:
        self._read_at = float("-inf")

    async def header(self) -> str:
        path = self._connection.token_file
        if path is not None and self._clock.monotonic() - self._read_at >= TOKEN_REREAD_S:
            try:
                text = await asyncio.to_thread(path.read_text)
            except OSError as exc:
                if self._value is None:
                    raise UpstreamError(service=SERVICE, url=str(path), status=0, body=str(exc), retryable=True,
                                        message=f"cannot read the service-account token: {exc}") from exc
            else:
                self._value, self._read_at = text.strip(), self._clock.monotonic()
        return f"Bearer {self._value}"


@dataclass(frozen=True, slots=True, kw_only=True)
class PodList:
    pods: tuple[PodRecord, ...]
    resource_version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchEvent(Generic[_T]):
    """One watch event. ``item`` is None for ``BOOKMARK`` (which only moves ``resource_version``)."""

    type: str
    resource_version: str
    item: _T | None


class KubeClient:
    """The calls node mode makes. Safe to share between tasks on one loop.

    Every call raises ``UpstreamError`` (``service="k8s"``) on failure; an object name that is not
    a valid path segment raises ``ValueError`` before anything is sent.
    """

    def __init__(self, *, connection: KubeConnection, http: HttpClient, stream: HttpStreamClient, clock: Clock,
                 metrics: Metrics, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._server = connection.server
        self._stream = stream
        self._metrics = metrics
        self._caller = UpstreamCaller(http=http, metrics=metrics, backend=SERVICE)
        self._token = BearerToken(connection, clock=clock)
        self._timeout_s = timeout_s

    async def list_pods(self, *, field_selector: str, timeout_s: float | None = None) -> PodList:
        """All pods matching ``field_selector``, across namespaces, and the list's resourceVersion."""
        url = self._url("/api/v1/pods", fieldSelector=field_selector)
        body = await self._call(HttpRequest(method="GET", url=url, headers=await self._headers(),
                                            timeout_s=timeout_s or self._timeout_s))
        items, meta = body.get("items"), body.get("metadata")
        if not isinstance(items, list) or not isinstance(meta, dict):
            raise self._malformed(url, "a PodList with items and metadata")
        return PodList(pods=tuple(_parsed_pods(items)), resource_version=str(meta.get("resourceVersion") or ""))

    async def watch_pods(self, *, field_selector: str, resource_version: str, timeout_s: int,
                         opened: Callable[[], None] | None = None) -> AsyncGenerator[WatchEvent[PodRecord], None]:
        """Events after ``resource_version`` until the server ends the watch (after ``timeout_s``).

        Bookmarks are requested; ``opened`` is called once the server has accepted the watch. Raises
        ``UpstreamError`` (``status == 410``: relist) on an error answer, an ``ERROR`` event, a
        malformed line or a broken stream. Close it with ``aclose``.
        """
        url = self._url("/api/v1/pods", fieldSelector=field_selector, watch="1", resourceVersion=resource_version,
                        allowWatchBookmarks="true", timeoutSeconds=str(timeout_s))
        async for event in self._watch(url, timeout_s=timeout_s, parse=parse_pod, kind="a pod", opened=opened):
            yield event

    async def service_accounts_version(self) -> str:
        """The resourceVersion of the cluster's service-account collection now: a list of one item
        (``limit=1``), so a watch can start from it without holding every service account."""
        url = self._url("/api/v1/serviceaccounts", limit="1")
        body = await self._call(HttpRequest(method="GET", url=url, headers=await self._headers(),
                                            timeout_s=self._timeout_s))
        meta = body.get("metadata")
        version = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if not isinstance(version, str) or not version:
            raise self._malformed(url, "a ServiceAccountList with metadata.resourceVersion")
        return version

    async def watch_service_accounts(self, *, annotation: str, resource_version: str, timeout_s: int,
                                     opened: Callable[[], None] | None = None,
                                     ) -> AsyncGenerator[WatchEvent[ServiceAccountRecord], None]:
        """Service-account events of every namespace after ``resource_version``, as ``watch_pods``."""
        url = self._url("/api/v1/serviceaccounts", watch="1", resourceVersion=resource_version,
                        allowWatchBookmarks="true", timeoutSeconds=str(timeout_s))
        async for event in self._watch(url, timeout_s=timeout_s, kind="a ServiceAccount", opened=opened,
                                       parse=lambda obj: parse_service_account(obj, annotation=annotation)):
            yield event

    async def _watch(self, url: str, *, timeout_s: int, parse: Callable[[Any], _T], kind: str,
                     opened: Callable[[], None] | None) -> AsyncGenerator[WatchEvent[_T], None]:
        request = HttpRequest(method="GET", url=url, headers=await self._headers(), timeout_s=float(timeout_s))
        try:
            async with self._stream.open(request) as stream:
                if stream.status != 200:
                    body = await stream.read_body()
                    raise self._error(url, stream.status, _decoded(body))
                if opened is not None:
                    opened()
                async for line in stream.lines:
                    yield self._event(url, line, parse=parse, kind=kind)
        except TransportFailure as exc:
            self._metrics.upstream_errors.labels(SERVICE, "0").inc()
            raise UpstreamError(service=SERVICE, url=url, status=0, body=exc.detail, retryable=True,
                                message=exc.detail) from exc

    async def get_service_account(self, namespace: str, name: str, *, annotation: str,
                                  timeout_s: float | None = None) -> ServiceAccountRecord:
        url = self._url(f"/api/v1/namespaces/{_segment(namespace)}/serviceaccounts/{_segment(name)}")
        body = await self._call(HttpRequest(method="GET", url=url, headers=await self._headers(),
                                            timeout_s=timeout_s or self._timeout_s))
        try:
            return parse_service_account(body, annotation=annotation)
        except ValueError as exc:
            raise self._malformed(url, f"a ServiceAccount ({exc})") from None

    async def create_token(self, *, namespace: str, service_account: str, audience: str, pod_name: str,
                           pod_uid: str, expiration_s: int) -> KubeToken:
        """A service-account token for exactly ``[audience]``, bound to the pod (SEC-25).

        Expiry is ``status.expirationTimestamp``: the server may shorten (or extend) the lifetime.
        """
        path = f"/api/v1/namespaces/{_segment(namespace)}/serviceaccounts/{_segment(service_account)}/token"
        url = self._url(path)
        payload = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                   "spec": {"audiences": [audience], "expirationSeconds": expiration_s,
                            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid}}}
        body = await self._call(HttpRequest.json(url, payload, headers=await self._headers(),
                                                 timeout_s=self._timeout_s))
        status = body.get("status")
        token = status.get("token") if isinstance(status, dict) else None
        if not isinstance(status, dict) or not isinstance(token, str) or not token:
            raise self._malformed(url, "a TokenRequest with status.token")
        try:
            expiry = parse_timestamp(status.get("expirationTimestamp"))
        except ValueError as exc:
            raise self._malformed(url, f"a TokenRequest with status.expirationTimestamp ({exc})") from None
        return KubeToken(value=token, expiry=expiry)

    async def get_node_taints(self, name: str) -> list[dict[str, Any]]:
        """``spec.taints`` of node ``name``, as the API server returned them (empty when unset)."""
        url = self._url(f"/api/v1/nodes/{_segment(name)}")
        body = await self._call(HttpRequest(method="GET", url=url, headers=await self._headers(),
                                            timeout_s=self._timeout_s))
        spec = body.get("spec", {})
        taints = spec.get("taints", []) if isinstance(spec, dict) else None
        if not isinstance(taints, list) or not all(isinstance(t, dict) for t in taints):
            raise self._malformed(url, "a Node with a list of spec.taints")
        return taints

    async def patch_node(self, name: str, operations: Sequence[Mapping[str, Any]]) -> None:
        """Apply an RFC 6902 JSON patch to node ``name``. A failed ``test`` operation is an
        ``UpstreamError`` with status 422 (409 on a resourceVersion conflict)."""
        url = self._url(f"/api/v1/nodes/{_segment(name)}")
        headers = {**await self._headers(), "Content-Type": "application/json-patch+json"}
        body = json.dumps(list(operations)).encode()
        await self._call(HttpRequest(method="PATCH", url=url, headers=headers, body=body, timeout_s=self._timeout_s))

    # -- plumbing ----------------------------------------------------------------------------------

    def _url(self, path: str, **query: str) -> str:
        return f"{self._server}{path}" + (f"?{urlencode(query)}" if query else "")

    async def _headers(self) -> dict[str, str]:
        return {"Authorization": await self._token.header(), "Accept": "application/json"}

    async def _call(self, request: HttpRequest) -> dict[str, Any]:
        try:
            return await self._caller.call_json(request)
        except UpstreamError as exc:
            if exc.status == 401:  # our token rotated under us: read it again next time
                self._token.invalidate()
            raise

    def _event(self, url: str, line: bytes, *, parse: Callable[[Any], _T], kind: str) -> WatchEvent[_T]:
        event = _decoded(line)
        type_ = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(type_, str) or not isinstance(obj, dict):
            raise self._malformed(url, "a watch event")
        if type_ == "ERROR":  # a Status object; code 410 means "resourceVersion too old"
            code = obj.get("code")
            raise self._error(url, code if isinstance(code, int) else 500, obj)
        meta = obj.get("metadata")
        rv = str(meta.get("resourceVersion") or "") if isinstance(meta, dict) else ""
        if type_ == "BOOKMARK":
            return WatchEvent(type=type_, resource_version=rv, item=None)
        try:
            return WatchEvent(type=type_, resource_version=rv, item=parse(obj))
        except ValueError as exc:
            raise self._malformed(url, f"{kind} in a {type_} event ({exc})") from None

    def _error(self, url: str, status: int, body: Any) -> UpstreamError:
        self._metrics.upstream_errors.labels(SERVICE, str(status)).inc()
        return UpstreamError(service=SERVICE, url=url, status=status, body=body,
                             retryable=status in (0, 410, 429) or status >= 500)

    def _malformed(self, url: str, expected: str) -> UpstreamError:
        return UpstreamError(service=SERVICE, url=url, status=200, body="(unexpected shape)", retryable=True,
                             message=f"the API server did not return {expected}")


def _parsed_pods(items: Sequence[Any]) -> list[PodRecord]:
    pods: list[PodRecord] = []
    for item in items:
        # A pod without metadata cannot be attributed to anyone; leaving it out fails closed.
        with contextlib.suppress(ValueError):
            pods.append(parse_pod(item))
    return pods


def _decoded(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace")


def _segment(name: str) -> str:
    """A path segment for an object name; names are DNS labels, but never trust that blindly."""
    if not name or len(name) > _MAX_NAME_CHARS or "/" in name or name in (".", ".."):
        raise ValueError(f"not a Kubernetes object name: {name!r}")
    return quote(name, safe="")


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _named(doc: dict[str, Any], section: str, inner: str, name: Any) -> dict[str, Any]:
    entries = doc.get(section)
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("name") == name and isinstance(entry.get(inner), dict):
            value: dict[str, Any] = entry[inner]
            return value
    raise ConfigError("kubernetes.kubeconfig", f"no {inner} named {name!r} in {section}")


def _decoded_ca(data: Any) -> str | None:
    if not data:
        return None
    try:
        return base64.b64decode(str(data), validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        raise ConfigError("kubernetes.kubeconfig", "certificate-authority-data is not base64 PEM") from None
