"""The two error envelopes Google's token services answer with, built as ``HttpResponse`` values.

- STS speaks RFC 6749 §5.2: ``{"error": "...", "error_description": "..."}`` (upstream.md §1.3).
- IAM Credentials (and any Google front end, including STS on 5xx) speaks AIP-193:
  ``{"error": {"code", "message", "status", "details"}}`` (upstream.md §2.2).

Owned here: the shapes and Google's wording. Not owned: when to send which (the STS and IAM
stand-ins decide).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from metaemu.transport import HttpResponse

#: Google front ends label JSON as UTF-8 explicitly.
JSON_CONTENT_TYPE = "application/json; charset=UTF-8"

#: HTTP status -> google.rpc.Code name (AIP-193, https://google.aip.dev/193#http11json-representation).
RPC_STATUS_NAMES: Mapping[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

#: Google's stock message per status, used when a stand-in has nothing more specific to say.
_STOCK_MESSAGES: Mapping[int, str] = {
    400: "Request contains an invalid argument.",
    401: "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
         "or other valid authentication credential. See "
         "https://developers.google.com/identity/sign-in/web/devconsole-project.",
    403: "The caller does not have permission",
    404: "Requested entity was not found.",
    429: "Quota exceeded for quota metric 'Requests' and limit 'Requests per minute'.",
    500: "Internal error encountered.",
    503: "The service is currently unavailable.",
    504: "The request timed out.",
}

ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"


def json_response(status: int, payload: Any, *, headers: Mapping[str, str] | None = None) -> HttpResponse:
    return HttpResponse(status=status, headers={"Content-Type": JSON_CONTENT_TYPE, **(headers or {})},
                        body=json.dumps(payload).encode())


def oauth_error(error: str, description: str, *, status: int = 400) -> HttpResponse:
    """An RFC 6749 §5.2 error as Google STS sends it."""
    return json_response(status, {"error": error, "error_description": description})


def rpc_error_body(code: int, message: str | None = None, *,
                   details: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The AIP-193 body for HTTP status ``code``; ``message`` defaults to Google's stock text."""
    error: dict[str, Any] = {
        "code": code,
        "message": message if message is not None else _STOCK_MESSAGES.get(code, "Unknown error."),
        "status": RPC_STATUS_NAMES.get(code, "UNKNOWN"),
    }
    if details:
        error["details"] = [dict(d) for d in details]
    return {"error": error}


def rpc_error(code: int, message: str | None = None, *, details: Sequence[Mapping[str, Any]] = (),
              headers: Mapping[str, str] | None = None) -> HttpResponse:
    return json_response(code, rpc_error_body(code, message, details=details), headers=headers)


def error_info(reason: str, domain: str, metadata: Mapping[str, str]) -> dict[str, Any]:
    return {"@type": ERROR_INFO_TYPE, "reason": reason, "domain": domain, "metadata": dict(metadata)}


def invalid_argument(field: str, description: str) -> HttpResponse:
    """400 INVALID_ARGUMENT with the stock message; the specific reason goes in a BadRequest
    field violation, where Google puts it (the top-level message stays generic, upstream.md §2.2)."""
    violation = {"@type": BAD_REQUEST_TYPE, "fieldViolations": [{"field": field, "description": description}]}
    return rpc_error(400, details=[violation])


def invalid_json(message: str) -> HttpResponse:
    """400 for a body that is not the JSON the method takes (Google words these itself)."""
    return rpc_error(400, f"Invalid JSON payload received. {message}")


def permission_denied(permission: str) -> HttpResponse:
    """Exactly the IAM 403 of upstream.md §2.2 for ``permission``."""
    return rpc_error(
        403,
        f"Permission '{permission}' denied on resource (or it may not exist).",
        details=[error_info("IAM_PERMISSION_DENIED", "iam.googleapis.com", {"permission": permission})],
    )


def account_disabled() -> HttpResponse:
    """What IAM Credentials answers a permitted caller whose target (or delegate) account is
    disabled: 400 FAILED_PRECONDITION "Precondition check failed." [rep: the shape users report for
    disabled accounts; no capture in the public corpus pins it, so metaemu doctor also accepts any
    FAILED_PRECONDITION from IAM as "disabled"]."""
    error = {"code": 400, "message": "Precondition check failed.", "status": "FAILED_PRECONDITION"}
    return json_response(400, {"error": error})


def unauthenticated(reason: str, *, service: str, method: str) -> HttpResponse:
    """401 UNAUTHENTICATED; ``reason`` is Google's ErrorInfo reason (``CREDENTIALS_MISSING``,
    ``ACCESS_TOKEN_EXPIRED``, ``ACCESS_TOKEN_TYPE_UNSUPPORTED``)."""
    return rpc_error(
        401,
        details=[error_info(reason, "googleapis.com", {"service": service, "method": method})],
        headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
    )


def insufficient_scopes(*, service: str, method: str) -> HttpResponse:
    """403 for a token whose OAuth scopes do not cover the API."""
    return rpc_error(
        403,
        "Request had insufficient authentication scopes.",
        details=[error_info("ACCESS_TOKEN_SCOPE_INSUFFICIENT", "googleapis.com",
                            {"service": service, "method": method})],
        headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", '
                                     'error="insufficient_scope"'},
    )


def default_sts_error_body(status: int) -> dict[str, Any]:
    """What STS plausibly answers with ``status``: RFC 6749 for the 4xx it defines, else the
    front end's AIP-193 envelope (throttling and outages are answered before STS logic runs)."""
    oauth = {400: ("invalid_request", "The request is missing a required parameter or is malformed."),
             401: ("invalid_client", "Client authentication failed."),
             403: ("access_denied", "The caller does not have permission.")}
    if status in oauth:
        error, description = oauth[status]
        return {"error": error, "error_description": description}
    return rpc_error_body(status)
