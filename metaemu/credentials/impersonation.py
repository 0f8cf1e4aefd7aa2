"""IAM Credentials v1: generateAccessToken and generateIdToken for an impersonated service account
(upstream.md §2), directly or through a delegation chain. Owns request bodies, the chain's resource
names and response parsing; not caching or retries.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

from metaemu.clock import Clock
from metaemu.credentials.tokens import AccessToken, FederatedToken, IdentityToken, jwt_expiry
from metaemu.credentials.upstream import UpstreamCaller
from metaemu.errors import UpstreamError
from metaemu.transport import HttpRequest

#: Google ID tokens from generateIdToken last one hour (gce-metadata.md T-07, P4).
ID_TOKEN_LIFETIME_S = 3600
#: How IAM Credentials names a delegate: "projects/-/serviceAccounts/{ACCOUNT_EMAIL_OR_UNIQUEID}";
#: "the - wildcard character is required" (GenerateAccessTokenRequest.delegates, REST reference).
DELEGATE_PREFIX = "projects/-/serviceAccounts/"


@dataclass(frozen=True, slots=True, kw_only=True)
class Impersonation:
    """The account tokens are minted for and the delegation chain that reaches it: the caller's
    token must grant Token Creator on ``delegates[0]``, each delegate on the next, and the last
    on ``service_account`` (IAM checks every hop). ``delegates`` are emails or unique IDs."""

    service_account: str
    delegates: tuple[str, ...] = ()

    @property
    def delegate_names(self) -> list[str]:
        """The chain as IAM takes it. gcloud writes bare emails and google-auth forwards them as
        written; Go's impersonate package prefixes them, as the REST reference requires."""
        return [d if d.startswith(DELEGATE_PREFIX) else DELEGATE_PREFIX + d for d in self.delegates]


class IamCredentialsClient:
    def __init__(self, *, caller: UpstreamCaller, base_url: str, clock: Clock, timeout_s: float) -> None:
        self._caller = caller
        self._base_url = base_url.rstrip("/")
        self._clock = clock
        self._timeout_s = timeout_s

    def _url(self, email: str, method: str) -> str:
        return f"{self._base_url}/projects/-/serviceAccounts/{quote(email, safe='@')}:{method}"

    async def generate_access_token(
        self, *, email: str, bearer: FederatedToken, scopes: Sequence[str], lifetime_s: int,
        delegates: Sequence[str] = (),
    ) -> AccessToken:
        """``delegates``: the chain's resource names (``Impersonation.delegate_names``)."""
        url = self._url(email, "generateAccessToken")
        payload = {"delegates": list(delegates), "scope": list(scopes), "lifetime": f"{lifetime_s}s"}
        sent_at = self._clock.now()
        body = await self._caller.call_json(
            HttpRequest.json(url, payload, headers=_auth(bearer), timeout_s=self._timeout_s))
        token, expire_time = body.get("accessToken"), body.get("expireTime")
        expiry = _parse_rfc3339(expire_time) if isinstance(expire_time, str) else None
        if not isinstance(token, str) or not token or expiry is None:
            raise _malformed(url, "generateAccessToken response lacks accessToken or a valid expireTime")
        # Never overstate: trust Google's expireTime only up to what we asked for, measured from
        # our own clock before sending (guards against local clock skew, SEC-28).
        return AccessToken(value=token, expiry=min(expiry, sent_at + dt.timedelta(seconds=lifetime_s)))

    async def generate_id_token(
        self, *, email: str, bearer: FederatedToken, audience: str, include_email: bool,
        delegates: Sequence[str] = (),
    ) -> IdentityToken:
        url = self._url(email, "generateIdToken")
        payload = {"delegates": list(delegates), "audience": audience, "includeEmail": include_email}
        sent_at = self._clock.now()
        body = await self._caller.call_json(
            HttpRequest.json(url, payload, headers=_auth(bearer), timeout_s=self._timeout_s))
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise _malformed(url, "generateIdToken response lacks token")
        try:
            expiry = jwt_expiry(token)
        except ValueError as exc:
            raise _malformed(url, f"generateIdToken returned an unreadable JWT ({exc})") from None
        cap = sent_at + dt.timedelta(seconds=ID_TOKEN_LIFETIME_S)
        return IdentityToken(value=token, expiry=min(expiry, cap))


def _auth(bearer: FederatedToken) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {bearer.value}"}
    if bearer.quota_project:  # end-user credentials: APIs bill (and may require) a quota project
        headers["x-goog-user-project"] = bearer.quota_project
    return headers


def _malformed(url: str, message: str) -> UpstreamError:
    return UpstreamError(service="iam", url=url, status=200, body="(malformed)", retryable=True, message=message)


def _parse_rfc3339(text: str) -> dt.datetime | None:
    """RFC 3339 with or without fractional seconds (UP-06; google-auth accepts only whole seconds)."""
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)
