"""One place that sends a request to an upstream JSON API and turns every failure into an
``UpstreamError`` that keeps the service, URL, status and decoded body, while recording latency and
error metrics. Shared by the STS and IAM Credentials clients (and later sources).
"""

from __future__ import annotations

import time
from typing import Any

from metaemu.errors import UpstreamError
from metaemu.metrics import Metrics
from metaemu.transport import HttpClient, HttpRequest, HttpResponse, TransportFailure

#: HTTP statuses worth retrying soon: throttling, server errors, and 401 (our short-lived bearer may
#: have expired between mint and use; a fresh exchange fixes it).
_RETRYABLE = frozenset({401, 408, 429})


class UpstreamCaller:
    def __init__(self, *, http: HttpClient, metrics: Metrics, backend: str) -> None:
        self._http = http
        self._metrics = metrics
        self.backend = backend

    async def call_json(self, request: HttpRequest) -> dict[str, Any]:
        """Send ``request``; return the JSON object of a 2xx answer or raise ``UpstreamError``."""
        response = await self._send(request)
        decoded = response.decoded()
        if 200 <= response.status < 300:
            if isinstance(decoded, dict):
                return decoded
            self._metrics.upstream_errors.labels(self.backend, str(response.status)).inc()
            raise UpstreamError(service=self.backend, url=request.url, status=response.status,
                                body="(not a JSON object)", retryable=True,
                                message="response body is not a JSON object")
        self._metrics.upstream_errors.labels(self.backend, str(response.status)).inc()
        raise UpstreamError(service=self.backend, url=request.url, status=response.status, body=decoded,
                            retryable=response.status in _RETRYABLE or response.status >= 500)

    async def _send(self, request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        try:
            return await self._http.send(request)
        except TransportFailure as exc:
            self._metrics.upstream_errors.labels(self.backend, "0").inc()
            raise UpstreamError(service=self.backend, url=request.url, status=0, body=exc.detail,
                                retryable=True, message=exc.detail) from exc
        finally:
            self._metrics.upstream_duration.labels(self.backend).observe(time.perf_counter() - started)
