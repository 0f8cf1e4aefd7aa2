"""``FakeWorkforceSts``: Google STS's OAuth endpoint for workforce identity federation logins,
``POST https://sts.googleapis.com/v1/oauthtoken`` (STS v1 ``oauthtoken``, ExchangeOauthToken).

An ``external_account_authorized_user`` ADC file (``gcloud auth application-default login
--login-config=FILE``) holds a refresh token this endpoint issued; google-auth refreshes it with
the form ``grant_type=refresh_token&refresh_token=…`` and the OAuth client (gcloud's) in HTTP Basic
(``google.oauth2.sts.Client.refresh_token``, ``ClientAuthType.basic``). gcloud's login ends with the
``authorization_code`` grant, its client again in Basic, plus ``code``, ``redirect_uri`` and a PKCE
``code_verifier`` (captured from gcloud 528).

Owns the OAuth clients, the workforce pools' providers, logins (refresh token -> provider, subject,
client, scopes) and pending authorization codes, the checks (form body, grant type, client
authentication, the refresh token or code and its client), RFC 6749 error bodies, the record of
forms, and revocation (``revoke_url``'s effect). An access token it issues is registered with
``FakeGoogle`` as the principal ``principal://iam.googleapis.com/locations/global/workforcePools/
POOL/subject/SUBJECT``, so IAM Credentials accepts it from a subject granted Token Creator.

Request and answer fields follow the ExchangeOauthToken request/response messages of the STS v1
discovery document (``clientId``, ``code``, ``codeVerifier``, ``grantType``, ``redirectUri``,
``refreshToken``, ``scope`` / ``access_token``, ``expires_in``, ``refresh_token``, ``scope``,
``token_type``). Google's exact error wording here was not captured; codes are RFC 6749's.
PKCE is not verified (the challenge travels in the browser leg, which no test drives).
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web

from metaemu.clock import Clock
from metaemu.errors import ConfigError
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_errors import json_response, oauth_error, rpc_error
from metaemu.testing.fake_oauth_user import OAuthClient, client_credentials
from metaemu.testing.inprocess import InProcessClient, get_header, handler_app
from metaemu.transport import HttpRequest, HttpResponse

TOKEN_PATH = "/v1/oauthtoken"
#: What gcloud asks a workforce login for (``config.CLOUDSDK_EXTERNAL_ACCOUNT_SCOPES``).
WORKFORCE_LOGIN_SCOPES = ("openid", "https://www.googleapis.com/auth/userinfo.email",
                          "https://www.googleapis.com/auth/cloud-platform",
                          "https://www.googleapis.com/auth/sqlservice.login")
#: STS access tokens live one hour and are reported as 3599 s (as the token-exchange answer, §1.2).
ACCESS_TOKEN_LIFETIME_S = 3600
REPORTED_EXPIRES_IN_S = 3599
WORKFORCE_TOKEN_PREFIX = "ya29.wf-"
_WORKFORCE_PROVIDER = re.compile(
    r"^//iam\.googleapis\.com/(?P<pool>locations/global/workforcePools/[^/]+)/providers/[^/]+$")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Login:
    audience: str
    subject: str
    client_id: str
    scopes: tuple[str, ...]


def workforce_principal(audience: str, subject: str) -> str:
    """The IAM principal of ``subject`` signed in through the workforce provider ``audience``."""
    match = _WORKFORCE_PROVIDER.match(audience)
    if match is None:
        raise ConfigError("audience", f"not a workforce pool provider: {audience!r}")
    return f"principal://iam.googleapis.com/{match['pool']}/subject/{subject}"


class FakeWorkforceSts:
    """The ``oauthtoken`` endpoint. Single event loop; the registry may change between requests.
    ``calls`` counts ``"oauthtoken"`` and ``"unknown"``; ``forms`` keeps every form received."""

    def __init__(self, *, google: FakeGoogle, clock: Clock | None = None) -> None:
        self._google = google
        self.clock: Clock = clock or google.clock
        self.calls: Counter[str] = Counter()
        self.forms: list[Mapping[str, str]] = []
        self.headers: list[Mapping[str, str]] = []
        self._clients: dict[str, OAuthClient] = {}
        self._logins: dict[str, _Login] = {}
        self._codes: dict[str, _Login] = {}

    # -- registry -------------------------------------------------------------------------------

    def add_client(self, client_id: str, *, secret: str) -> OAuthClient:
        client = OAuthClient(client_id=client_id, client_secret=secret)
        self._clients[client_id] = client
        return client

    def login(self, subject: str, *, audience: str, client: OAuthClient,
              scopes: Sequence[str] = WORKFORCE_LOGIN_SCOPES) -> str:
        """A completed workforce sign-in: the refresh token gcloud stores for ``subject``."""
        workforce_principal(audience, subject)  # validates the provider name
        refresh_token = f"wf-rt-{secrets.token_urlsafe(48)}"
        self._logins[refresh_token] = _Login(audience=audience, subject=subject, client_id=client.client_id,
                                             scopes=tuple(scopes))
        return refresh_token

    def authorization_code(self, subject: str, *, audience: str, client: OAuthClient) -> str:
        """What the workforce sign-in page hands the user to paste into gcloud (single use)."""
        workforce_principal(audience, subject)
        code = f"wf-code-{secrets.token_urlsafe(24)}"
        self._codes[code] = _Login(audience=audience, subject=subject, client_id=client.client_id,
                                   scopes=WORKFORCE_LOGIN_SCOPES)
        return code

    def revoke(self, refresh_token: str) -> None:
        """As ``revoke_url`` (or a session ending): the refresh token is dead from now on."""
        self._logins.pop(refresh_token, None)

    # -- serving --------------------------------------------------------------------------------

    async def handle(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST" or urlsplit(request.url).path != TOKEN_PATH:
            self.calls["unknown"] += 1
            return rpc_error(404, f"The requested URL {urlsplit(request.url).path} was not found.")
        self.calls["oauthtoken"] += 1
        form = dict(parse_qsl(request.body.decode("utf-8", errors="replace"), keep_blank_values=True))
        self.forms.append(form)
        self.headers.append(dict(request.headers))
        content_type = (get_header(request, "Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            return oauth_error("invalid_request", "Content type must be application/x-www-form-urlencoded.")
        grant = form.get("grant_type")
        if grant not in ("refresh_token", "authorization_code"):
            return oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant or ''}")
        client_id, client_secret = client_credentials(request, form)
        client = self._clients.get(client_id or "")
        if client is None or not secrets.compare_digest(client.client_secret, client_secret or ""):
            return oauth_error("invalid_client", "The OAuth client was not found or its secret is wrong.",
                               status=401)
        if grant == "authorization_code":
            return self._redeem(form, client)
        if not form.get("refresh_token"):
            return oauth_error("invalid_request", "Missing required parameter: refresh_token")
        login = self._logins.get(form["refresh_token"])
        if login is None or login.client_id != client.client_id:
            return oauth_error("invalid_grant", "The refresh token is invalid, expired or revoked.")
        return json_response(200, {"access_token": self._issue(login), "expires_in": REPORTED_EXPIRES_IN_S,
                                   "token_type": "Bearer"})

    def _redeem(self, form: Mapping[str, str], client: OAuthClient) -> HttpResponse:
        for name in ("code", "redirect_uri", "code_verifier"):
            if not form.get(name):
                return oauth_error("invalid_request", f"Missing required parameter: {name}")
        login = self._codes.pop(form["code"], None)
        if login is None or login.client_id != client.client_id:
            return oauth_error("invalid_grant", "The authorization code is invalid or was already used.")
        refresh_token = self.login(login.subject, audience=login.audience, client=client, scopes=login.scopes)
        # No "scope" in the answer: gcloud then takes the requested scopes as granted.
        return json_response(200, {"access_token": self._issue(login), "expires_in": REPORTED_EXPIRES_IN_S,
                                   "refresh_token": refresh_token, "token_type": "Bearer"})

    def _issue(self, login: _Login) -> str:
        return self._google.issue_access_token(
            principal=workforce_principal(login.audience, login.subject), scopes=login.scopes,
            expiry=self.clock.now() + dt.timedelta(seconds=ACCESS_TOKEN_LIFETIME_S), prefix=WORKFORCE_TOKEN_PREFIX)

    def client(self) -> InProcessClient:
        return InProcessClient(self.handle)

    def app(self) -> web.Application:
        return handler_app(self.handle)
