"""source -> Google STS -> optional impersonation, for one identity.

``Pipeline`` performs single exchanges and holds no state beyond its collaborators; caching,
single-flight and refresh scheduling live in ``metaemu.cache``. Scope rules (UP-02): when a service
account is impersonated the STS token is asked for the ``iam`` scope only and the caller's scopes go to
generateAccessToken; without one the STS token carries the configured scopes and is served as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from metaemu.credentials.impersonation import IamCredentialsClient, Impersonation
from metaemu.credentials.sources import FederatedTokenProvider, SubjectTokenSource
from metaemu.credentials.sts import StsClient
from metaemu.credentials.tokens import AccessToken, FederatedToken, IdentityToken
from metaemu.errors import NotConfiguredError

IAM_SCOPE = "https://www.googleapis.com/auth/iam"


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """Who the tokens are for: the WIF audience and the impersonated account, if any."""

    audience: str
    service_account: str | None
    default_scopes: tuple[str, ...]
    lifetime_s: int
    #: The delegation chain to ``service_account`` (emails; an impersonated_service_account file's).
    delegates: tuple[str, ...] = ()

    @property
    def chain(self) -> Impersonation | None:
        sa = self.service_account
        return Impersonation(service_account=sa, delegates=self.delegates) if sa is not None else None


class Pipeline:
    def __init__(self, *, identity: Identity, source: SubjectTokenSource, sts: StsClient,
                 iam: IamCredentialsClient) -> None:
        self.identity = identity
        self._source = source
        self._sts = sts
        self._iam = iam

    @property
    def impersonates(self) -> bool:
        return self.identity.service_account is not None

    async def federated_token(self) -> FederatedToken:
        """Read the subject token (fresh each time: it rotates) and exchange it at STS."""
        if isinstance(self._source, FederatedTokenProvider):  # already a Google token: no STS
            return await self._source.federated_token()
        subject = await self._source.fetch()
        scopes = (IAM_SCOPE,) if self.impersonates else self.identity.default_scopes
        return await self._sts.exchange(subject, audience=self.identity.audience, scopes=scopes)

    async def access_token(self, scopes: Sequence[str], *, federated: FederatedToken) -> AccessToken:
        """The token served on ``…/token``: impersonated when configured, else the federated token."""
        chain = self.identity.chain
        if chain is None:
            return AccessToken(value=federated.value, expiry=federated.expiry)
        return await self._iam.generate_access_token(
            email=chain.service_account, bearer=federated, scopes=scopes or self.identity.default_scopes,
            lifetime_s=self.identity.lifetime_s, delegates=chain.delegate_names)

    async def id_token(self, audience: str, *, include_email: bool, federated: FederatedToken) -> IdentityToken:
        chain = self.identity.chain
        if chain is None:
            raise NotConfiguredError(
                "Identity tokens need a Google service account to impersonate: set "
                "workload_identity.service_account (GKE-06: a federated principal has no ID token).")
        # The delegates apply to ID tokens too (GenerateIdTokenRequest.delegates), as to access tokens.
        return await self._iam.generate_id_token(email=chain.service_account, bearer=federated, audience=audience,
                                                 include_email=include_email, delegates=chain.delegate_names)
