"""Subject tokens read from a file: the Kubernetes projected service-account token, and
``credential_source.file`` of a Google external_account configuration (text or JSON format).

The file is re-read on every fetch because its writer (kubelet) rotates it in place. Reads run in a
worker thread so a slow volume never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

from metaemu.clock import Clock
from metaemu.credentials.sources.config import FileSourceConfig
from metaemu.credentials.tokens import ID_TOKEN_TYPE, JWT_TOKEN_TYPE, SubjectToken, jwt_expiry
from metaemu.errors import SourceError

#: A projected token file is ~1 KiB; anything far larger is not a token and is refused unread.
MAX_TOKEN_FILE_BYTES = 64 * 1024


class FileSource:
    def __init__(self, config: FileSourceConfig, *, clock: Clock, kind: str = "file") -> None:
        self._config = config
        self._clock = clock
        self.kind = kind

    @classmethod
    def kubernetes(cls, token_file: Path, *, clock: Clock) -> FileSource:
        return cls(FileSourceConfig(path=token_file, token_type=JWT_TOKEN_TYPE), clock=clock, kind="kubernetes")

    async def fetch(self) -> SubjectToken:
        path = self._config.path
        text = await asyncio.to_thread(read_bounded, path, what="subject token file")
        value = self._extract(text).strip()
        if not value:
            raise SourceError(f"subject token file {path} is empty")
        expiry: dt.datetime | None = None
        if self._config.token_type in (JWT_TOKEN_TYPE, ID_TOKEN_TYPE):
            expiry = live_jwt_expiry(value, now=self._clock.now(), path=path, what="subject token file")
        return SubjectToken(value=value, token_type=self._config.token_type, expiry=expiry)

    def _extract(self, text: str) -> str:
        if self._config.format_type == "text":
            return text
        field = self._config.field_name or ""
        try:
            data = json.loads(text)
        except ValueError:
            raise SourceError(f"subject token file {self._config.path} is not JSON") from None
        value = data.get(field) if isinstance(data, dict) else None
        if not isinstance(value, str):
            raise SourceError(f"subject token file {self._config.path} has no string field {field!r}")
        return value


def live_jwt_expiry(token: str, *, now: dt.datetime, path: Path, what: str) -> dt.datetime:
    """``exp`` of the JWT read from ``path``; ``SourceError`` naming the file (never the token) when
    it is not a JWT or has already expired, e.g. because kubelet stopped rotating the volume."""
    try:
        expiry = jwt_expiry(token)
    except ValueError as exc:
        raise SourceError(f"{what} {path} does not hold a JWT ({exc})") from None
    if expiry <= now:
        raise SourceError(f"the token in {path} expired at {expiry:%Y-%m-%dT%H:%M:%SZ}; "
                          "is the projected volume still being rotated?")
    return expiry


def read_bounded(path: Path, *, what: str, limit: int = MAX_TOKEN_FILE_BYTES) -> str:
    """The text of a small credential file (blocking: call it in a worker thread). ``SourceError``
    names the file and ``what`` it is, never its content; a file over ``limit`` bytes is refused."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise SourceError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise SourceError(f"cannot read {what} {path}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > limit:
        raise SourceError(f"{what} {path} is larger than {limit} bytes")
    return data.decode("utf-8", errors="replace")
