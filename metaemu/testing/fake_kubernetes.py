"""``FakeKubernetes``: a Kubernetes API server stand-in for node mode, for tests and the demo.

Owns routing, bearer authentication and a small RBAC (``list``/``watch``/``get`` pods, ``get``
service accounts, ``create serviceaccounts/token``, ``get``/``patch`` nodes), TokenRequest with the
API server's checks (``tokenrequest``), JSON patches of nodes with its validation of taints,
OIDC discovery and JWKS of its ``FakeIssuer`` (so ``FakeGoogle`` can trust its tokens), test
helpers that change pods, nodes and service accounts, fault injection, and three ways to reach it:
``handle`` (a plain coroutine; a watch is read whole), ``client()`` (an in-process ``HttpClient``
+ ``HttpStreamClient``) and ``app()`` (aiohttp, streaming watches).

Routes::

    GET  /api/v1/pods[?fieldSelector=&watch=1&resourceVersion=&timeoutSeconds=&allowWatchBookmarks=]
    GET  /api/v1/namespaces/{ns}/pods[...same]          GET /api/v1/namespaces/{ns}/pods/{name}
    GET  /api/v1/namespaces/{ns}/serviceaccounts/{name}
    POST /api/v1/namespaces/{ns}/serviceaccounts/{name}/token
    GET  /api/v1/nodes/{name}     PATCH /api/v1/nodes/{name}  (application/json-patch+json only)
    GET  /.well-known/openid-configuration, /openid/v1/jwks   (no authentication)

Objects, selectors, resourceVersions and watches live in ``fake_kubernetes_store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import jsonpatch
import jsonpointer
import yaml
from aiohttp import web

from metaemu.clock import Clock, SystemClock
from metaemu.pods.objects import format_timestamp
from metaemu.pods.stream import LineStream
from metaemu.testing.fake_issuer import DISCOVERY_PATH, JWKS_PATH, FakeIssuer
from metaemu.testing.fake_kubernetes_store import (
    BROKEN,
    FieldSelector,
    KubeStore,
    SelectorError,
    Subscription,
    pod_object,
    pod_status,
    service_account_object,
    status,
)
from metaemu.testing.fake_kubernetes_tokens import RecordedTokenRequest, TokenRequestHandler
from metaemu.testing.faults import FaultInjector
from metaemu.testing.inprocess import InProcessClient, get_header
from metaemu.transport import HttpRequest, HttpResponse, TransportFailure

AGENT_USER = "system:serviceaccount:kube-system:metaemu"
AGENT_TOKEN = "fake-kube-agent-token"
AGENT_PERMISSIONS = frozenset({"list pods", "watch pods", "get pods", "get serviceaccounts",
                               "create serviceaccounts/token", "get nodes", "patch nodes"})
#: Without ``timeoutSeconds`` the API server ends a watch after a random 30-60 min
#: (``--min-request-timeout`` 1800 s); the fake uses the lower bound.
DEFAULT_WATCH_TIMEOUT_S = 1800.0

Endpoint = Literal["list", "watch", "get", "token", "discovery", "node_get", "node_patch", "unknown"]
_NODE = re.compile(r"^/api/v1/nodes/(?P<name>[^/]+)$")
_TAINT_EFFECTS = frozenset({"NoSchedule", "PreferNoSchedule", "NoExecute"})
_NAMESPACED = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<resource>pods|serviceaccounts)"
                         r"(?:/(?P<name>[^/]+)(?P<token>/token)?)?$")
_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedCall:
    endpoint: str
    method: str
    path: str
    query: Mapping[str, str]
    #: The authenticated user name; None without (valid) credentials.
    user: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedNodePatch:
    node: str
    user: str
    operations: Any
    #: The fake's ``clock.time()`` when the patch was applied; None when it was refused.
    applied_at: float | None
    status: int


@dataclass(frozen=True, slots=True, kw_only=True)
class _Route:
    endpoint: Endpoint
    namespace: str | None = None
    resource: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Watch:
    sub: Subscription
    timeout_s: float
    url: str


class FakeKubernetes:
    """One event loop; objects may be changed between and during requests at any time."""

    def __init__(self, *, clock: Clock | None = None, issuer: FakeIssuer | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self.issuer = issuer or FakeIssuer(clock=self.clock)
        self.store = KubeStore()
        self.calls: Counter[str] = Counter()
        self.requests: list[RecordedCall] = []
        self._users: dict[str, tuple[str, set[str]]] = {AGENT_TOKEN: (AGENT_USER, set(AGENT_PERMISSIONS))}
        self._tokens = TokenRequestHandler(store=self.store, issuer=self.issuer, clock=self.clock)
        self._faults = FaultInjector()
        self._outage: Literal["refuse", "error"] | None = None
        self.nodes: dict[str, dict[str, Any]] = {}
        self.node_patches: list[RecordedNodePatch] = []

    @property
    def token_requests(self) -> list[RecordedTokenRequest]:
        return self._tokens.recorded

    @property
    def max_token_lifetime_s(self) -> int | None:
        return self._tokens.max_lifetime_s

    @max_token_lifetime_s.setter
    def max_token_lifetime_s(self, value: int | None) -> None:
        """Cap lifetimes of minted tokens, as ``--service-account-max-token-expiration`` does."""
        self._tokens.max_lifetime_s = value

    # -- users and RBAC ----------------------------------------------------------------------------

    def add_user(self, token: str, name: str, permissions: Collection[str] = AGENT_PERMISSIONS) -> None:
        self._users[token] = (name, set(permissions))

    def revoke(self, token: str, permission: str) -> None:
        self._users[token][1].discard(permission)

    def remove_user(self, token: str) -> None:
        """The token stops authenticating (expired or rotated away)."""
        self._users.pop(token, None)

    # -- objects -----------------------------------------------------------------------------------

    def add_service_account(self, namespace: str, name: str, *, annotations: Mapping[str, str] | None = None,
                            uid: str | None = None) -> dict[str, Any]:
        return self.store.put_service_account(service_account_object(namespace, name, annotations=annotations,
                                                                     uid=uid or str(uuid.uuid4())))

    def annotate_sa(self, namespace: str, name: str, key: str, value: str | None) -> None:
        """Set (or with None remove) an annotation on a service account."""
        obj = json.loads(json.dumps(self.store.service_accounts[(namespace, name)]))
        annotations = obj["metadata"].setdefault("annotations", {})
        if value is None:
            annotations.pop(key, None)
        else:
            annotations[key] = value
        self.store.put_service_account(obj)

    def delete_service_account(self, namespace: str, name: str) -> None:
        self.store.service_accounts.pop((namespace, name), None)

    def add_node(self, name: str, *, taints: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """Create (or replace) node ``name`` with ``taints`` (``{"key", "effect", "value"?}``)."""
        self.store.resource_version += 1
        spec: dict[str, Any] = {"taints": [dict(t) for t in taints]} if taints else {}
        self.nodes[name] = {"kind": "Node", "apiVersion": "v1", "spec": spec, "status": {},
                            "metadata": {"name": name, "uid": str(uuid.uuid4()), "labels": {},
                                         "resourceVersion": str(self.store.resource_version)}}
        return self.nodes[name]

    def node_taints(self, name: str) -> list[dict[str, Any]]:
        taints: list[dict[str, Any]] = self.nodes[name]["spec"].get("taints", [])
        return taints

    def add_pod(self, namespace: str, name: str, *, node: str, ips: Iterable[str] = (),
                service_account: str = "default", host_network: bool = False, phase: str = "Running",
                uid: str | None = None) -> dict[str, Any]:
        """Create a pod (and its node and service account when missing); returns the stored object."""
        if node not in self.nodes:
            self.add_node(node)
        if (namespace, service_account) not in self.store.service_accounts:
            self.add_service_account(namespace, service_account)
        return self.store.put_pod(pod_object(
            namespace, name, uid=uid or str(uuid.uuid4()), node=node, ips=list(ips), service_account=service_account,
            host_network=host_network, phase=phase, created=format_timestamp(self.clock.now())))

    def delete_pod(self, namespace: str, name: str, *, grace_period_s: int = 0) -> None:
        """Delete a pod. With a grace period only ``deletionTimestamp`` is set (the pod is
        terminating, still listed); delete again without one to remove it."""
        current = self.store.pods[(namespace, name)]
        if grace_period_s > 0 and not current["metadata"].get("deletionTimestamp"):
            when = self.clock.now() + dt.timedelta(seconds=grace_period_s)
            self._update_pod(namespace, name, lambda p: p["metadata"].update(
                deletionTimestamp=format_timestamp(when), deletionGracePeriodSeconds=grace_period_s))
            return
        self.store.delete_pod(namespace, name)

    def set_phase(self, namespace: str, name: str, phase: str) -> None:
        self._update_pod(namespace, name, lambda p: p["status"].update(phase=phase))

    def set_pod_ips(self, namespace: str, name: str, ips: Iterable[str]) -> None:
        addresses = list(ips)
        self._update_pod(namespace, name, lambda p: p.update(status=pod_status(p["status"]["phase"], addresses)))

    def _update_pod(self, namespace: str, name: str, change: Any) -> None:
        obj = json.loads(json.dumps(self.store.pods[(namespace, name)]))
        change(obj)
        self.store.put_pod(obj)

    def compact(self) -> None:
        self.store.compact()

    def bookmark(self) -> None:
        self.store.bookmark()

    def pause_watches(self) -> None:
        self.store.pause()

    def resume_watches(self) -> None:
        self.store.resume()

    # -- faults ------------------------------------------------------------------------------------

    def fail(self, endpoint: Endpoint, *, status_code: int, times: int = 1, body: Any = None) -> None:
        """Answer the next ``times`` calls to ``endpoint`` with ``status_code`` (a Status body by default)."""
        payload = body if body is not None else status(status_code, "InternalError", f"injected {status_code}")
        self._faults.queue(endpoint, HttpResponse(status=status_code, headers=_JSON, body=json.dumps(payload).encode()),
                           times=times)

    def stall(self, endpoint: Endpoint) -> asyncio.Event:
        return self._faults.stall(endpoint)

    def unstall(self, endpoint: Endpoint) -> None:
        self._faults.unstall(endpoint)

    def outage(self, mode: Literal["refuse", "error"] = "refuse") -> None:
        """The API server goes away: ``refuse`` drops connections (in process: ``TransportFailure``),
        ``error`` answers 503. Open watches break either way."""
        self._outage = mode
        self.store.end_watches(broken=True)

    def restore(self) -> None:
        self._outage = None
        self._faults.clear()

    # -- serving -----------------------------------------------------------------------------------

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Answer one request; a watch is answered once it ends (read whole)."""
        prepared = await self._prepare(request)
        if isinstance(prepared, HttpResponse):
            return prepared
        lines = [line async for line in self._watch_lines(prepared)]
        return HttpResponse(status=200, headers=_JSON, body=b"".join(line + b"\n" for line in lines))

    @contextlib.asynccontextmanager
    async def open(self, request: HttpRequest) -> AsyncIterator[LineStream]:
        """``HttpStreamClient.open``: a watch streams its events as they happen."""
        prepared = await self._prepare(request)
        lines = _body_lines(prepared.body) if isinstance(prepared, HttpResponse) else self._watch_lines(prepared)
        status_code = prepared.status if isinstance(prepared, HttpResponse) else 200
        try:
            yield LineStream(status=status_code, headers=_JSON, lines=lines)
        finally:
            await lines.aclose()

    def client(self, *, clock: Clock | None = None) -> FakeKubernetesClient:
        return FakeKubernetesClient(self, clock=clock)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._serve)
        return app

    def kubeconfig(self, path: Path, *, server: str, token: str = AGENT_TOKEN) -> Path:
        """Write a kubeconfig for ``server`` (e.g. the URL of ``app()`` on loopback)."""
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
               "clusters": [{"name": "fake", "cluster": {"server": server}}],
               "users": [{"name": "agent", "user": {"token": token}}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}]}
        path.write_text(yaml.safe_dump(doc))
        return path

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        http_request = HttpRequest(method=request.method, url=str(request.url), headers=dict(request.headers),
                                   body=await request.read())
        reply = web.StreamResponse()
        try:
            async with self.open(http_request) as stream:
                reply.set_status(stream.status)
                reply.headers.update(_JSON)
                await reply.prepare(request)
                async for line in stream.lines:
                    await reply.write(line + b"\n")
                await reply.write_eof()
        except TransportFailure:  # the fake is "down" or a watch broke: drop the connection
            if request.transport is not None:
                request.transport.close()
        return reply

    async def _prepare(self, request: HttpRequest) -> HttpResponse | _Watch:
        route = _route(request)
        query = dict(parse_qsl(urlsplit(request.url).query, keep_blank_values=True))
        user = self._authenticate(request)
        self.calls[route.endpoint] += 1
        self.requests.append(RecordedCall(endpoint=route.endpoint, method=request.method,
                                          path=urlsplit(request.url).path, query=query,
                                          user=user[0] if user else None))
        if self._outage == "refuse":
            raise TransportFailure(request.url, "connection refused")
        if self._outage == "error":
            return _reply(503, status(503, "ServiceUnavailable", "the server is unable to handle the request"))
        if route.endpoint == "discovery":
            return self._discovery(request)
        if user is None:
            return _reply(401, status(401, "Unauthorized", "Unauthorized"))
        injected = await self._faults.intercept(route.endpoint)
        if injected is not None:
            return injected
        return await self._dispatch(route, query, user, request)

    async def _dispatch(self, route: _Route, query: Mapping[str, str], user: tuple[str, set[str]],
                        request: HttpRequest) -> HttpResponse | _Watch:
        name, permissions = user
        verb = {"list": "list pods", "watch": "watch pods", "token": "create serviceaccounts/token",
                "node_patch": "patch nodes"}.get(route.endpoint, f"get {route.resource}")
        if route.endpoint == "unknown":
            return _reply(404, status(404, "NotFound", "the server could not find the requested resource"))
        if verb not in permissions:
            resource = verb.split(" ", 1)[1]
            return _reply(403, status(403, "Forbidden", f'{resource} is forbidden: User "{name}" cannot '
                                      f'{verb.split(" ")[0]} resource "{resource}"'))
        if route.endpoint == "token":
            code, body = self._tokens.create(user=name, namespace=route.namespace or "", service_account=route.name,
                                             body=request.body)
            return _reply(code, body)
        if route.endpoint == "get":
            return self._get(route)
        if route.endpoint == "node_get":
            node = self.nodes.get(route.name)
            return _reply(200, node) if node else _node_not_found(route.name)
        if route.endpoint == "node_patch":
            return self._patch_node(route.name, user=name, request=request)
        try:
            selector = FieldSelector.parse(query.get("fieldSelector", ""))
        except SelectorError as exc:
            return _reply(400, status(400, "BadRequest", str(exc)))
        if route.endpoint == "watch":
            sub = self.store.subscribe(selector, since=query.get("resourceVersion", ""),
                                       bookmarks=query.get("allowWatchBookmarks") == "true")
            timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT_S)
            return _Watch(sub=sub, timeout_s=timeout, url=request.url)
        items, rv = self.store.list_pods(selector, route.namespace)
        return _reply(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": rv},
                            "items": items})

    def _get(self, route: _Route) -> HttpResponse:
        objects = self.store.pods if route.resource == "pods" else self.store.service_accounts
        obj = objects.get((route.namespace or "", route.name))
        if obj is None:
            return _reply(404, status(404, "NotFound", f'{route.resource} "{route.name}" not found',
                                      name=route.name, kind=route.resource))
        return _reply(200, obj)

    def _patch_node(self, name: str, *, user: str, request: HttpRequest) -> HttpResponse:
        """An RFC 6902 JSON patch, applied whole or not at all, as the API server does: a failed
        ``test`` or a bad path is 422; the result must still be a valid node."""
        node = self.nodes.get(name)
        if node is None:
            return _node_not_found(name)
        media_type = (get_header(request, "Content-Type") or "").split(";")[0].strip()
        try:
            operations = json.loads(request.body)
        except ValueError:
            operations = None
        code, problem = 200, ""
        if media_type != "application/json-patch+json":  # the fake implements only this patch type
            code, problem = 415, f"the body of the request was in an unknown format - accepted media types " \
                                 f"include: application/json-patch+json (got {media_type!r})"
        elif not isinstance(operations, list):
            code, problem = 400, "the JSON patch is not a list of operations"
        else:
            try:
                patched = jsonpatch.apply_patch(node, operations)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                code, problem = 422, str(exc)
            else:
                problem = _node_problem(patched, node)
                code = 422 if problem else 200
        if code != 200:
            self.node_patches.append(RecordedNodePatch(node=name, user=user, operations=operations, applied_at=None,
                                                       status=code))
            reason = {400: "BadRequest", 415: "UnsupportedMediaType", 422: "Invalid"}[code]
            return _reply(code, status(code, reason, problem))
        self.store.resource_version += 1
        patched["metadata"]["resourceVersion"] = str(self.store.resource_version)
        self.nodes[name] = patched
        self.node_patches.append(RecordedNodePatch(node=name, user=user, operations=operations,
                                                   applied_at=self.clock.time(), status=200))
        return _reply(200, patched)

    def _discovery(self, request: HttpRequest) -> HttpResponse:
        if urlsplit(request.url).path == JWKS_PATH:
            return _reply(200, self.issuer.jwks())
        return _reply(200, self.issuer.discovery())

    def _authenticate(self, request: HttpRequest) -> tuple[str, set[str]] | None:
        scheme, _, token = (get_header(request, "Authorization") or "").partition(" ")
        return self._users.get(token) if scheme.lower() == "bearer" and token else None

    async def _watch_lines(self, watch: _Watch) -> AsyncGenerator[bytes, None]:
        expiry = asyncio.create_task(self._expire(watch), name="fake kube watch timeout")
        try:
            while (line := await watch.sub.queue.get()) is not None:
                if line == BROKEN:
                    raise TransportFailure(watch.url, "connection reset by peer")
                yield line
        finally:
            self.store.unsubscribe(watch.sub)
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry

    async def _expire(self, watch: _Watch) -> None:
        """End the watch after its ``timeoutSeconds`` on the fake's clock (a bookmark first when
        asked for, as the API server does when it closes a watch)."""
        await self.clock.sleep(watch.timeout_s)
        if watch.sub.bookmarks:
            watch.sub.queue.put_nowait(self.store.bookmark_line())
        watch.sub.queue.put_nowait(None)


