"""``FakeStorage``: a sliver of the Google Cloud Storage JSON API, authenticated by ``FakeGoogle``.

Serves bucket metadata and object listings, which is enough for a workload (or google-cloud-storage)
to prove that the token it got from metaemu is accepted:

    GET /storage/v1/b/{bucket}        bucket resource
    GET /storage/v1/b/{bucket}/o      object list (``prefix`` honoured; ``items`` omitted when empty,
                                      as GCS does)

Each request must carry ``Authorization: Bearer <token>`` that ``FakeGoogle.token_info`` knows as
live and whose scopes cover Cloud Storage; otherwise GCS's JSON error (``{"error": {"code",
"message", "errors": [...]}}``, the storage v1 shape rather than AIP-193) is returned. Every
bearer token presented is appended to ``seen_tokens``. Not modelled: bucket IAM, uploads, paging.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from aiohttp import web

from metaemu.clock import Clock
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_errors import json_response
from metaemu.testing.inprocess import InProcessClient, get_header, handler_app
from metaemu.transport import HttpRequest, HttpResponse

#: OAuth scopes that grant read access to Cloud Storage (storage v1 discovery document).
STORAGE_READ_SCOPES = frozenset({
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/cloud-platform.read-only",
    "https://www.googleapis.com/auth/devstorage.read_only",
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/devstorage.full_control",
})

_PATH = re.compile(r"^/storage/v1/b/(?P<bucket>[^/]+)(?P<objects>/o)?/?$")


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredObject:
    name: str
    data: bytes = field(default=b"", repr=False)
    content_type: str = "application/octet-stream"
    generation: int
    created: dt.datetime


class FakeStorage:
    """Buckets of objects behind bearer-token authentication by ``google``."""

    def __init__(self, google: FakeGoogle, *, project_number: str = "123456789012") -> None:
        self._google = google
        self._clock: Clock = google.clock
        self._project_number = project_number
        self._buckets: dict[str, dict[str, StoredObject]] = {}
        self._created: dict[str, dt.datetime] = {}
        self._generation = int(self._clock.now().timestamp() * 1_000_000)
        self.seen_tokens: list[str] = []

    def add_bucket(self, name: str) -> None:
        self._buckets.setdefault(name, {})
        self._created.setdefault(name, self._clock.now())

    def add_object(self, bucket: str, name: str, data: bytes = b"", *,
                   content_type: str = "application/octet-stream") -> StoredObject:
        self.add_bucket(bucket)
        self._generation += 1  # GCS generations are unique, increasing microsecond stamps
        stored = StoredObject(name=name, data=data, content_type=content_type,
                              generation=self._generation, created=self._clock.now())
        self._buckets[bucket][name] = stored
        return stored

    async def handle(self, request: HttpRequest) -> HttpResponse:
        url = urlsplit(request.url)
        match = _PATH.match(url.path)
        if request.method != "GET" or match is None:
            return _gcs_error(404, "Not Found", "notFound")
        bucket = unquote(match["bucket"])
        permission = "storage.objects.list" if match["objects"] else "storage.buckets.get"
        refusal = self._authenticate(request, permission)
        if refusal is not None:
            return refusal
        if bucket not in self._buckets:
            return _gcs_error(404, "The specified bucket does not exist.", "notFound")
        base = f"{url.scheme}://{url.netloc}/storage/v1/b/{bucket}"
        if not match["objects"]:
            return json_response(200, self._bucket_resource(bucket, base))
        prefix = parse_qs(url.query).get("prefix", [""])[0]
        listing: dict[str, Any] = {"kind": "storage#objects"}
        items = [_object_resource(bucket, o, base) for n, o in sorted(self._buckets[bucket].items())
                 if n.startswith(prefix)]
        if items:
            listing["items"] = items
        return json_response(200, listing)

    def client(self) -> InProcessClient:
        return InProcessClient(self.handle)

    def app(self) -> web.Application:
        return handler_app(self.handle)

    def _authenticate(self, request: HttpRequest, permission: str) -> HttpResponse | None:
        scheme, _, token = (get_header(request, "Authorization") or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _gcs_error(401, f"Anonymous caller does not have {permission} access to the Google Cloud "
                              f"Storage bucket. Permission '{permission}' denied on resource (or it may not "
                              "exist).", "required", location="Authorization")
        self.seen_tokens.append(token)
        info = self._google.token_info(token)
        if info is None:
            return _gcs_error(401, "Invalid Credentials", "authError", location="Authorization")
        if not STORAGE_READ_SCOPES.intersection(info.scopes):
            return _gcs_error(403, "Provided scope(s) are not authorized", "forbidden")
        return None

    def _bucket_resource(self, bucket: str, self_link: str) -> dict[str, Any]:
        created = _timestamp(self._created[bucket])
        return {"kind": "storage#bucket", "selfLink": self_link, "id": bucket, "name": bucket,
                "projectNumber": self._project_number, "metageneration": "1", "location": "US",
                "storageClass": "STANDARD", "etag": "CAE=", "timeCreated": created, "updated": created,
                "locationType": "multi-region"}


def _object_resource(bucket: str, stored: StoredObject, base: str) -> dict[str, Any]:
    created = _timestamp(stored.created)
    md5 = base64.b64encode(hashlib.md5(stored.data, usedforsecurity=False).digest()).decode()
    return {"kind": "storage#object", "id": f"{bucket}/{stored.name}/{stored.generation}",
            "selfLink": f"{base}/o/{quote(stored.name, safe='')}", "name": stored.name, "bucket": bucket,
            "generation": str(stored.generation), "metageneration": "1", "contentType": stored.content_type,
            "storageClass": "STANDARD", "size": str(len(stored.data)), "md5Hash": md5,
            "etag": "CAE=", "timeCreated": created, "updated": created}


def _timestamp(when: dt.datetime) -> str:
    """RFC 3339 with milliseconds, as GCS writes ``timeCreated``."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _gcs_error(code: int, message: str, reason: str, *, location: str | None = None) -> HttpResponse:
    """The storage v1 JSON error: a legacy ``errors`` list rather than AIP-193 ``status``/``details``."""
    item: dict[str, Any] = {"message": message, "domain": "global", "reason": reason}
    if location is not None:
        item |= {"locationType": "header", "location": location}
    headers = {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'} if code == 401 else None
    return json_response(code, {"error": {"code": code, "message": message, "errors": [item]}}, headers=headers)
