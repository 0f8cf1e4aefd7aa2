"""The ``certificate`` subject-token source: X.509 workload identity federation, the
``credential_source.certificate`` of a Google ``external_account`` file (issue #14).

The protocol, as google-auth 2.63 implements it (``identity_pool._X509Supplier``,
``identity_pool.Credentials._get_mtls_cert_and_key_paths``, ``transport._mtls_helper``) and Google
documents it (https://cloud.google.com/iam/docs/workload-identity-federation-with-x509-certificates,
"Obtain an access token using plain request"):

- ``credential_source.certificate`` names the *certificate configuration*: either
  ``certificate_config_location``, or ``use_default_certificate_config: true`` for the default
  location — ``$GOOGLE_API_CERTIFICATE_CONFIG``, then
  ``$CLOUDSDK_CONTEXT_AWARE_CERTIFICATE_CONFIG_FILE_PATH``, then
  ``$CLOUDSDK_CONFIG/certificate_config.json`` or ``~/.config/gcloud/certificate_config.json``. One
  of the two, not both (google-auth's ``_validate_certificate_config``). Optional
  ``trust_chain_path``: a PEM file of intermediates the provider's trust store lacks.
- The certificate configuration is JSON: ``{"cert_configs": {"workload": {"cert_path": ...,
  "key_path": ...}}}`` (what ``gcloud iam workload-identity-pools create-cred-config
  --credential-cert-path`` writes).
- The subject token (type ``urn:ietf:params:oauth:token-type:mtls``) is a JSON array of base64 DER
  certificates, leaf first (RFC 7515 §4.1.6, the ``x5c`` form), then the trust chain file's
  certificates; a chain file may start with the leaf (dropped) but must not hold it further down.
- The exchange goes to ``token_url`` (gcloud writes ``https://sts.mtls.googleapis.com/v1/token``)
  over mTLS with the leaf and its key: the token carries them as its ``client_certificate``.

Every fetch re-reads the certificate configuration, the certificate, the key and the chain, so a
rotation (cert-manager, a SPIFFE helper) is used by the next exchange; the transport builds a new
TLS context only when the bytes changed. Reads run in a worker thread. Errors name files, never
their content; an expired, not-yet-valid or mismatched pair is a ``SourceError`` before anything is
sent. Not owned here: the other ``credential_source`` kinds, and TLS itself (``metaemu.transport``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from metaemu.clock import Clock
from metaemu.credentials.sources.file import read_bounded
from metaemu.credentials.tokens import MTLS_TOKEN_TYPE, SubjectToken
from metaemu.errors import ConfigError, SourceError
from metaemu.transport import ClientCertificate

if TYPE_CHECKING:
    from metaemu.credentials.sources import SourceContext

#: google-auth ``environment_vars.GOOGLE_API_CERTIFICATE_CONFIG`` and its fallback
#: ``CLOUDSDK_CONTEXT_AWARE_CERTIFICATE_CONFIG_FILE_PATH``; ``CLOUDSDK_CONFIG`` moves gcloud's directory.
CERTIFICATE_CONFIG_ENV = "GOOGLE_API_CERTIFICATE_CONFIG"
CONTEXT_AWARE_CONFIG_ENV = "CLOUDSDK_CONTEXT_AWARE_CERTIFICATE_CONFIG_FILE_PATH"
CLOUDSDK_CONFIG_ENV = "CLOUDSDK_CONFIG"
#: ``_mtls_helper.CERTIFICATE_CONFIGURATION_DEFAULT_PATH``.
DEFAULT_CERTIFICATE_CONFIG = "~/.config/gcloud/certificate_config.json"
_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateSourceConfig:
    """``credential_source.certificate``; ``certificate_config`` None means the default location."""

    certificate_config: Path | None
    trust_chain: Path | None = None
    token_type: str = MTLS_TOKEN_TYPE
    kind: Literal["certificate"] = "certificate"


def parse_credential_source(raw: Mapping[str, Any], *, token_type: str, prefix: str,
                            base_dir: Path) -> CertificateSourceConfig:
    """Validate as google-auth does; relative paths are taken from the credential file's directory."""
    p = prefix + "certificate."
    cert = raw.get("certificate")
    if not isinstance(cert, dict):
        raise ConfigError(p.rstrip("."), "must be an object")
    if "file" in raw or "url" in raw:
        raise ConfigError(prefix.rstrip("."), "Ambiguous credential_source. 'file', 'url', and 'certificate' "
                          "are mutually exclusive.")
    if token_type != MTLS_TOKEN_TYPE:
        raise ConfigError(prefix.replace("credential_source.", "subject_token_type"),
                          f"a certificate source exchanges the {MTLS_TOKEN_TYPE} type, got {token_type!r}")
    location = _optional_path(cert, "certificate_config_location", p, base_dir)
    use_default = _flag(cert.get("use_default_certificate_config"), p + "use_default_certificate_config")
    if location is not None and use_default:
        raise ConfigError(p + "certificate_config_location",
                          "cannot be specified when use_default_certificate_config = true")
    if location is None and not use_default:
        raise ConfigError(p + "use_default_certificate_config",
                          "should be true if no certificate_config_location is provided")
    return CertificateSourceConfig(certificate_config=location,
                                   trust_chain=_optional_path(cert, "trust_chain_path", p, base_dir))


