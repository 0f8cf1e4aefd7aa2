"""Assembly of the two aiohttp applications from a ``Config``.

The metadata app serves the metadata API and owns the credential machinery and its background
task (``token_refresher``, started and stopped in a ``cleanup_ctx`` entry). The admin app serves
``/metrics``, ``/healthz`` and ``/readyz`` on a separate listener (SEC-32). No network I/O happens
while assembling; tests inject the ``HttpClient`` and ``Clock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from metaemu.cache.credentials import CachedCredentials
from metaemu.cache.refresher import Refresher
from metaemu.clock import Clock
from metaemu.config import Config, WorkloadIdentity
from metaemu.credentials.impersonation import IamCredentialsClient, Impersonation
from metaemu.credentials.pipeline import Identity, Pipeline
from metaemu.credentials.sources import DeclaresImpersonation, SourceContext, SubjectTokenSource, build_source
from metaemu.credentials.sts import StsClient
from metaemu.credentials.upstream import UpstreamCaller
from metaemu.errors import ConfigError
from metaemu.metrics import Metrics
from metaemu.pods.agent import NodeAgent
from metaemu.pods.kube_client import KubeConnection
from metaemu.pods.stream import KubeHttp, KubeTransport
from metaemu.server.context import RequestContext, SidecarContext
from metaemu.server.fast_path import FastAnswers
from metaemu.server.handlers import MetadataHandler
from metaemu.server.limits import RateLimiter
from metaemu.server.metadata_tree import build_tree, index_tree
from metaemu.server.passthrough import Passthrough
from metaemu.server.responses import Responder
from metaemu.server.rules import DEFAULT_ALLOWED_HOSTS, HostAllowList
from metaemu.transport import HttpClient

log = logging.getLogger(__name__)

#: aiohttp default is 1 MiB; metadata requests have no body, so refuse anything sizeable.
MAX_REQUEST_BODY = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class Components:
    config: Config
    metrics: Metrics
    contexts: SidecarContext | NodeAgent
    refresher: Refresher
    handler: MetadataHandler
    #: The protocol-level fast path's answers (issue #12); None when ``fast_path: false``.
    fast: FastAnswers | None = None
    #: node.passthrough's relay to the cloud's own metadata service (issue #11); None when off.
    passthrough: Passthrough | None = None

    @property
    def credentials(self) -> CachedCredentials:
        """Sidecar mode's one set of credentials."""
        static = self.contexts.static
        if static is None:
            raise AttributeError("node mode has per-pod credentials")
        return static.credentials


COMPONENTS = web.AppKey("components", Components)


