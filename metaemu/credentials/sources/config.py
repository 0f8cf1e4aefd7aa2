"""Configuration of subject-token sources: the ``workload_identity.source`` mapping and the
``credential_source`` object of a Google ``external_account`` file.

One frozen dataclass per kind; ``parse_source`` / ``parse_credential_source`` raise ``ConfigError``
naming the key. The factory that turns these into running sources is in ``sources/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from metaemu.credentials.tokens import ACCESS_TOKEN_TYPE, AWS_TOKEN_TYPE, ID_TOKEN_TYPE, JWT_TOKEN_TYPE
from metaemu.errors import ConfigError

_SUBJECT_TOKEN_TYPES = (JWT_TOKEN_TYPE, ID_TOKEN_TYPE, ACCESS_TOKEN_TYPE, AWS_TOKEN_TYPE,
                        "urn:ietf:params:oauth:token-type:saml2")


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


SourceConfig = KubernetesSourceConfig | FileSourceConfig


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
    known = "kubernetes, file"
    if kind is None:
        raise ConfigError(prefix + "type", f"required (one of: {known})")
    raise ConfigError(prefix + "type", f"unknown source type {kind!r} (one of: {known})")


def parse_credential_source(
    raw: Any, *, subject_token_type: Any, prefix: str, base_dir: Path
) -> SourceConfig:
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip("."), "required: a JSON object")
    token_type = _token_type(subject_token_type, prefix.replace("credential_source.", "subject_token_type"))
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
    for unsupported in ("url", "executable", "environment_id"):
        if unsupported in raw:
            raise ConfigError(prefix + unsupported, "this credential source is not supported by this "
                              "version of metaemu (supported: file)")
    raise ConfigError(prefix.rstrip("."), "expected a \"file\" key")


def _token_type(value: Any, key: str) -> str:
    if value not in _SUBJECT_TOKEN_TYPES:
        raise ConfigError(key, f"unsupported subject token type {value!r}")
    return str(value)


def _reject_unknown(prefix: str, raw: Mapping[str, Any], known: set[str]) -> None:
    for k in raw:
        if k not in known:
            raise ConfigError(prefix + str(k), f"unknown key (known: {', '.join(sorted(known))})")