def default_certificate_config(environ: Mapping[str, str]) -> Path:
    """Where google-auth looks when ``use_default_certificate_config`` is true (``_mtls_helper.
    _get_cert_config_path`` with context-aware configuration included, POSIX layout)."""
    for var in (CERTIFICATE_CONFIG_ENV, CONTEXT_AWARE_CONFIG_ENV):
        if environ.get(var):
            return _expand_home(environ[var], environ)
    if environ.get(CLOUDSDK_CONFIG_ENV):
        return _expand_home(environ[CLOUDSDK_CONFIG_ENV], environ) / "certificate_config.json"
    return _expand_home(DEFAULT_CERTIFICATE_CONFIG, environ)


def build(config: CertificateSourceConfig, context: SourceContext) -> CertificateSource:
    """The running source; the default location is resolved here, once, from the process environment."""
    location = config.certificate_config
    # google-auth expands "~" in the location (``_get_cert_config_path``); the environment is read here.
    location = _expand_home(str(location), os.environ) if location else default_certificate_config(os.environ)
    return CertificateSource(certificate_config=location, trust_chain=config.trust_chain, clock=context.clock)


class CertificateSource:
    kind = "certificate"

    def __init__(self, *, certificate_config: Path, trust_chain: Path | None, clock: Clock) -> None:
        self.certificate_config = certificate_config
        self._trust_chain = trust_chain
        self._clock = clock

    def __repr__(self) -> str:
        return f"CertificateSource(certificate_config={str(self.certificate_config)!r})"

    async def fetch(self) -> SubjectToken:
        """The chain as an ``mtls`` subject token bound to the leaf and its key; ``SourceError`` when a
        file is missing or malformed, the key is not the leaf's, or the leaf is not valid now."""
        material = await asyncio.to_thread(self._read)
        leaf = material.chain[0]
        now = self._clock.now()
        if now < leaf.not_valid_before_utc:
            raise SourceError(f"the certificate in {material.cert_path} is not valid before "
                              f"{leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}")
        if now >= leaf.not_valid_after_utc:
            raise SourceError(f"the certificate in {material.cert_path} expired at "
                              f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}; is its issuer still renewing it?")
        # json.dumps with its default separators, as google-auth sends it.
        value = json.dumps([_b64_der(c) for c in material.chain])
        return SubjectToken(value=value, token_type=MTLS_TOKEN_TYPE, expiry=leaf.not_valid_after_utc,
                            client_certificate=material.client_certificate)

    def _read(self) -> _Material:
        """Everything from disk, in one worker-thread call (blocking)."""
        cert_path, key_path = _workload_paths(self.certificate_config)
        cert_pem = read_bounded(cert_path, what="workload certificate").encode()
        key_pem = read_bounded(key_path, what="workload private key").encode()
        certificates = _certificates(cert_pem, cert_path, what="workload certificate")
        leaf = certificates[0]
        _check_key_matches(leaf, key_pem, key_path=key_path, cert_path=cert_path)
        chain = [leaf]
        if self._trust_chain is not None:
            chain += _trust_chain(self._trust_chain, leaf)
        return _Material(cert_path=cert_path, chain=tuple(chain),
                         client_certificate=ClientCertificate(cert_pem=cert_pem, key_pem=key_pem))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Material:
    cert_path: Path
    chain: tuple[x509.Certificate, ...]
    client_certificate: ClientCertificate