class FakeKubernetesClient:
    """``HttpClient`` and ``HttpStreamClient`` bound to a ``FakeKubernetes`` in process. With a
    ``clock``, plain requests get ``InProcessClient``'s deadline on it."""

    def __init__(self, fake: FakeKubernetes, *, clock: Clock | None = None) -> None:
        self._fake = fake
        self._plain = InProcessClient(fake.handle, clock=clock)

    async def send(self, request: HttpRequest) -> HttpResponse:
        return await self._plain.send(request)

    def open(self, request: HttpRequest) -> contextlib.AbstractAsyncContextManager[LineStream]:
        return self._fake.open(request)


def _route(request: HttpRequest) -> _Route:
    path = urlsplit(request.url).path
    query = dict(parse_qsl(urlsplit(request.url).query))
    watching = query.get("watch") in ("1", "true")
    if request.method == "GET" and path in (DISCOVERY_PATH, JWKS_PATH):
        return _Route(endpoint="discovery")
    if (node := _NODE.match(path)) and request.method in ("GET", "PATCH"):
        return _Route(endpoint="node_get" if request.method == "GET" else "node_patch", resource="nodes",
                      name=node["name"])
    if request.method == "GET" and path == "/api/v1/pods":
        return _Route(endpoint="watch" if watching else "list", resource="pods")
    match = _NAMESPACED.match(path)
    if match is None:
        return _Route(endpoint="unknown")
    ns, resource, name, token = match["ns"], match["resource"], match["name"], match["token"]
    if request.method == "POST" and token and resource == "serviceaccounts":
        return _Route(endpoint="token", namespace=ns, resource=resource, name=name)
    if request.method == "GET" and not token and name:
        return _Route(endpoint="get", namespace=ns, resource=resource, name=name)
    if request.method == "GET" and not name and resource == "pods":
        return _Route(endpoint="watch" if watching else "list", namespace=ns, resource=resource)
    return _Route(endpoint="unknown")


