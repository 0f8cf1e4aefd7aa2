"""The ``url`` and ``executable`` subject-token sources: parity with the ``credential_source.url``
and ``credential_source.executable`` of a Google ``external_account`` configuration (AIP-4117).

Semantics follow google-auth (``identity_pool._UrlSupplier``, ``pluggable.Credentials``):

- ``url``: ``GET`` with the configured ``headers``; anything but 200 fails; the body is the token
  (``format.type: text``) or holds it under ``format.subject_token_field_name`` (``json``).
- ``executable``: runs only when ``GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1`` (read once, when
  the source is built); the command is split with ``shlex`` and run without a shell, with the
  ``GOOGLE_EXTERNAL_ACCOUNT_*`` variables added to metaemu's environment, stdout and stderr merged as
  google-auth does, and killed (with its process group) after ``timeout_millis`` (default 30000,
  5000-120000). Its versioned JSON response (``version`` ≤ 1, ``success``, ``token_type``,
  ``id_token`` / ``saml_response``, ``expiration_time``, or ``code`` + ``message``) is checked as
  google-auth checks it. With ``output_file``, a still-valid response cached there by the executable
  is used without running it; ``expiration_time`` is then required (Google's executable contract).

A malformed response is a permanent ``SourceError`` (403: fixing it needs a person); an unsuccessful
one, a timeout or a failed exit is transient (503, retried with backoff). Neither tokens nor
header values appear in reprs, logs or errors. Not owned here: ``credential_source.file``
(``file.py``) and ``environment_id: aws1`` (``aws.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shlex
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from metaemu.clock import Clock
from metaemu.credentials.tokens import ID_TOKEN_TYPE, JWT_TOKEN_TYPE, SubjectToken, jwt_expiry
from metaemu.errors import ConfigError, SourceError, UpstreamError
from metaemu.metrics import Metrics
from metaemu.transport import HttpClient, HttpRequest, HttpResponse, TransportFailure

if TYPE_CHECKING:
    from metaemu.credentials.sources import SourceContext

SAML2_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:saml2"
#: Subject-token types an executable may return (google-auth ``pluggable._parse_subject_token``).
EXECUTABLE_TOKEN_TYPES = (JWT_TOKEN_TYPE, ID_TOKEN_TYPE, SAML2_TOKEN_TYPE)
_URL_TOKEN_TYPES = (*EXECUTABLE_TOKEN_TYPES, "urn:ietf:params:oauth:token-type:access_token")
ALLOW_EXECUTABLES_ENV = "GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES"
#: google-auth ``pluggable.EXECUTABLE_TIMEOUT_MILLIS_DEFAULT`` / ``_LOWER_BOUND`` / ``_UPPER_BOUND``.
DEFAULT_TIMEOUT_MS = 30_000
MIN_TIMEOUT_MS, MAX_TIMEOUT_MS = 5_000, 120_000
#: google-auth ``pluggable.EXECUTABLE_SUPPORTED_MAX_VERSION``.
MAX_RESPONSE_VERSION = 1
#: An executable response is < 4 KiB; more is refused (and the process killed) to bound memory.
MAX_OUTPUT_BYTES = 1 << 20
#: Subject-token URLs are local (IMDS, a sidecar) and answer in milliseconds; bound a stall.
URL_TIMEOUT_S = 10.0
URL_BACKEND = "subject_token_url"
#: Shown instead of output that seems to carry a token (SECURITY: error text reaches clients).
_WITHHELD = "(output withheld: it appears to contain a token)"
_EXCERPT_CHARS = 300
_URL_KEYS = frozenset({"type", "url", "headers", "format", "subject_token_field_name", "token_type"})
_EXECUTABLE_KEYS = frozenset({"type", "command", "timeout_millis", "output_file", "token_type"})


@dataclass(frozen=True, slots=True, kw_only=True)
class UrlSourceConfig:
    url: str
    token_type: str
    #: Sent with every request; may carry credentials, so kept out of ``repr``.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    format_type: Literal["text", "json"] = "text"
    field_name: str | None = None
    kind: Literal["url"] = "url"

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError("url", "must be an http(s) URL")
        if self.format_type == "json" and not self.field_name:
            raise ConfigError("format.subject_token_field_name", "required with type json")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutableSourceConfig:
    command: str
    token_type: str
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    output_file: Path | None = None
    #: Passed as ``GOOGLE_EXTERNAL_ACCOUNT_IMPERSONATED_EMAIL`` when a service account is impersonated.
    impersonated_email: str | None = None
    kind: Literal["executable"] = "executable"
    argv: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        try:
            argv = tuple(shlex.split(self.command))
        except ValueError as exc:
            raise ConfigError("command", f"cannot be split into arguments: {exc}") from None
        if not argv:
            raise ConfigError("command", "required: the executable and its arguments")
        object.__setattr__(self, "argv", argv)  # derived once; the instance is frozen
        if isinstance(self.timeout_ms, bool) or not MIN_TIMEOUT_MS <= self.timeout_ms <= MAX_TIMEOUT_MS:
            raise ConfigError("timeout_millis", "Timeout must be between 5 and 120 seconds.")
        if self.token_type not in EXECUTABLE_TOKEN_TYPES:
            raise ConfigError("token_type", f"an executable returns one of {', '.join(EXECUTABLE_TOKEN_TYPES)}")


# ---------------------------------------------------------------- configuration

_C = TypeVar("_C", "UrlSourceConfig", "ExecutableSourceConfig")


def parse_config(raw: Mapping[str, Any], *, prefix: str, base_dir: Path) -> UrlSourceConfig | ExecutableSourceConfig:
    """``workload_identity.source`` with ``type: url`` or ``type: executable``."""
    kind = raw.get("type")
    known = _URL_KEYS if kind == "url" else _EXECUTABLE_KEYS
    for key in raw:
        if key not in known:
            raise ConfigError(prefix + str(key), f"unknown key (known: {', '.join(sorted(known))})")
    token_type = raw.get("token_type", JWT_TOKEN_TYPE)
    if kind == "url":
        fmt = raw.get("format", "text")
        if isinstance(fmt, str):  # the flat form the ``file`` source uses
            fmt = {"type": fmt, "subject_token_field_name": raw.get("subject_token_field_name")}
        return _url_config(raw, fmt, token_type=token_type, prefix=prefix)
    return _executable_config(raw, token_type=token_type, prefix=prefix, base_dir=base_dir)


def parse_credential_source(raw: Mapping[str, Any], *, token_type: str, prefix: str,
                            base_dir: Path) -> UrlSourceConfig | ExecutableSourceConfig:
    """``credential_source`` with ``url`` or ``executable`` (unknown keys ignored, as google-auth does)."""
    if "url" in raw:
        return _url_config(raw, raw.get("format") or {}, token_type=token_type, prefix=prefix)
    executable = raw.get("executable")
    if not isinstance(executable, dict):
        raise ConfigError(prefix + "executable", "must be an object with a 'command'")
    return _executable_config(executable, token_type=token_type, prefix=prefix + "executable.", base_dir=base_dir)


def _url_config(raw: Mapping[str, Any], fmt: Any, *, token_type: Any, prefix: str) -> UrlSourceConfig:
    if not isinstance(fmt, dict):
        raise ConfigError(prefix + "format", "must be an object")
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ConfigError(prefix + "headers", "must map header names to strings")
    if (fmt.get("type") or "text") not in ("text", "json"):
        raise ConfigError(prefix + "format.type", "must be 'text' or 'json'")
    format_type: Literal["text", "json"] = "json" if fmt.get("type") == "json" else "text"
    if token_type not in _URL_TOKEN_TYPES:
        raise ConfigError(prefix + "token_type", f"unsupported subject token type {token_type!r}")
    field_name = fmt.get("subject_token_field_name")
    return _prefixed(prefix, lambda: UrlSourceConfig(
        url=str(raw.get("url") or ""), token_type=token_type, headers={str(k): v for k, v in headers.items()},
        format_type=format_type, field_name=str(field_name) if field_name else None))


def _executable_config(raw: Mapping[str, Any], *, token_type: Any, prefix: str,
                       base_dir: Path) -> ExecutableSourceConfig:
    command, output_file = raw.get("command"), raw.get("output_file")
    if not isinstance(command, str):
        raise ConfigError(prefix + "command", "required: the executable and its arguments")
    if output_file is not None and (not isinstance(output_file, str) or not output_file):
        raise ConfigError(prefix + "output_file", "must be a path")
    timeout = raw.get("timeout_millis") or DEFAULT_TIMEOUT_MS  # 0 / null mean the default (google-auth)
    if isinstance(timeout, bool) or not isinstance(timeout, int):
        raise ConfigError(prefix + "timeout_millis", "must be an integer number of milliseconds")
    return _prefixed(prefix, lambda: ExecutableSourceConfig(
        command=command, token_type=str(token_type), timeout_ms=timeout,
        output_file=base_dir / output_file if output_file else None))


def _prefixed(prefix: str, make: Callable[[], _C]) -> _C:
    """``make()``, with the key of a ``ConfigError`` from ``__post_init__`` made a full dotted path."""
    try:
        return make()
    except ConfigError as exc:
        raise ConfigError(prefix + exc.key, exc.problem) from None


def build(config: UrlSourceConfig | ExecutableSourceConfig, context: SourceContext) -> UrlSource | ExecutableSource:
    """The running source. For ``executable``, the process environment is read here, once:
    ``ConfigError`` unless it allows executables (google-auth's opt-in)."""
    if isinstance(config, UrlSourceConfig):
        return UrlSource(config, clock=context.clock, http=context.http, metrics=context.metrics)
    if config.impersonated_email is None and context.service_account is not None:
        config = dataclasses.replace(config, impersonated_email=context.service_account)
    return ExecutableSource(config, clock=context.clock, audience=context.audience, environ=dict(os.environ))


# ---------------------------------------------------------------- url


class UrlSource:
    """Fetches the subject token from a URL on every call (google-auth does not cache it either)."""

    kind = "url"

    def __init__(self, config: UrlSourceConfig, *, clock: Clock, http: HttpClient, metrics: Metrics) -> None:
        self._config = config
        self._clock = clock
        self._http = http
        self._metrics = metrics

    def __repr__(self) -> str:  # SECURITY: headers may carry credentials
        return f"UrlSource(url={self._config.url!r}, format={self._config.format_type!r})"

    async def fetch(self) -> SubjectToken:
        """Raises ``UpstreamError`` (no answer, or not 200) or ``SourceError`` (no token in it)."""
        c = self._config
        response = await self._get(HttpRequest(method="GET", url=c.url, headers=dict(c.headers),
                                               timeout_s=URL_TIMEOUT_S))
        if response.status != 200:
            self._metrics.upstream_errors.labels(URL_BACKEND, str(response.status)).inc()
            raise UpstreamError(service=URL_BACKEND, url=c.url, status=response.status, body=response.decoded(),
                                retryable=response.status in (408, 429) or response.status >= 500,
                                message=f"Unable to retrieve Identity Pool subject token: "
                                        f"{_excerpt(response.body.decode('utf-8', errors='replace'))}")
        value = _token_from(response.body.decode("utf-8", errors="replace"), c, location=c.url).strip()
        return SubjectToken(value=value, token_type=c.token_type, expiry=_jwt_expiry(value, c.token_type,
                                                                                     c.url, self._clock))

    async def _get(self, request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        try:
            return await self._http.send(request)
        except TransportFailure as exc:
            self._metrics.upstream_errors.labels(URL_BACKEND, "0").inc()
            raise UpstreamError(service=URL_BACKEND, url=request.url, status=0, body=exc.detail, retryable=True,
                                message=exc.detail) from exc
        finally:
            self._metrics.upstream_duration.labels(URL_BACKEND).observe(time.perf_counter() - started)


def _token_from(content: str, config: UrlSourceConfig, *, location: str) -> str:
    """google-auth ``identity_pool._parse_token_data``."""
    token: Any = content
    if config.format_type == "json":
        try:
            token = json.loads(content)[config.field_name]
        except (KeyError, ValueError, TypeError):
            raise SourceError(f"Unable to parse subject_token from JSON file '{location}' using key "
                              f"'{config.field_name}'") from None
    if not isinstance(token, str) or not token.strip():
        raise SourceError(f"Missing subject_token in the credential_source response from {location}")
    return token


def _jwt_expiry(value: str, token_type: str, location: str, clock: Clock) -> dt.datetime | None:
    if token_type not in (JWT_TOKEN_TYPE, ID_TOKEN_TYPE):
        return None
    try:
        expiry = jwt_expiry(value)
    except ValueError as exc:
        raise SourceError(f"the subject token from {location} is not a JWT ({exc})") from None
    if expiry <= clock.now():
        raise SourceError(f"the subject token from {location} expired at {expiry:%Y-%m-%dT%H:%M:%SZ}")
    return expiry


# ---------------------------------------------------------------- executable


class ExecutableSource:
    """Runs the configured executable (or reuses its cached ``output_file`` response).

    One run at a time: concurrent ``fetch`` calls queue, and a queued call sees the output file a
    previous run left behind.
    """

    kind = "executable"

    def __init__(self, config: ExecutableSourceConfig, *, clock: Clock, audience: str,
                 environ: Mapping[str, str]) -> None:
        if environ.get(ALLOW_EXECUTABLES_ENV) != "1":
            raise ConfigError("workload_identity.source", f"Executables need to be explicitly allowed (set "
                              f"{ALLOW_EXECUTABLES_ENV} to '1') to run.")
        self._config = config
        self._clock = clock
        self._lock = asyncio.Lock()
        self._env = {**environ, **_injected_env(config, audience)}

    def __repr__(self) -> str:
        return f"ExecutableSource(command={self._config.argv[0]!r}, timeout_ms={self._config.timeout_ms})"

    async def fetch(self) -> SubjectToken:
        """Raises ``SourceError``: permanent for a malformed response, transient otherwise."""
        async with self._lock:
            if (cached := await self._from_output_file()) is not None:
                return cached
            output = await self._run()
            if not output.strip() and self._config.output_file is not None:
                output = await asyncio.to_thread(_read_text, self._config.output_file)
            try:
                response = json.loads(output)
            except ValueError:
                raise SourceError(f"executable {self._name} printed no JSON response: {_excerpt(output)}",
                                  permanent=True) from None
            return self._parse(response, from_cache=False)

    @property
    def _name(self) -> str:
        return Path(self._config.argv[0]).name

    async def _from_output_file(self) -> SubjectToken | None:
        """A still-valid cached response, or None (no file, not JSON, expired, unsuccessful, no
        ``expiration_time``). A malformed cached response raises, as in google-auth."""
        path = self._config.output_file
        if path is None:
            return None
        try:
            response = json.loads(await asyncio.to_thread(_read_text, path))
        except (SourceError, ValueError):
            return None
        try:
            token = self._parse(response, from_cache=True)
        except SourceError as exc:
            if exc.permanent:
                raise
            return None
        return token if isinstance(response, dict) and "expiration_time" in response else None

    def _parse(self, response: Any, *, from_cache: bool) -> SubjectToken:
        """google-auth ``pluggable._parse_subject_token``; ``permanent`` marks MalformedError cases."""
        where = f"executable {self._name}" + (f" (cached in {self._config.output_file})" if from_cache else "")

        def malformed(problem: str) -> SourceError:
            return SourceError(f"{where}: {problem}", permanent=True)

        if not isinstance(response, dict):
            raise malformed("the response is not a JSON object.")
        for key in ("version", "success"):
            if key not in response:
                raise malformed(f"The executable response is missing the {key} field.")
        version = response["version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise malformed(f"The executable response has a non-integer version {version!r}.")
        if version > MAX_RESPONSE_VERSION:
            raise SourceError(f"{where}: Executable returned unsupported version {version}.")
        if not response["success"]:
            if "code" not in response or "message" not in response:
                raise malformed("Error code and message fields are required in the response.")
            raise SourceError(f"{where}: Executable returned unsuccessful response: code: {response['code']}, "
                              f"message: {response['message']}.")
        expiration = response.get("expiration_time")
        if expiration is not None and (isinstance(expiration, bool) or not isinstance(expiration, int | float)):
            raise malformed(f"expiration_time must be seconds since the epoch, got {expiration!r}.")
        if expiration is not None and expiration < self._clock.time():
            raise SourceError(f"{where}: The token returned by the executable is expired.")
        if expiration is None and self._config.output_file is not None and not from_cache:
            raise malformed("The executable response must include expiration_time when an output_file is "
                            "configured.")
        token_type = response.get("token_type")
        if token_type is None:
            raise malformed("The executable response is missing the token_type field.")
        key = "saml_response" if token_type == SAML2_TOKEN_TYPE else "id_token"
        if token_type not in EXECUTABLE_TOKEN_TYPES:
            raise SourceError(f"{where}: Executable returned unsupported token type {token_type!r}.")
        value = response.get(key)
        if not isinstance(value, str) or not value:
            raise malformed(f"The executable response is missing the {key} field.")
        expiry = dt.datetime.fromtimestamp(expiration, dt.UTC) if expiration is not None else None
        if expiry is None and token_type != SAML2_TOKEN_TYPE:
            with contextlib.suppress(ValueError):
                expiry = jwt_expiry(value)
        return SubjectToken(value=value, token_type=self._config.token_type, expiry=expiry)

    async def _run(self) -> str:
        """The merged stdout/stderr of one successful run; ``SourceError`` on timeout or failure."""
        c = self._config
        try:
            process = await asyncio.create_subprocess_exec(
                *c.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=self._env,
                start_new_session=True)  # its own process group, so a timeout kills its children too
        except OSError as exc:
            raise SourceError(f"cannot run executable {c.argv[0]!r}: {exc.strerror or type(exc).__name__}") from None
        done = asyncio.Event()
        reader = asyncio.create_task(_read_output(process), name=f"executable source {self._name}")
        reader.add_done_callback(lambda _: done.set())
        try:
            if not await self._clock.sleep(c.timeout_ms / 1000, until=done):
                raise SourceError(f"executable {self._name} did not finish within {c.timeout_ms} ms and was killed")
            output = reader.result()
        finally:
            await _reap(process, reader)
        if process.returncode != 0:
            raise SourceError(f"executable {self._name} exited with code {process.returncode}: {_excerpt(output)}")
        return output


def _injected_env(config: ExecutableSourceConfig, audience: str) -> dict[str, str]:
    """google-auth ``pluggable._inject_env_variables`` (interactive mode is not supported)."""
    env = {"GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE": audience, "GOOGLE_EXTERNAL_ACCOUNT_TOKEN_TYPE": config.token_type,
           "GOOGLE_EXTERNAL_ACCOUNT_ID": config.impersonated_email or "",
           "GOOGLE_EXTERNAL_ACCOUNT_INTERACTIVE": "0", "GOOGLE_EXTERNAL_ACCOUNT_REVOKE": "0"}
    if config.impersonated_email:
        env["GOOGLE_EXTERNAL_ACCOUNT_IMPERSONATED_EMAIL"] = config.impersonated_email
    if config.output_file is not None:
        env["GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE"] = str(config.output_file)
    return env


async def _read_output(process: asyncio.subprocess.Process) -> str:
    """Everything the process prints until it exits; ``SourceError`` past ``MAX_OUTPUT_BYTES``."""
    stream = process.stdout
    data = bytearray()
    while stream is not None and (chunk := await stream.read(64 * 1024)):
        data += chunk
        if len(data) > MAX_OUTPUT_BYTES:
            raise SourceError(f"executable printed more than {MAX_OUTPUT_BYTES} bytes", permanent=True)
    await process.wait()
    return data.decode("utf-8", errors="replace")


async def _reap(process: asyncio.subprocess.Process, reader: asyncio.Task[str]) -> None:
    """Kill the process group if the process still runs, wait for it, and stop the reader."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # start_new_session: pgid == pid
        await process.wait()
    if not reader.done():
        reader.cancel()
    with contextlib.suppress(asyncio.CancelledError, SourceError):
        await reader


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_OUTPUT_BYTES + 1)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_OUTPUT_BYTES:
        raise SourceError(f"{path} is larger than {MAX_OUTPUT_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    if any(marker in text for marker in ("id_token", "saml_response", "access_token", "eyJ")):
        return _WITHHELD
    return (text[:_EXCERPT_CHARS] + "…") if len(text) > _EXCERPT_CHARS else (text or "(no output)")
