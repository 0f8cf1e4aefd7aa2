"""Google STS v1 token exchange (RFC 8693; upstream.md §1).

Owns the request form and the parsing of success and RFC 6749 error bodies. Does not cache, retry
or choose scopes: the pipeline does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from metaemu.clock import Clock
from metaemu.credentials.tokens import ACCESS_TOKEN_TYPE, FederatedToken, SubjectToken
from metaemu.credentials.upstream import UpstreamCaller
from metaemu.errors import UpstreamError
from metaemu.transport import HttpRequest

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
#: STS omits expires_in when the subject token is itself a Google access token (upstream.md §1.2);
#: Google access tokens last one hour.
DEFAULT_EXPIRES_IN_S = 3600
#: STS tokens last at most 12 h (the longest Google access-token lifetime); anything beyond is garbage.
MAX_EXPIRES_IN_S = 12 * 3600


class StsClient:
    def __init__(self, *, caller: UpstreamCaller, url: str, clock: Clock, timeout_s: float) -> None:
        self._caller = caller
        self._url = url
        self._clock = clock
        self._timeout_s = timeout_s

    async def exchange(self, subject: SubjectToken, *, audience: str, scopes: Sequence[str]) -> FederatedToken:
        # Field order and set match what google-auth sends (UP-01); no Authorization header.
        form = {
            "grant_type": GRANT_TYPE,
            "audience": audience,
            "scope": " ".join(scopes),
            "requested_token_type": ACCESS_TOKEN_TYPE,
            "subject_token": subject.value,
            "subject_token_type": subject.token_type,
        }
        sent_at = self._clock.now()
        # An X.509 subject is only valid over mTLS with the same leaf (issue #14); no other kind sets it.
        request = HttpRequest.form(self._url, form, timeout_s=self._timeout_s,
                                   client_certificate=subject.client_certificate)
        body = await self._caller.call_json(request)
        token = body.get("access_token")
        expires_in = body.get("expires_in", DEFAULT_EXPIRES_IN_S)
        try:
            seconds = int(expires_in)  # an integer or a numeric string (UP-03)
        except (TypeError, ValueError, OverflowError):
            seconds = -1
        if not isinstance(token, str) or not token or not 0 < seconds <= MAX_EXPIRES_IN_S:
            raise UpstreamError(service="sts", url=self._url, status=200, body="(malformed)", retryable=True,
                                message="token response lacks access_token or a valid expires_in")
        return FederatedToken(value=token, expiry=sent_at + dt.timedelta(seconds=seconds))
