"""``FakeOAuthUser``: Google's OAuth 2.0 token endpoint (``POST https://oauth2.googleapis.com/token``)
for the refresh-token grant that a gcloud ``authorized_user`` ADC file drives (RFC 6749 §6), the
authorization-code grant (§4.1.3) that ends ``gcloud auth application-default login``, so gcloud
itself can write ADC files against it (``CLOUDSDK_AUTH_TOKEN_HOST``), and the JWT-bearer grant
(RFC 7523) a service-account key signs (``service_account_key``): RS256 by the key named in ``kid``,
``iss`` the account, ``aud`` Google's token URL whatever the key's ``token_uri`` (google-auth signs
``_GOOGLE_OAUTH2_TOKEN_ENDPOINT``), at most an hour from ``iat`` to ``exp``, a ``scope``.

Owns OAuth clients (id and secret), users' logins (refresh tokens with the scopes consented) and
their revocation, pending authorization codes (single use, bound to a client), the checks Google
makes (grant type, client authentication in the body or HTTP Basic, refresh token or code,
requested scopes within the consented ones), Google's RFC 6749 error bodies, and fault injection.
PKCE is not verified: the ``code_challenge`` travels in the browser leg, which no test drives.
An access token it issues is registered with ``FakeGoogle`` as the caller ``user:EMAIL``, so IAM
Credentials accepts it from a user granted Token Creator (``google.grant(SA, "user:EMAIL")``) and
``FakeGoogle.token_info`` recognises it.

Not owned here: the browser leg and consent screen (a login is ``login()`` or
``authorization_code()``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from metaemu.clock import Clock
from metaemu.testing.fake_google import FakeGoogle
from metaemu.testing.fake_google_errors import json_response, oauth_error, rpc_error
from metaemu.testing.fake_google_tokens import new_rsa_key
from metaemu.testing.faults import FaultInjector
from metaemu.testing.inprocess import InProcessClient, get_header, handler_app
from metaemu.transport import HttpRequest, HttpResponse

TOKEN_PATH = "/token"
#: What ``gcloud auth application-default login`` asks the user to consent to.
GCLOUD_ADC_SCOPES = ("openid", "https://www.googleapis.com/auth/userinfo.email",
                     "https://www.googleapis.com/auth/cloud-platform",
                     "https://www.googleapis.com/auth/sqlservice.login")
#: Google user access tokens live one hour; the endpoint reports 3599 (the elapsed second).
ACCESS_TOKEN_LIFETIME_S = 3600
REPORTED_EXPIRES_IN_S = 3599
USER_TOKEN_PREFIX = "ya29.user-"
REVOKED = "Token has been expired or revoked."
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: The audience a key's assertion must name (google-auth's ``_GOOGLE_OAUTH2_TOKEN_ENDPOINT``).
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
#: Google refuses assertions that live longer than an hour ("must be a short-lived token").
MAX_ASSERTION_LIFETIME_S = 3600
#: Leeway on ``iat``/``exp``, as the fake STS's (``fake_google_jwt.CLOCK_SKEW_S``).
CLOCK_SKEW_S = 10
SHORT_LIVED = ("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
               "Check your iat and exp values in the JWT claim.")


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthClient:
    client_id: str
    client_secret: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Login:
    email: str
    client_id: str
    scopes: tuple[str, ...]


class FakeOAuthUser:
    """Google's token endpoint for refresh-token grants. Single event loop; registry changes are
    allowed between requests. ``calls`` counts token requests (``"token"``) and others."""

    def __init__(self, *, google: FakeGoogle, clock: Clock | None = None) -> None:
        self._google = google
        self.clock: Clock = clock or google.clock
        self.calls: Counter[str] = Counter()
        self.forms: list[Mapping[str, str]] = []
        self._clients: dict[str, OAuthClient] = {}
        self._logins: dict[str, _Login] = {}
        self._codes: dict[str, _Login] = {}
        self._keys: dict[tuple[str, str], rsa.RSAPublicKey] = {}
        self._faults = FaultInjector()

    # -- registry -------------------------------------------------------------------------------

    def add_client(self, client_id: str | None = None, *, secret: str | None = None) -> OAuthClient:
        client = OAuthClient(client_id=client_id or f"{secrets.randbelow(10**12)}-fake.apps.googleusercontent.com",
                             client_secret=secret or f"GOCSPX-{secrets.token_urlsafe(24)}")
        self._clients[client.client_id] = client
        return client

    def login(self, email: str, *, client: OAuthClient, scopes: Sequence[str] = GCLOUD_ADC_SCOPES) -> str:
        """What a completed consent yields: a refresh token for ``email`` through ``client``."""
        refresh_token = f"1//{secrets.token_urlsafe(48)}"
        self._logins[refresh_token] = _Login(email=email, client_id=client.client_id, scopes=tuple(scopes))
        return refresh_token

    def authorization_code(self, email: str, *, client: OAuthClient,
                           scopes: Sequence[str] = GCLOUD_ADC_SCOPES) -> str:
        """What the consent screen hands the user to paste into gcloud: one code for one login."""
        code = f"4/{secrets.token_urlsafe(32)}"
        self._codes[code] = _Login(email=email, client_id=client.client_id, scopes=tuple(scopes))
        return code

    def service_account_key(self, email: str, *, token_uri: str = GOOGLE_TOKEN_URI) -> dict[str, Any]:
        """A new key for ``email`` as ``gcloud iam service-accounts keys create`` writes it; this
        endpoint then accepts its assertions as the caller ``serviceAccount:EMAIL``."""
        key, key_id = new_rsa_key(), secrets.token_hex(20)
        self._keys[(email, key_id)] = key.public_key()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        return {"type": "service_account", "project_id": email.split("@")[-1].split(".")[0],
                "private_key_id": key_id, "private_key": pem, "client_email": email,
                "client_id": str(secrets.randbelow(10**21)), "token_uri": token_uri,
                "universe_domain": "googleapis.com"}

    def revoke(self, refresh_token: str) -> None:
        """As the user removing access (or an admin session-control policy): ``invalid_grant`` next."""
        self._logins.pop(refresh_token, None)

    @staticmethod
    def authorized_user_info(*, client: OAuthClient, refresh_token: str,
                             quota_project_id: str | None = None) -> dict[str, Any]:
        """An ADC file as ``gcloud auth application-default login`` writes it. It names no token
        endpoint: google-auth always uses https://oauth2.googleapis.com/token for a user login (and
        ignores a ``token_uri`` key), so a client reaches this stand-in only through its own
        endpoint override."""
        info: dict[str, Any] = {"account": "", "client_id": client.client_id, "client_secret": client.client_secret,
                                "refresh_token": refresh_token, "type": "authorized_user",
                                "universe_domain": "googleapis.com"}
        if quota_project_id:
            info["quota_project_id"] = quota_project_id
        return info

    # -- fault injection ------------------------------------------------------------------------

    def fail(self, *, status: int, body: Any = None, times: int = 1) -> None:
        """Answer the next ``times`` token requests with ``status`` (default body: RFC 6749)."""
        payload = body if body is not None else {"error": "internal_failure", "error_description": "Backend Error"}
        self._faults.queue("oauth", json_response(status, payload), times=times)

    def stall(self) -> asyncio.Event:
        return self._faults.stall("oauth")

    def unstall(self) -> None:
        self._faults.unstall("oauth")

    # -- serving --------------------------------------------------------------------------------

    async def handle(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST" or urlsplit(request.url).path != TOKEN_PATH:
            self.calls["unknown"] += 1
            return rpc_error(404, f"The requested URL {urlsplit(request.url).path} was not found.")
        self.calls["token"] += 1
        content_type = (get_header(request, "Content-Type") or "").split(";")[0].strip().lower()
        form = dict(parse_qsl(request.body.decode("utf-8", errors="replace"), keep_blank_values=True))
        self.forms.append(form)
        injected = await self._faults.intercept("oauth")
        if injected is not None:
            return injected
        if content_type != "application/x-www-form-urlencoded":
            return oauth_error("invalid_request", "Content type must be application/x-www-form-urlencoded.")
        grant = form.get("grant_type")
        if grant == JWT_BEARER_GRANT:
            return self._key_grant(form)
        if grant not in ("refresh_token", "authorization_code"):
            return oauth_error("unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type', '')}")
        client_id, client_secret = client_credentials(request, form)
        client = self._clients.get(client_id or "")
        if client is None:
            return oauth_error("invalid_client", "The OAuth client was not found.", status=401)
        if not secrets.compare_digest(client.client_secret, client_secret or ""):
            return oauth_error("invalid_client", "Unauthorized", status=401)
        if grant == "authorization_code":
            return self._redeem(form, client)
        if not form.get("refresh_token"):
            return oauth_error("invalid_request", "Missing required parameter: refresh_token")
        login = self._logins.get(form["refresh_token"])
        if login is None or login.client_id != client.client_id:
            return oauth_error("invalid_grant", REVOKED)
        requested = tuple(form["scope"].split()) if form.get("scope") else login.scopes
        extra = sorted(set(requested) - set(login.scopes))
        if extra:
            return oauth_error("invalid_scope", f"Some requested scopes were invalid. {{invalid={extra}}}")
        token = issue_user_token(self._google, email=login.email, scopes=requested,
                                 expiry=self.clock.now() + dt.timedelta(seconds=ACCESS_TOKEN_LIFETIME_S))
        # Google also returns an id_token when "openid" is consented; nothing here reads it.
        return json_response(200, {"access_token": token, "expires_in": REPORTED_EXPIRES_IN_S,
                                   "scope": " ".join(requested), "token_type": "Bearer"})

    def _key_grant(self, form: Mapping[str, str]) -> HttpResponse:
        """RFC 7523 §2.1 with Google's checks and words for a service-account key's assertion."""
        assertion = form.get("assertion", "")
        try:
            kid = str(jwt.get_unverified_header(assertion).get("kid"))
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return oauth_error("invalid_grant", "Invalid JWT Signature.")
        email = str(unverified.get("iss", ""))
        public = self._keys.get((email, kid))
        if public is None:
            return oauth_error("invalid_grant", "Invalid grant: account not found")
        try:
            claims = jwt.decode(assertion, public, algorithms=["RS256"], audience=GOOGLE_TOKEN_URI,
                                options={"verify_exp": False, "verify_iat": False})
        except jwt.InvalidAudienceError:
            return oauth_error("invalid_grant", f"Invalid JWT: Failed audience check. The right audience is "
                               f"{GOOGLE_TOKEN_URI}")
        except jwt.PyJWTError:
            return oauth_error("invalid_grant", "Invalid JWT Signature.")
        now, iat, exp = self.clock.now().timestamp(), claims.get("iat"), claims.get("exp")
        if (not isinstance(iat, int) or not isinstance(exp, int) or exp - iat > MAX_ASSERTION_LIFETIME_S
                or iat > now + CLOCK_SKEW_S or exp <= now - CLOCK_SKEW_S):
            return oauth_error("invalid_grant", SHORT_LIVED)
        scopes = tuple(str(claims.get("scope", "")).split())
        if not scopes:
            return oauth_error("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        token = self._google.issue_access_token(
            principal=f"serviceAccount:{email}", scopes=scopes, prefix="ya29.key-",
            expiry=self.clock.now() + dt.timedelta(seconds=ACCESS_TOKEN_LIFETIME_S))
        return json_response(200, {"access_token": token, "expires_in": REPORTED_EXPIRES_IN_S, "token_type": "Bearer"})

    def _redeem(self, form: Mapping[str, str], client: OAuthClient) -> HttpResponse:
        """RFC 6749 §4.1.3: a code from ``authorization_code`` (once, by its client) for a login."""
        for name in ("code", "redirect_uri"):
            if not form.get(name):
                return oauth_error("invalid_request", f"Missing required parameter: {name}")
        login = self._codes.pop(form["code"], None)
        if login is None or login.client_id != client.client_id:
            return oauth_error("invalid_grant", "Malformed auth code.")
        refresh_token = self.login(login.email, client=client, scopes=login.scopes)
        token = issue_user_token(self._google, email=login.email, scopes=login.scopes,
                                 expiry=self.clock.now() + dt.timedelta(seconds=ACCESS_TOKEN_LIFETIME_S))
        return json_response(200, {"access_token": token, "expires_in": REPORTED_EXPIRES_IN_S,
                                   "refresh_token": refresh_token, "scope": " ".join(login.scopes),
                                   "token_type": "Bearer"})

    def client(self) -> InProcessClient:
        return InProcessClient(self.handle)

    def app(self) -> web.Application:
        return handler_app(self.handle)


def issue_user_token(google: FakeGoogle, *, email: str, scopes: Sequence[str], expiry: dt.datetime) -> str:
    """Register a user access token with ``google`` so IAM sees the caller ``user:EMAIL``."""
    return google.issue_access_token(principal=f"user:{email}", scopes=scopes, expiry=expiry,
                                     prefix=USER_TOKEN_PREFIX)


def client_credentials(request: HttpRequest, form: Mapping[str, str]) -> tuple[str | None, str | None]:
    """client_secret_post (what google-auth sends) or client_secret_basic (RFC 6749 §2.3.1)."""
    scheme, _, encoded = (get_header(request, "Authorization") or "").partition(" ")
    if scheme.lower() == "basic" and encoded:
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, None
        return unquote(user), unquote(password)
    return form.get("client_id"), form.get("client_secret")

