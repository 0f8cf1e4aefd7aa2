"""The ``admission.k8s.io/v1`` AdmissionReview wire format (kube-apiserver Admission (v1)
reference: https://kubernetes.io/docs/reference/config-api/apiserver-admission.v1/).

The API server POSTs ``{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
"request": {"uid", "kind", "resource", "operation", "namespace", "object", ...}}``; the answer is
the same envelope with ``response``: ``uid`` (the request's), ``allowed``, and either
``patchType: "JSONPatch"`` with ``patch`` (the base64 of an RFC 6902 document) or ``status``
(a ``metav1.Status``: ``code``, ``message``) when refused. Owns parsing (``ReviewError`` on
anything else, answered 400) and building those answers.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

API_VERSION = "admission.k8s.io/v1"


class ReviewError(ValueError):
    """The body is not an AdmissionReview request this webhook can answer."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionRequest:
    uid: str
    kind: str
    operation: str
    namespace: str
    #: The object as the API server would store it now (after earlier mutating webhooks).
    object: dict[str, Any]


def parse_review(body: bytes) -> AdmissionRequest:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise ReviewError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "AdmissionReview" or doc.get("apiVersion") != API_VERSION:
        raise ReviewError(f"expected an AdmissionReview of {API_VERSION} (admissionReviewVersions: [v1])")
    request = doc.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
        raise ReviewError("request.uid is missing")
    kind = request.get("kind")
    obj = request.get("object")
    return AdmissionRequest(
        uid=request["uid"],
        kind=str(kind.get("kind")) if isinstance(kind, dict) and not kind.get("group") else "",
        operation=str(request.get("operation") or ""),
        namespace=str(request.get("namespace") or ""),
        object=obj if isinstance(obj, dict) else {},
    )


def allowed(uid: str, *, patch: bytes | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch is not None:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(patch).decode("ascii")
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def refused(uid: str, message: str, *, code: int = 403) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview",
            "response": {"uid": uid, "allowed": False, "status": {"code": code, "message": message}}}