def _node_not_found(name: str) -> HttpResponse:
    return _reply(404, status(404, "NotFound", f'nodes "{name}" not found', name=name, kind="nodes"))


def _node_problem(patched: Any, old: Mapping[str, Any]) -> str:
    """What the API server's validation would reject in a patched node ('' when valid)."""
    meta = patched.get("metadata") if isinstance(patched, dict) else None
    if not isinstance(meta, dict) or (meta.get("name"), meta.get("uid")) != (old["metadata"]["name"],
                                                                              old["metadata"]["uid"]):
        return "metadata.name and metadata.uid are immutable"
    taints = patched.get("spec", {}).get("taints", [])
    if not isinstance(taints, list):
        return "spec.taints must be a list"
    for i, taint in enumerate(taints):
        if not isinstance(taint, dict) or not taint.get("key") or taint.get("effect") not in _TAINT_EFFECTS:
            return f"spec.taints[{i}]: a taint needs a key and an effect of {sorted(_TAINT_EFFECTS)}"
    return ""


def _reply(code: int, body: Any) -> HttpResponse:
    return HttpResponse(status=code, headers=_JSON, body=json.dumps(body).encode())


async def _body_lines(body: bytes) -> AsyncGenerator[bytes, None]:
    for line in body.splitlines():
        if line.strip():
            yield line
