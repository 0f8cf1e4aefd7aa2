"""TokenRequest (``POST …/serviceaccounts/{name}/token``) for ``FakeKubernetes``, with the API
server's checks (upstream.md §6; ``ValidateTokenRequest`` and the token REST storage) and a record
of every request for assertions (SEC-25).

Statuses, as kube-apiserver answers them: unknown service account 404; malformed body 400;
``expirationSeconds`` < 600 or > 2^32, a ``boundObjectRef`` of another kind or version 422
``Invalid``; bound pod missing 404; bound pod UID differs 409 ``Conflict`` (deleted and recreated);
bound pod runs as another service account 400. One deliberate strictness: empty ``audiences`` (which
the real server defaults to its own audiences) is 422, since metaemu must always name one.

Tokens are minted by a ``FakeIssuer`` with the projected-token claim shape, ``aud`` = the requested
audiences, bound to the pod (and its node), for the requested lifetime (capped by ``max_lifetime_s``).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from metaemu.clock import Clock
from metaemu.pods.objects import format_timestamp
from metaemu.testing.fake_issuer import FakeIssuer
from metaemu.testing.fake_kubernetes_store import KubeStore, status

MIN_EXPIRATION_S = 600
MAX_EXPIRATION_S = 1 << 32
#: ``expirationSeconds`` when the request gives none (the API server's default).
DEFAULT_EXPIRATION_S = 3600


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedTokenRequest:
    """One TokenRequest as received, and the status it was answered with."""

    user: str
    namespace: str
    service_account: str
    audiences: tuple[str, ...] | None
    expiration_s: int | None
    bound_kind: str | None
    bound_name: str | None
    bound_uid: str | None
    status: int


class _Rejected(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class TokenRequestHandler:
    def __init__(self, *, store: KubeStore, issuer: FakeIssuer, clock: Clock) -> None:
        self._store = store
        self._issuer = issuer
        self._clock = clock
        self.recorded: list[RecordedTokenRequest] = []
        #: Like ``--service-account-max-token-expiration``: longer requests get this lifetime.
        self.max_lifetime_s: int | None = None

    def create(self, *, user: str, namespace: str, service_account: str, body: bytes) -> tuple[int, Any]:
        """(HTTP status, JSON body) for one TokenRequest by ``user`` (already authorised)."""
        spec: dict[str, Any] = {}
        try:
            payload = json.loads(body)
            raw_spec = payload.get("spec") if isinstance(payload, dict) else None
            spec = raw_spec if isinstance(raw_spec, dict) else {}
            code, answer = 201, self._mint(namespace, service_account, payload, spec)
        except ValueError:
            code, answer = 400, status(400, "BadRequest", "the request body is not a TokenRequest")
        except _Rejected as exc:
            code, answer = exc.code, status(exc.code, exc.reason, exc.message, name=service_account,
                                            group="authentication.k8s.io", kind="TokenRequest")
        self._record(user, namespace, service_account, spec, code)
        return code, answer

    def _mint(self, namespace: str, name: str, payload: Any, spec: dict[str, Any]) -> dict[str, Any]:
        account = self._store.service_accounts.get((namespace, name))
        if account is None:
            raise _Rejected(404, "NotFound", f'serviceaccounts "{name}" not found')
        if not isinstance(payload, dict) or payload.get("kind") != "TokenRequest":
            raise ValueError("not a TokenRequest")
        audiences = _audiences(spec)
        lifetime = _expiration(spec)
        pod = self._bound_pod(namespace, name, spec.get("boundObjectRef"))
        if self.max_lifetime_s is not None:
            lifetime = min(lifetime, self.max_lifetime_s)
        now = self._clock.now()
        token = self._issuer.mint_kubernetes(
            namespace=namespace, service_account=name, audience=audiences, sa_uid=account["metadata"]["uid"],
            pod_name=pod["metadata"]["name"] if pod else None, pod_uid=pod["metadata"]["uid"] if pod else None,
            node_name=pod["spec"].get("nodeName") if pod else None, lifetime_s=lifetime, now=now)
        return {**payload, "status": {"token": token,
                                      "expirationTimestamp": format_timestamp(now + dt.timedelta(seconds=lifetime))}}

    def _bound_pod(self, namespace: str, name: str, ref: Any) -> dict[str, Any] | None:
        if ref is None:
            return None
        if not isinstance(ref, dict) or ref.get("kind") != "Pod" or ref.get("apiVersion") != "v1":
            raise _Rejected(422, "Invalid", f'TokenRequest.authentication.k8s.io "{name}" is invalid: '
                            "spec.boundObjectRef.kind: Unsupported value (the fake binds to v1 Pods only)")
        pod = self._store.pods.get((namespace, str(ref.get("name"))))
        if pod is None:
            raise _Rejected(404, "NotFound", f'pods "{ref.get("name")}" not found')
        if ref.get("uid") and ref["uid"] != pod["metadata"]["uid"]:
            raise _Rejected(409, "Conflict", f"the UID in the bound object reference ({ref['uid']}) does not match "
                            "the UID in record. The object might have been deleted and then recreated")
        if pod["spec"].get("serviceAccountName") != name:
            raise _Rejected(400, "BadRequest", f'cannot bind token for serviceaccount "{name}" to pod running with '
                            "different serviceaccount name.")
        return pod

    def _record(self, user: str, namespace: str, name: str, spec: dict[str, Any], code: int) -> None:
        raw_ref = spec.get("boundObjectRef")
        ref: dict[str, Any] = raw_ref if isinstance(raw_ref, dict) else {}
        audiences = spec.get("audiences")
        expiration = spec.get("expirationSeconds")
        self.recorded.append(RecordedTokenRequest(
            user=user, namespace=namespace, service_account=name,
            audiences=tuple(str(a) for a in audiences) if isinstance(audiences, list) else None,
            expiration_s=expiration if isinstance(expiration, int) else None,
            bound_kind=ref.get("kind"), bound_name=ref.get("name"), bound_uid=ref.get("uid"), status=code))


def _audiences(spec: dict[str, Any]) -> list[str]:
    audiences = spec.get("audiences")
    if not isinstance(audiences, list) or not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise _Rejected(422, "Invalid", "spec.audiences: Required value: at least one audience is required "
                        "(the fake does not default to the API server's audiences)")
    return audiences


def _expiration(spec: dict[str, Any]) -> int:
    value = spec.get("expirationSeconds", DEFAULT_EXPIRATION_S)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Rejected(422, "Invalid", "spec.expirationSeconds: Invalid value: must be an integer")
    if value < MIN_EXPIRATION_S:
        raise _Rejected(422, "Invalid", f"spec.expirationSeconds: Invalid value: {value}: may not specify a duration "
                        "less than 10 minutes")
    if value > MAX_EXPIRATION_S:
        raise _Rejected(422, "Invalid", f"spec.expirationSeconds: Invalid value: {value}: may not specify a duration "
                        "larger than 2^32 seconds")
    return value
