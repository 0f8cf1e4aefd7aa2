"""What an application-default-credentials file holds, as gcloud writes it and google-auth reads it.

Owns reading the file (bounded, one JSON object), telling its ``type`` apart and, for an
``impersonated_service_account`` file, the credentials inside it and the chain they impersonate.
Not owned: refreshing (``google.py``), the IAM calls (``metaemu.credentials.impersonation``).

The accepted types, each as gcloud 528 writes it (``googlecloudsdk/core/credentials/creds.py``
``_ConvertCredentialsToADC``) and google-auth's ``_default.py`` loads it::

    authorized_user                    gcloud auth application-default login
    service_account                    a key (gcloud iam service-accounts keys create)
    external_account_authorized_user   gcloud auth application-default login --login-config=FILE
                                       (workforce identity federation: an STS refresh token)
    impersonated_service_account       gcloud auth application-default login
                                       --impersonate-service-account=[DELEGATE,...,]TARGET;
                                       ``source_credentials`` is one of the three above

An impersonated file names its target in ``service_account_impersonation_url`` (google-auth takes
what lies between the last ``/`` and ``:generateAccessToken``) and the accounts between the source
and the target in ``delegates``: bare emails as gcloud writes them (from the comma-separated flag,
``store.ParseImpersonationAccounts``), or ``projects/-/serviceAccounts/…`` names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from metaemu.credentials.impersonation import DELEGATE_PREFIX, Impersonation
from metaemu.errors import SourceError

#: Types whose credentials google-auth refreshes itself (an impersonated file's source among them).
REFRESHABLE_TYPES = ("authorized_user", "service_account", "external_account_authorized_user")
IMPERSONATED_TYPE = "impersonated_service_account"
SUPPORTED_TYPES = (*REFRESHABLE_TYPES, IMPERSONATED_TYPE)
#: An ADC file is ~2 KiB (a service-account key with its PEM); anything far larger is refused unread.
MAX_CREDENTIALS_FILE_BYTES = 64 * 1024

_TARGET_PATH = re.compile(r"/projects/-/serviceAccounts/(?P<account>[^/:]+):generateAccessToken$")
_ACCOUNT = re.compile(r"^[^/\s]+$")


@dataclass(frozen=True, slots=True, kw_only=True)
class AdcFile:
    """One read of the file. ``kind`` and ``info`` are the credentials to refresh: the file's own,
    or an impersonated file's ``source_credentials``; ``impersonation`` is that file's chain."""

    path: Path
    kind: str
    info: Mapping[str, Any] = field(repr=False)
    impersonation: Impersonation | None = None


def read_adc(path: Path) -> AdcFile:
    """Read and classify ``path``; ``SourceError`` (permanent) when it is missing or unusable."""
    return parse_adc(read_json(path), path)


def parse_adc(info: Mapping[str, Any], path: Path) -> AdcFile:
    kind = info.get("type")
    if kind == IMPERSONATED_TYPE:
        source = info.get("source_credentials")
        if not isinstance(source, dict):
            raise SourceError(f"{path} is an {IMPERSONATED_TYPE} file without source_credentials", permanent=True)
        source_kind = source.get("type")
        if source_kind not in REFRESHABLE_TYPES:
            raise SourceError(f"{path}: the source_credentials of an {IMPERSONATED_TYPE} file must be "
                              f"{' or '.join(REFRESHABLE_TYPES)}, not {source_kind!r}", permanent=True)
        return AdcFile(path=path, kind=str(source_kind), info=source, impersonation=_impersonation(info, path))
    if kind in REFRESHABLE_TYPES:
        return AdcFile(path=path, kind=str(kind), info=info)
    raise SourceError(
        f"{path} holds credentials of type {kind!r}; the google source takes {', '.join(SUPPORTED_TYPES)} "
        "(for an external_account file use --credential-config; to impersonate, set "
        "workload_identity.service_account)", permanent=True)


def _impersonation(info: Mapping[str, Any], path: Path) -> Impersonation:
    url = info.get("service_account_impersonation_url")
    try:
        match = _TARGET_PATH.search(urlsplit(url).path) if isinstance(url, str) else None
    except ValueError:  # urlsplit: e.g. an unclosed IPv6 bracket
        match = None
    if match is None:
        raise SourceError(f"{path}: service_account_impersonation_url {url!r} is not "
                          "https://HOST/v1/projects/-/serviceAccounts/EMAIL:generateAccessToken", permanent=True)
    raw = info.get("delegates") or []  # gcloud writes [] (or null, through older google-auth)
    if not isinstance(raw, list):
        raise SourceError(f"{path}: delegates must be a list of service accounts", permanent=True)
    delegates = []
    for item in raw:
        account = item.removeprefix(DELEGATE_PREFIX) if isinstance(item, str) else ""
        if not _ACCOUNT.match(account):
            raise SourceError(f"{path}: delegate {item!r} is neither a service-account email (or unique ID) "
                              f"nor {DELEGATE_PREFIX}EMAIL (the - wildcard is required)", permanent=True)
        delegates.append(account)
    return Impersonation(service_account=unquote(match["account"]), delegates=tuple(delegates))


def read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CREDENTIALS_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SourceError(f"no Google credentials at {path}: run `gcloud auth application-default login`, "
                          "or set workload_identity.source.credentials_file or GOOGLE_APPLICATION_CREDENTIALS",
                          permanent=True) from None
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}", permanent=True) from None
    if len(data) > MAX_CREDENTIALS_FILE_BYTES:
        raise SourceError(f"{path} is larger than {MAX_CREDENTIALS_FILE_BYTES} bytes", permanent=True)
    try:
        info = json.loads(data)
    except ValueError:
        raise SourceError(f"{path} is not JSON", permanent=True) from None
    if not isinstance(info, dict):
        raise SourceError(f"{path} does not hold a JSON object", permanent=True)
    return info
