"""Configuration of subject-token sources: the ``workload_identity.source`` mapping and the
``credential_source`` object of a Google ``external_account`` file.

Built-in kinds (``kubernetes``, ``file``) are parsed here; every other kind lives in its own module
(``SOURCE_MODULES``). ``parse_source`` / ``parse_credential_source`` raise ``ConfigError`` naming the
key. The factory that turns configurations into running sources is in ``sources/__init__.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol

from metaemu.credentials.tokens import (
    ACCESS_TOKEN_TYPE,
    AWS_TOKEN_TYPE,
    ID_TOKEN_TYPE,
    JWT_TOKEN_TYPE,
    MTLS_TOKEN_TYPE,
)
from metaemu.errors import ConfigError

_SUBJECT_TOKEN_TYPES = (JWT_TOKEN_TYPE, ID_TOKEN_TYPE, ACCESS_TOKEN_TYPE, AWS_TOKEN_TYPE,
                        "urn:ietf:params:oauth:token-type:saml2", MTLS_TOKEN_TYPE)


@dataclass(frozen=True, slots=True, kw_only=True)
class KubernetesSourceConfig:
    """A projected Kubernetes service-account token file, re-read at each refresh (kubelet
    rotates it at ~80 % of its lifetime, upstream.md §6)."""

    token_file: Path
    kind: Literal["kubernetes"] = "kubernetes"


@dataclass(frozen=True, slots=True, kw_only=True)
class FileSourceConfig:
    """``credential_source.file`` of an external_account configuration (AIP-4117)."""

    path: Path
    token_type: str
    format_type: Literal["text", "json"] = "text"
    field_name: str | None = None
    kind: Literal["file"] = "file"

    def __post_init__(self) -> None:
        if self.format_type == "json" and not self.field_name:
            raise ConfigError("credential_source.format.subject_token_field_name", "required with type json")


class SourceConfig(Protocol):
    """Any source kind's frozen configuration; ``kind`` selects the module that builds it."""

    @property
    def kind(self) -> str: ...


#: Source kinds implemented in their own module. Each module provides
#: ``parse_config(raw, *, prefix, base_dir) -> <its config>`` and ``build(config, context)``; modules
#: with external_account support also provide ``parse_credential_source(raw, *, token_type, prefix,
#: base_dir)``. Keeping kinds apart lets each evolve (and be tested) on its own.
SOURCE_MODULES: dict[str, str] = {
    "aws": "metaemu.credentials.sources.aws",
    "oidc": "metaemu.credentials.sources.oidc",
    "url": "metaemu.credentials.sources.external",
    "executable": "metaemu.credentials.sources.external",
    "google": "metaemu.credentials.sources.google",
}
#: external_account ``credential_source`` keys handled by a module (AIP-4117), tried in this order:
#: ``environment_id`` first, because an aws1 source also carries a ``url`` (its IMDS role endpoint).
CREDENTIAL_SOURCE_MODULES: dict[str, str] = {
    "environment_id": "metaemu.credentials.sources.aws",
    "url": "metaemu.credentials.sources.external",
    "executable": "metaemu.credentials.sources.external",
    # X.509 workload identity federation (issue #14). parse_credential_source looks for it before
    # ``file``, so a certificate next to a file or url is refused as ambiguous, as google-auth does.
    "certificate": "metaemu.credentials.sources.certificate",
}
_BUILTIN = ("kubernetes", "file")


def source_module(kind: str, key: str) -> ModuleType:
    """The module implementing ``kind``; ``ConfigError`` at ``key`` when this build lacks it."""
    name = SOURCE_MODULES.get(kind) or CREDENTIAL_SOURCE_MODULES.get(kind)
    if name is None:
        raise ConfigError(key, f"unknown source type {kind!r} (one of: {', '.join([*_BUILTIN, *SOURCE_MODULES])})")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise ConfigError(key, f"source type {kind!r} is not supported by this version of metaemu") from None


