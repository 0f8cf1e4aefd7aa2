"""``FakeIssuer``: an OIDC / Kubernetes service-account token issuer for tests and the demo.

Owns one RSA-2048 signing key with a ``kid``, RS256 token minting (generic OIDC and the exact
Kubernetes projected-token claim shape of upstream.md §6), the JWKS, and an aiohttp app serving
``/.well-known/openid-configuration`` and ``/openid/v1/jwks`` as a Kubernetes API server does.

Not owned here: verification (``fake_google_jwt`` plays Google STS) and the TokenRequest API
(a fake Kubernetes API server would call ``mint_kubernetes``).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from metaemu.clock import Clock, SystemClock
from metaemu.testing.fake_google_tokens import new_rsa_key, public_jwk

#: The in-cluster issuer of a default kube-apiserver (``--service-account-issuer``).
DEFAULT_ISSUER = "https://kubernetes.default.svc"
#: A kubelet-projected token's default lifetime (``expirationSeconds`` 3600, upstream.md §6).
DEFAULT_LIFETIME_S = 3600
JWKS_PATH = "/openid/v1/jwks"
DISCOVERY_PATH = "/.well-known/openid-configuration"


class FakeIssuer:
    """Mints RS256 JWTs and publishes the key that verifies them.

    ``issuer`` may be reassigned once a server has bound a port; tokens minted afterwards and the
    discovery document use the new value. Pass ``private_key`` to share one key between issuers
    (e.g. a second issuer with the same ``kid`` but another key, to forge signatures).
    """

    def __init__(self, *, issuer: str = DEFAULT_ISSUER, kid: str | None = None, clock: Clock | None = None,
                 private_key: rsa.RSAPrivateKey | None = None) -> None:
        self.issuer = issuer
        self.kid = kid or uuid.uuid4().hex
        self._clock: Clock = clock or SystemClock()
        self._key = private_key or new_rsa_key()

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        return self._key

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set (RFC 7517) that verifies this issuer's tokens."""
        return {"keys": [public_jwk(self._key, self.kid)]}

    def mint(self, *, sub: str, audience: str | Sequence[str], lifetime_s: float = DEFAULT_LIFETIME_S,
             now: dt.datetime | None = None, claims: Mapping[str, Any] | None = None,
             headers: Mapping[str, Any] | None = None) -> str:
        """An RS256 JWT with ``iss``, ``sub``, ``aud``, ``iat``, ``nbf``, ``exp`` and ``jti``.

        ``audience`` is kept as given (a string stays a string, a sequence becomes a list).
        ``claims`` and ``headers`` are merged last; a value of None removes that claim or header
        field, so a test can drop ``sub`` or ``kid`` (``headers={"kid": None}``).
        """
        issued = now or self._clock.now()
        iat = int(issued.timestamp())
        payload: dict[str, Any] = {
            "iss": self.issuer, "sub": sub,
            "aud": audience if isinstance(audience, str) else list(audience),
            "iat": iat, "nbf": iat, "exp": iat + int(lifetime_s), "jti": str(uuid.uuid4()),
        }
        payload = _merged(payload, claims)
        header = _merged({"kid": self.kid}, headers)
        if headers is not None and "typ" in headers and headers["typ"] is None:
            header["typ"] = None  # PyJWT adds "typ": "JWT" unless told None explicitly
        return jwt.encode(payload, self._key, algorithm="RS256", headers=header)

    def mint_kubernetes(self, *, namespace: str, service_account: str, audience: str | Sequence[str],
                        sa_uid: str | None = None, pod_name: str | None = None, pod_uid: str | None = None,
                        node_name: str | None = None, lifetime_s: float = DEFAULT_LIFETIME_S,
                        now: dt.datetime | None = None) -> str:
        """A bound service-account token with the claim shape of upstream.md §6.

        ``aud`` is always a list; ``sub`` is ``system:serviceaccount:NS:SA``; the ``kubernetes.io``
        object names the namespace, the service account and (when ``pod_name`` is given) the pod and,
        with ``node_name``, the node (KEP-4193). Header ``{"alg":"RS256","kid":…}`` without ``typ``.
        """
        private: dict[str, Any] = {
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": sa_uid or str(uuid.uuid4())},
        }
        if pod_name is not None:
            private["pod"] = {"name": pod_name, "uid": pod_uid or str(uuid.uuid4())}
            if node_name is not None:
                private["node"] = {"name": node_name, "uid": str(uuid.uuid4())}
        return self.mint(
            sub=f"system:serviceaccount:{namespace}:{service_account}",
            audience=[audience] if isinstance(audience, str) else list(audience),
            lifetime_s=lifetime_s, now=now, claims={"kubernetes.io": private},
            headers={"typ": None},  # kube-apiserver's tokens carry no "typ"
        )

    def discovery(self) -> dict[str, Any]:
        """The OIDC discovery document a kube-apiserver serves (KEP-1393)."""
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}{JWKS_PATH}",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def app(self) -> web.Application:
        async def discovery(_: web.Request) -> web.Response:
            return web.json_response(self.discovery())

        async def jwks(_: web.Request) -> web.Response:
            return web.json_response(self.jwks(), content_type="application/jwk-set+json")

        app = web.Application()
        app.router.add_get(DISCOVERY_PATH, discovery)
        app.router.add_get(JWKS_PATH, jwks)
        return app


def _merged(base: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``base`` updated by ``overrides``, dropping keys whose value is None."""
    merged = {**base, **(overrides or {})}
    return {k: v for k, v in merged.items() if v is not None}
