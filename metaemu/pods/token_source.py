"""``PodTokenSource``: the node-mode ``SubjectTokenSource`` for one Kubernetes service account.

Each ``fetch`` makes a TokenRequest (upstream.md §6) for the service account with ``audiences`` =
exactly the Workload Identity provider, ``expirationSeconds`` = the configured lifetime, and
``boundObjectRef`` = a running pod of that service account on this node (SEC-25): the pod that last
called (``prefer``) while it is still a candidate, else any other. With no such pod left it fails,
so a refresh loop stops keeping the account warm (issue #4). The minted token must name the
service-account UID the cache key was built for (SEC-26: a deleted and recreated service account of
the same name is a different identity). The token goes to STS only; it is never served (SEC-25).

Not owned here: caching and refresh (``metaemu.cache``), the STS exchange (``metaemu.credentials``).
"""

from __future__ import annotations

from typing import Any

from metaemu.clock import Clock
from metaemu.credentials.tokens import JWT_TOKEN_TYPE, SubjectToken, unverified_claims
from metaemu.errors import ConfigError, SourceError
from metaemu.pods.identity import PodIdentity
from metaemu.pods.kube_client import MAX_EXPIRATION_S, MIN_EXPIRATION_S, KubeClient
from metaemu.pods.objects import PodRecord
from metaemu.pods.watch import PodIndex


class PodTokenSource:
    kind = "tokenrequest"

    def __init__(self, *, kube: KubeClient, index: PodIndex, identity: PodIdentity, audience: str,
                 expiration_s: int, clock: Clock) -> None:
        if not MIN_EXPIRATION_S <= expiration_s <= MAX_EXPIRATION_S:
            raise ConfigError("node.token_expiration_seconds",
                              f"must be between {MIN_EXPIRATION_S} and {MAX_EXPIRATION_S} (TokenRequest limits)")
        if not audience:
            raise ConfigError("node.audience", "the Workload Identity provider audience is required")
        self._kube = kube
        self._index = index
        self._identity = identity
        self._preferred_uid = identity.pod_uid
        self._audience = audience
        self._expiration_s = expiration_s
        self._clock = clock

    def prefer(self, identity: PodIdentity) -> None:
        """Bind the next token to ``identity``'s pod (the latest caller), if it is this account's."""
        if identity.pod_uid == self._preferred_uid:
            return  # already (the fast path's common case)
        if (identity.namespace, identity.ksa_name, identity.ksa_uid) == (
                self._identity.namespace, self._identity.ksa_name, self._identity.ksa_uid):
            self._preferred_uid = identity.pod_uid

    async def fetch(self) -> SubjectToken:
        """A fresh bound token; ``SourceError`` when no pod of the account runs here or the token
        names another service-account UID; ``UpstreamError`` when the API refuses."""
        pod = self._bound_pod()
        token = await self._kube.create_token(
            namespace=self._identity.namespace, service_account=self._identity.ksa_name, audience=self._audience,
            pod_name=pod.name, pod_uid=pod.uid, expiration_s=self._expiration_s)
        if _service_account_uid(token.value) not in (None, self._identity.ksa_uid):
            raise SourceError("the Kubernetes service account was recreated; its new identity needs a new token",
                              permanent=True)
        if token.expiry <= self._clock.now():
            raise SourceError("the Kubernetes API returned an already expired token")
        return SubjectToken(value=token.value, token_type=JWT_TOKEN_TYPE, expiry=token.expiry)

    def _bound_pod(self) -> PodRecord:
        running = self._index.pods_of_service_account(self._identity.namespace, self._identity.ksa_name)
        for pod in running:
            if pod.uid == self._preferred_uid:
                return pod
        if running:
            return running[0]
        raise SourceError(f"no running pod of service account {self._identity.namespace}/{self._identity.ksa_name} "
                          "on this node to bind a token to")


def _service_account_uid(token: str) -> str | None:
    """``kubernetes.io.serviceaccount.uid`` of a bound token, None when the token does not say."""
    try:
        claims: dict[str, Any] = unverified_claims(token)
    except ValueError:
        return None
    private = claims.get("kubernetes.io")
    account = private.get("serviceaccount") if isinstance(private, dict) else None
    uid = account.get("uid") if isinstance(account, dict) else None
    return uid if isinstance(uid, str) else None