def parse_source(raw: Mapping[str, Any], *, prefix: str, base_dir: Path) -> SourceConfig:
    kind = raw.get("type")
    if kind == "kubernetes":
        _reject_unknown(prefix, raw, {"type", "token_file"})
        token_file = raw.get("token_file")
        if not isinstance(token_file, str) or not token_file:
            raise ConfigError(prefix + "token_file", "required: the projected service-account token path")
        return KubernetesSourceConfig(token_file=base_dir / token_file)
    if kind == "file":
        _reject_unknown(prefix, raw, {"type", "path", "format", "subject_token_field_name", "token_type"})
        path = raw.get("path")
        if not isinstance(path, str) or not path:
            raise ConfigError(prefix + "path", "required")
        token_type = _token_type(raw.get("token_type", JWT_TOKEN_TYPE), prefix + "token_type")
        fmt = raw.get("format", "text")
        if fmt not in ("text", "json"):
            raise ConfigError(prefix + "format", "must be 'text' or 'json'")
        field = raw.get("subject_token_field_name")
        return FileSourceConfig(path=base_dir / path, token_type=token_type, format_type=fmt,
                                field_name=str(field) if field else None)
    if kind is None:
        raise ConfigError(prefix + "type", f"required (one of: {', '.join([*_BUILTIN, *SOURCE_MODULES])})")
    if not isinstance(kind, str) or kind not in SOURCE_MODULES:
        raise ConfigError(prefix + "type", f"unknown source type {kind!r} "
                          f"(one of: {', '.join([*_BUILTIN, *SOURCE_MODULES])})")
    config: SourceConfig = source_module(kind, prefix + "type").parse_config(raw, prefix=prefix, base_dir=base_dir)
    return config


def parse_credential_source(
    raw: Any, *, subject_token_type: Any, prefix: str, base_dir: Path
) -> SourceConfig:
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip("."), "required: a JSON object")
    token_type = _token_type(subject_token_type, prefix.replace("credential_source.", "subject_token_type"))
    if "certificate" in raw:
        config: SourceConfig = source_module("certificate", prefix + "certificate").parse_credential_source(
            raw, token_type=token_type, prefix=prefix, base_dir=base_dir)
        return config
    if token_type == MTLS_TOKEN_TYPE:
        raise ConfigError(prefix.replace("credential_source.", "subject_token_type"),
                          f"{MTLS_TOKEN_TYPE} needs a credential_source.certificate")
    if "file" in raw:
        fmt = raw.get("format") or {}
        if not isinstance(fmt, dict):
            raise ConfigError(prefix + "format", "must be an object")
        fmt_type = fmt.get("type", "text")
        if fmt_type not in ("text", "json"):
            raise ConfigError(prefix + "format.type", "must be 'text' or 'json'")
        field = fmt.get("subject_token_field_name")
        if fmt_type == "json" and not field:
            raise ConfigError(prefix + "format.subject_token_field_name", "required with type json")
        return FileSourceConfig(path=base_dir / str(raw["file"]), token_type=token_type,
                                format_type=fmt_type, field_name=str(field) if field else None)
    for key in CREDENTIAL_SOURCE_MODULES:
        if key in raw:
            config = source_module(key, prefix + key).parse_credential_source(
                raw, token_type=token_type, prefix=prefix, base_dir=base_dir)
            return config
    raise ConfigError(prefix.rstrip("."), "expected one of: file, environment_id, url, executable, certificate")


def _token_type(value: Any, key: str) -> str:
    if value not in _SUBJECT_TOKEN_TYPES:
        raise ConfigError(key, f"unsupported subject token type {value!r}")
    return str(value)


def _reject_unknown(prefix: str, raw: Mapping[str, Any], known: set[str]) -> None:
    for k in raw:
        if k not in known:
            raise ConfigError(prefix + str(k), f"unknown key (known: {', '.join(sorted(known))})")
