"""Request rules that run before routing: path normalisation, query parsing, Host allow-list and
the authority an absolute-form target names.

SECURITY: every spelling of a path is reduced to one canonical form *before* any decision is made
(security.md §1 lesson 4, SEC-19; aad-pod-identity CVE-2022-23551 was a backslash path that skipped a
handler). Percent-encoding is decoded once, backslashes become slashes, empty and ``.`` segments are
dropped and ``..`` is resolved without escaping the root. Case is *not* folded: keys are
case-sensitive, so ``/COMPUTEMETADATA/V1/`` is simply unknown (404) and reaches nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class CanonicalPath:
    path: str  # "/a/b" — never ends with "/" except the root "/"
    trailing_slash: bool

    @property
    def key(self) -> str:
        """The tree index key: directories end with ``/``."""
        return self.path if self.path == "/" else self.path + ("/" if self.trailing_slash else "")


def normalise_path(raw_path: str) -> CanonicalPath | None:
    """Canonicalise a raw request path; None when it holds control characters (answer 404)."""
    decoded = unquote(raw_path, errors="strict") if "%" in raw_path else raw_path
    if _CONTROL.search(decoded):
        return None
    decoded = decoded.replace("\\", "/")
    segments: list[str] = []
    for seg in decoded.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if segments:
                segments.pop()
            continue
        segments.append(seg)
    last = decoded.rsplit("/", 1)[-1]
    trailing = decoded.endswith("/") or last in (".", "..")
    return CanonicalPath(path="/" + "/".join(segments), trailing_slash=trailing and bool(segments))


def parse_query(query_string: str) -> dict[str, str]:
    """Query parameters, first occurrence wins; names exact, values decoded.

    Lenient about unencoded values (R-15): Node and gcloud send ``audience=https://x/y`` raw, which
    ``parse_qsl`` splits correctly because it only cuts at ``&`` and the first ``=``.
    """
    out: dict[str, str] = {}
    for name, value in parse_qsl(query_string, keep_blank_values=True):
        out.setdefault(name, value)
    return out


def is_true(value: str | None) -> bool:
    """R-13: boolean values compare case-insensitively (``True`` from Python samples)."""
    return value is not None and value.lower() in ("true", "1", "yes", "on")


#: Names clients use for the metadata server (H-02, H-03, H-04, H-05) plus loopback forms used with
#: GCE_METADATA_HOST overrides. SECURITY: checking Host defeats DNS rebinding from a browser on the
#: same machine (security.md §4 item 3, SEC-22); the real server does not check it, so every form a
#: real client sends is accepted and operators can add their own names.
DEFAULT_ALLOWED_HOSTS = (
    "169.254.169.254", "metadata.google.internal", "metadata.google.internal.", "metadata",
    "[::ffff:169.254.169.254]", "[::ffff:a9fe:a9fe]", "[fd20:ce::254]",
    "localhost", "127.0.0.1", "[::1]",
)


class HostAllowList:
    def __init__(self, hosts: Iterable[str]) -> None:
        self._hosts = frozenset(h.lower() for h in hosts)

    def allows(self, host_header: str | None) -> bool:
        if not host_header:
            return True  # HTTP/1.0 without Host: no browser sends this, so no rebinding risk
        host = host_header.strip().lower()
        if host in self._hosts:
            return True
        name, sep, port = host.rpartition(":")
        return bool(sep) and port.isdigit() and name in self._hosts


def request_authority(target: str, host_header: str | None) -> str | None:
    """The authority a request names, for the allow-list (SEC-22): the Host header for an
    origin-form target (``/...``); for an absolute-form one, its own authority, Host ignored, as
    RFC 9112 §3.2.2 requires (``GET http://other.host/computeMetadata/... HTTP/1.1``). None when
    the target names none that may be judged (another scheme, userinfo, an empty authority, any
    other form): the caller refuses it.
    """
    if target.startswith("/"):
        return host_header or ""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() != "http":
        return None
    authority = _AUTHORITY_END.split(rest, maxsplit=1)[0]
    if not authority or "@" in authority:
        return None
    return authority


_AUTHORITY_END = re.compile(r"[/?#]")
