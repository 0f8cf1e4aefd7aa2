"""What a response looks like in each profile: headers on every response and error bodies.

GCE (gce-metadata.md HD-01..HD-09, Appendix A): ``Server: Metadata Server for VM``, XSS/frame headers,
Google's HTML error pages. GKE (GKE-01, R-03, ERR-02): ``Server: GKE Metadata Server``, plain-text
errors. Both put ``Metadata-Flavor: Google`` and ``Server`` on every response (HD-01/HD-02; Node's
gcp-metadata rejects any response without the flavor header, GKE-09).
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from multidict import CIMultiDict

from metaemu.errors import CredentialError, UpstreamError

Profile = Literal["gce", "gke"]
TEXT = "application/text"
JSON = "application/json"  # HD-06: no charset parameter
_GCE_HTML = "text/html; charset=UTF-8"
_PLAIN = "text/plain; charset=utf-8"
#: Seconds a client is told to wait after a 503. Python, Go and Java retry 503 with their own
#: backoff (ERR-05); 2 s covers a cold exchange without making a recovered server look slow.
RETRY_AFTER_S = 2

_GCE_STYLE = (
    "*{margin:0;padding:0}html,code{font:15px/22px arial,sans-serif}html{background:#fff;color:#222;padding:15px}"
    "body{margin:7% auto 0;max-width:390px;min-height:180px;padding:30px 0 15px}* > body{background:url(//www.google"
    ".com/images/errors/robot.png) 100% 5px no-repeat;padding-right:205px}p{margin:11px 0 22px;overflow:hidden}ins{"
    "color:#777;text-decoration:none}a img{border:0}@media screen and (max-width:772px){body{background:none;margin-"
    "top:0;max-width:none;padding-right:0}}#logo{background:url(//www.google.com/images/branding/googlelogo/1x/goog"
    "lelogo_color_150x54dp.png) no-repeat;margin-left:-5px}@media only screen and (min-resolution:192dpi){#logo{bac"
    "kground:url(//www.google.com/images/branding/googlelogo/2x/googlelogo_color_150x54dp.png) no-repeat 0% 0%/100"
    "% 100%;-moz-border-image:url(//www.google.com/images/branding/googlelogo/2x/googlelogo_color_150x54dp.png) 0}}"
    "@media only screen and (-webkit-min-device-pixel-ratio:2){#logo{background:url(//www.google.com/images/brandi"
    "ng/googlelogo/2x/googlelogo_color_150x54dp.png) no-repeat;-webkit-background-size:100% 100%}}#logo{display:in"
    "line-block;height:54px;width:150px}"
)


def _gce_page(code: int, title: str, message: str) -> str:
    """Appendix A: Google's error page, byte-exact (404 = 1560 + len(path) bytes, ERR-01)."""
    return (
        "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n"
        '  <meta name=viewport content="initial-scale=1, minimum-scale=1, width=device-width">\n'
        f"  <title>Error {code} ({title})!!1</title>\n  <style>\n    {_GCE_STYLE}\n  </style>\n"
        "  <a href=//www.google.com/><span id=logo aria-label=Google></span></a>\n"
        f"  <p><b>{code}.</b> <ins>That\u2019s an error.</ins>\n  <p>{message}"
    )


class Responder:
    """Builds every response for one profile; headers are pre-built once."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        base = {"Metadata-Flavor": "Google"}
        if profile == "gce":
            base |= {"Server": "Metadata Server for VM", "X-XSS-Protection": "0", "X-Frame-Options": "SAMEORIGIN"}
        else:
            base |= {"Server": "GKE Metadata Server"}
        self._base = base
        self._ok_headers: dict[str, CIMultiDict[str]] = {}

    @property
    def base_headers(self) -> dict[str, str]:
        """The headers every response of this profile starts with, in order."""
        return dict(self._base)

    def ok(self, data: bytes, content_type: str, etag: str | None) -> web.Response:
        headers = self._ok_headers.get(content_type)
        if headers is None:
            headers = self._ok_headers[content_type] = CIMultiDict(self._base, **{"Content-Type": content_type})
        if etag is not None:
            headers = headers.copy()
            headers["ETag"] = etag
        return web.Response(body=data, headers=headers)  # aiohttp copies the headers it is given

    def text(self, status: int, text: str, *, extra: dict[str, str] | None = None,
             content_type: str = _PLAIN) -> web.Response:
        headers = CIMultiDict(self._base)
        headers["Content-Type"] = content_type
        if extra:
            headers.update(extra)
        return web.Response(status=status, body=text.encode(), headers=headers)

    def not_found(self, path: str) -> web.Response:
        if self.profile == "gce":  # ERR-01
            body = _gce_page(404, "Not Found", f"The requested URL <code>{_html(path)}</code> was not found on "
                             "this server.  <ins>That\u2019s all we know.</ins>\n")
            return self.text(404, body, content_type=_GCE_HTML)
        return self.text(404, "Not Found\n")  # ERR-02

    def missing_flavor(self, path: str) -> web.Response:
        if self.profile == "gce":  # R-02, Appendix A.2
            body = _gce_page(403, "Forbidden", f"Your client does not have permission to get URL <code>"
                             f"{_html(path)}</code> from this server. Missing Metadata-Flavor:Google header.  "
                             "<ins>That\u2019s all we know.</ins>")
            return self.text(403, body, content_type=_GCE_HTML, extra={"Connection": "close"})
        return self.text(403, 'GKE Metadata Server encountered an error: Missing required header '
                         '"Metadata-Flavor": "Google"\n', extra={"X-Content-Type-Options": "nosniff"})

    def redirect(self, location: str) -> web.Response:
        """R-08: 301 to the slashed directory, keeping the query string (R-09)."""
        return self.text(301, f"{location}\n", extra={"Location": location}, content_type=_GCE_HTML
                         if self.profile == "gce" else _PLAIN)


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def credential_error_text(exc: CredentialError, what: str) -> str:
    """The text body for a failed token request: short, token-free, actionable (ERR-05, ERR-06)."""
    if isinstance(exc, UpstreamError) and exc.permanent:
        hint = ""
        if exc.service == "iam" and exc.status == 403:
            hint = ("\nThis error could be caused by a missing IAM policy binding on the target IAM service "
                    "account (roles/iam.workloadIdentityUser for the federated principal), or, for a user "
                    "login or along a delegation chain, a missing roles/iam.serviceAccountTokenCreator "
                    "on the next service account in the chain.")
        elif exc.service == "sts":
            hint = ("\nCheck the workload identity pool provider: its issuer, allowed audiences and attribute "
                    "conditions must accept this workload's token.")
        return f"Unable to generate {what}; {exc.reason}{hint}\n"
    if exc.permanent:
        return f"Unable to generate {what}; {exc.reason}\n"
    return f"Unable to generate {what} right now; {exc.reason}. Retry shortly.\n"