def build_components(*, config: Config, clock: Clock, metrics: Metrics, http: HttpClient,
                     environ: Mapping[str, str] | None = None,
                     kube_transport: Callable[[KubeHttp], KubeTransport] | None = None) -> Components:
    timeout = config.endpoints.timeout_seconds
    sts = StsClient(caller=UpstreamCaller(http=http, metrics=metrics, backend="sts"), url=config.endpoints.sts,
                    clock=clock, timeout_s=timeout)
    iam = IamCredentialsClient(caller=UpstreamCaller(http=http, metrics=metrics, backend="iam"),
                               base_url=config.endpoints.iam_credentials, clock=clock, timeout_s=timeout)
    refresher = Refresher(clock=clock)
    contexts: SidecarContext | NodeAgent
    limiter, max_concurrent, passthrough = None, None, None
    responder = Responder(config.profile)
    if config.node is not None:
        node = config.node
        connection = (KubeConnection.from_kubeconfig(node.kubeconfig) if node.kubeconfig
                      else KubeConnection.in_cluster(os.environ if environ is None else environ))
        contexts = NodeAgent(config=config, clock=clock, metrics=metrics, refresher=refresher, sts=sts, iam=iam,
                             connection=connection, kube_transport=kube_transport)
        limiter = RateLimiter(rate_per_s=node.rate_limit_per_second, burst=node.rate_limit_burst, clock=clock)
        max_concurrent = node.max_concurrent_requests
        passthrough = Passthrough.from_config(node, responder)
    else:
        wi = config.workload_identity
        assert wi is not None
        source = build_source(wi.source, SourceContext(clock=clock, http=http, metrics=metrics, audience=wi.audience,
                                                       service_account=wi.service_account))
        chain = sidecar_impersonation(wi, source)
        pipeline = Pipeline(
            identity=Identity(audience=wi.audience, service_account=chain.service_account if chain else None,
                              delegates=chain.delegates if chain else (), default_scopes=wi.scopes,
                              lifetime_s=wi.token_lifetime_seconds),
            source=source, sts=sts, iam=iam)
        credentials = CachedCredentials(pipeline=pipeline, clock=clock, metrics=metrics, refresher=refresher)
        tree = build_tree(config, email=chain.service_account if chain else None)
        contexts = SidecarContext(RequestContext(index=index_tree(tree), credentials=credentials))
    listen = str(config.listen)
    hosts = HostAllowList([*DEFAULT_ALLOWED_HOSTS, *config.allowed_hosts, config.listen.host,
                           listen, listen.replace("0.0.0.0", "127.0.0.1")])
    handler = MetadataHandler(contexts=contexts, responder=responder, metrics=metrics, clock=clock,
                              hosts=hosts, limiter=limiter, max_concurrent=max_concurrent, passthrough=passthrough)
    fast = None
    if config.fast_path:
        fast = FastAnswers(static=contexts.static, callers=contexts if isinstance(contexts, NodeAgent) else None,
                           responder=handler.responder, metrics=metrics, clock=clock, hosts=hosts, limiter=limiter,
                           at_capacity=handler.at_capacity)
    return Components(config=config, metrics=metrics, contexts=contexts, refresher=refresher, handler=handler,
                      fast=fast, passthrough=passthrough)


def sidecar_impersonation(wi: WorkloadIdentity, source: SubjectTokenSource) -> Impersonation | None:
    """Whom sidecar mode impersonates: the chain the source's credentials name (an
    impersonated_service_account file, #14), else ``workload_identity.service_account``."""
    declared = source.impersonation() if isinstance(source, DeclaresImpersonation) else None
    if declared is None:
        return Impersonation(service_account=wi.service_account) if wi.service_account else None
    if wi.service_account not in (None, declared.service_account):
        raise ConfigError("workload_identity.service_account",
                          f"the credentials file already impersonates {declared.service_account}; "
                          "drop this setting (or make it the same account)")
    return declared


def create_metadata_app(components: Components) -> web.Application:
    """The metadata application: it owns the background tasks and the request factory, but routes
    nothing. Its listener hands every request straight to ``MetadataHandler``
    (``MetaemuServer._bind``), which applies every rule itself to the raw target: aiohttp's router
    would only repeat the handler's own dict lookup, answer ``Expect`` itself (echoing the value;
    a 500 when that is not UTF-8, found by the fuzz test) and give an authority-form (``CONNECT
    host:80``) or asterisk-form (``OPTIONS *``) target its own 404 page instead of our 405."""
    app = web.Application(client_max_size=MAX_REQUEST_BODY)
    app[COMPONENTS] = components
    app.cleanup_ctx.append(_token_refresher_ctx)
    if isinstance(components.contexts, NodeAgent):
        app.cleanup_ctx.append(components.contexts.agent_ctx)
    if components.passthrough is not None:
        app.cleanup_ctx.append(components.passthrough.session_ctx)
    return app


async def _token_refresher_ctx(app: web.Application) -> AsyncIterator[None]:
    """Runs ``token_refresher`` for the app's lifetime; the first token is fetched at once."""
    refresher = app[COMPONENTS].refresher
    task = asyncio.create_task(refresher.token_refresher(), name="token_refresher")
    try:
        yield
    finally:
        refresher.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