def _workload_paths(config_path: Path) -> tuple[Path, Path]:
    """``cert_configs.workload.cert_path`` / ``key_path`` (google-auth ``_get_workload_cert_and_key_paths``)."""
    text = read_bounded(config_path, what="certificate configuration")
    try:
        data = json.loads(text)
    except ValueError:
        raise SourceError(f"certificate configuration {config_path} is not JSON") from None
    configs = data.get("cert_configs") if isinstance(data, dict) else None
    if not isinstance(configs, dict):
        raise SourceError(f"Certificate config file {config_path} is in an invalid format, a \"cert configs\" "
                          "object is expected")
    workload = configs.get("workload")
    paths = [workload.get(k) if isinstance(workload, dict) else None for k in ("cert_path", "key_path")]
    if not all(isinstance(v, str) and v for v in paths):
        raise SourceError(f"Workload certificate configuration is missing \"cert_path\" or \"key_path\" in "
                          f"{config_path}")
    # As google-auth opens them: relative to the working directory, "~" not expanded.
    return Path(str(paths[0])), Path(str(paths[1]))


def _certificates(pem: bytes, path: Path, *, what: str) -> list[x509.Certificate]:
    if _PEM_BEGIN not in pem:
        raise SourceError(f"{what} {path} holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise SourceError(f"{what} {path} is not a valid PEM certificate file") from None


def _trust_chain(path: Path, leaf: x509.Certificate) -> list[x509.Certificate]:
    """The chain file's certificates after the leaf (google-auth ``_X509Supplier.get_subject_token``)."""
    certificates = _certificates(read_bounded(path, what="trust chain file").encode(), path,
                                 what="trust chain file")
    if certificates[0] == leaf:
        certificates = certificates[1:]
    if leaf in certificates:
        raise SourceError(f"The leaf certificate must be at the top of the trust chain file {path}")
    return certificates


def _check_key_matches(leaf: x509.Certificate, key_pem: bytes, *, key_path: Path, cert_path: Path) -> None:
    """Refuse a key that is not the leaf's (a rotation caught half-written) before TLS fails opaquely."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise SourceError(f"workload private key {key_path} is not an unencrypted PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise SourceError(f"workload private key {key_path} does not belong to the certificate in {cert_path}")


def _b64_der(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def _optional_path(raw: Mapping[str, Any], key: str, prefix: str, base_dir: Path) -> Path | None:
    value = raw.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(prefix + key, "must be a path string")
    return Path(value) if value.startswith("~") else base_dir / value


def _flag(value: Any, key: str) -> bool:
    """A JSON boolean; the strings "true"/"false" too (some generators quote it; google-auth's truth test)."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(key, f"must be true or false, got {value!r}")


def _expand_home(path: str, environ: Mapping[str, str]) -> Path:
    if path == "~" or path.startswith("~/"):
        home = environ.get("HOME") or str(Path.home())
        return Path(home + path[1:])
    return Path(path)
