"""The ``metaemu webhook`` HTTPS server: ``POST /mutate`` answers AdmissionReviews (``review``,
``injection``), ``GET /healthz`` and ``/readyz`` are kubelet's probes; background tasks write the
generated CA into the MutatingWebhookConfiguration (and re-check it) or reload cert-manager's files.

Every review is answered within ``REVIEW_DEADLINE_S``, before the API server's ``timeoutSeconds``
(10 in manifests/webhook), so a slow API read becomes a refusal that says so instead of the API
server's opaque timeout. A review that cannot be decided (an API read failing) is refused, never
allowed without injection: the pod asked for its identity, and an uninjected pod would run
without it (or, in the loopback variant, could reach the node's real metadata server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any

from aiohttp import web

from metaemu.clock import Clock, SystemClock
from metaemu.errors import ConfigError, UpstreamError
from metaemu.metrics import create_metrics
from metaemu.pods.kube_client import KubeConnection
from metaemu.transport import AiohttpClient, HttpClient
from metaemu.webhook import review as wire
from metaemu.webhook.certs import ServingContext, generate_certificate
from metaemu.webhook.injection import Injected, Refused, Untouched, decide, opt_in, pod_opted_out
from metaemu.webhook.jsonpatch import encode
from metaemu.webhook.kube import WebhookKubeClient, describe
from metaemu.webhook.pod_shape import parse_pod
from metaemu.webhook.settings import WebhookSettings

log = logging.getLogger("metaemu.webhook")

#: The API server waits timeoutSeconds (10 in manifests/webhook) for an answer; 8 s leaves it room
#: to receive a refusal that names the cause.
REVIEW_DEADLINE_S = 8.0
#: Each API read (two per review): the API server answers a get in milliseconds.
API_TIMEOUT_S = 3.0
#: AdmissionReview bodies carry the pod (etcd caps objects at 1.5 MiB) plus envelope.
MAX_BODY_BYTES = 4 << 20
#: How often the CA bundle is re-checked (a re-applied configuration may have dropped it) and the
#: serving files' modification times compared (cert-manager renews weeks before expiry).
RECHECK_S = 60.0
#: Backoff of a failed bundle write: 1 s doubling to 60 s (the configuration may not exist yet).
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 60.0

BUNDLE_WRITTEN = web.AppKey("bundle_written", asyncio.Event)


class WebhookServer:
    """Listens on ``settings.listen`` (port 0: see ``port``) until ``stop``."""

    def __init__(self, settings: WebhookSettings, *, env: Mapping[str, str], http: HttpClient | None = None,
                 clock: Clock | None = None) -> None:
        self.settings = settings
        self._clock = clock or SystemClock()
        connection = (KubeConnection.from_kubeconfig(settings.kubeconfig) if settings.kubeconfig
                      else KubeConnection.in_cluster(env))
        self._own_http: AiohttpClient | None = None
        if http is None:  # the API server's CA only (KubeConnection.ssl_context)
            http = self._own_http = AiohttpClient(ssl_context=connection.ssl_context())
        self._kube = WebhookKubeClient(connection=connection, http=http, clock=self._clock,
                                       metrics=create_metrics(), timeout_s=API_TIMEOUT_S)
        self._generated = (generate_certificate(settings.tls.generate, namespace=settings.namespace,
                                                now=self._clock.now()) if settings.tls.generate else None)
        if self._generated is not None:
            self.tls = ServingContext(self._generated.cert_file, self._generated.key_file)
        elif settings.tls.cert_file is not None and settings.tls.key_file is not None:
            self.tls = ServingContext(settings.tls.cert_file, settings.tls.key_file)
        else:
            raise ConfigError("tls", "cert_file and key_file are both required (or generate)")
        self.bundle_written = asyncio.Event()
        self._stop = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def ca_pem(self) -> bytes | None:
        return self._generated.ca_pem if self._generated else None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app[BUNDLE_WRITTEN] = self.bundle_written
        app.router.add_post("/mutate", self._mutate)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.cleanup_ctx.append(self._background)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.listen.host, self.settings.listen.port,
                           ssl_context=self.tls.context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])  # the bound port (listen may say 0)
        log.info("webhook serving", extra={"listen": f"{self.settings.listen.host}:{self.port}"})

    async def stop(self) -> None:
        self._stop.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._own_http is not None:
            await self._own_http.close()

    async def __aenter__(self) -> WebhookServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # -- background ----------------------------------------------------------------------------------

    async def _background(self, app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self._bundle_writer() if self._generated else self._certificate_reloader(),
                                   name="webhook-ca-bundle-writer" if self._generated else "webhook-cert-reloader")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _bundle_writer(self) -> None:
        """Keep the generated CA in the configuration's caBundle; readiness waits for the first write."""
        generated, generate = self._generated, self.settings.tls.generate
        if generated is None or generate is None:
            return
        name, backoff = generate.webhook_configuration, BACKOFF_FIRST_S
        while not self._stop.is_set():
            try:
                if await self._kube.ensure_ca_bundle(name, generated.ca_bundle):
                    log.info("caBundle written", extra={"webhook_configuration": name})
                self.bundle_written.set()
                backoff, pause = BACKOFF_FIRST_S, RECHECK_S
            except UpstreamError as exc:
                log.warning("cannot write caBundle", extra={"webhook_configuration": name, "status": exc.status,
                                                            "reason": describe(exc.body)})
                pause, backoff = backoff, min(backoff * 2, BACKOFF_MAX_S)
            await self._clock.sleep(pause, until=self._stop)

    async def _certificate_reloader(self) -> None:
        self.bundle_written.set()  # cert-manager's CA injector writes the bundle
        while not await self._clock.sleep(RECHECK_S, until=self._stop):
            try:
                if self.tls.reload_if_changed():
                    log.info("serving certificate reloaded")
            except (OSError, ValueError) as exc:  # a half-written Secret update: the old chain stays
                log.warning("cannot reload the serving certificate", extra={"reason": str(exc)})

    # -- handlers ------------------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if not self.bundle_written.is_set():
            return web.Response(status=503, text="the caBundle is not written yet\n")
        return web.Response(text="ok\n")

    async def _mutate(self, request: web.Request) -> web.Response:
        try:
            admission = wire.parse_review(await request.read())
        except wire.ReviewError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        try:
            answer = await asyncio.wait_for(self.review(admission), REVIEW_DEADLINE_S)
        except TimeoutError:
            answer = wire.refused(admission.uid, f"metaemu: could not decide within {REVIEW_DEADLINE_S:g} s (the "
                                  "API server was slow to answer); retry", code=500)
        return web.json_response(answer)

    async def review(self, admission: wire.AdmissionRequest) -> dict[str, Any]:
        """The AdmissionReview answer for one request (CREATE of a Pod; anything else is allowed)."""
        uid, namespace = admission.uid, admission.namespace
        if admission.kind != "Pod" or admission.operation != "CREATE":
            return wire.allowed(uid)
        try:
            pod = parse_pod(admission.object)
        except ValueError as exc:
            return wire.refused(uid, f"metaemu: cannot read the pod: {exc}", code=400)
        if pod_opted_out(pod):
            return wire.allowed(uid)
        try:
            ns = await self._kube.get_namespace(namespace)
            wanted = opt_in(pod, ns, own_namespace=self.settings.namespace)
            if wanted is not True:
                return wire.refused(uid, wanted.message) if isinstance(wanted, Refused) else wire.allowed(uid)
            account = await self._kube.get_google_account(namespace, pod.service_account,
                                                          annotation=self.settings.sidecar.service_account_annotation)
        except UpstreamError as exc:
            return wire.refused(uid, f"metaemu: cannot read the pod's namespace or service account "
                                f"{namespace}/{pod.service_account} (API status {exc.status}: {describe(exc.body)}); "
                                "the pod asked for injection and is not created without it", code=500)
        decision = decide(pod, ns, google_account=account, settings=self.settings.sidecar,
                          own_namespace=self.settings.namespace)
        log.info("admission", extra={"uid": uid, "namespace": namespace, "pod": pod.name,
                                     "decision": type(decision).__name__.lower(),
                                     "variant": getattr(decision, "variant", None)})
        if isinstance(decision, Refused):
            return wire.refused(uid, decision.message)
        if isinstance(decision, Untouched) or not decision.operations:
            return wire.allowed(uid)
        assert isinstance(decision, Injected)
        return wire.allowed(uid, patch=encode(decision.operations))
