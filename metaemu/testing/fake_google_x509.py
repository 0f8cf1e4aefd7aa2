"""The X.509 side of the Google STS stand-in: an X.509 provider's trust store, the check of an
``urn:ietf:params:oauth:token-type:mtls`` exchange, and the TLS listener that asks for the client
certificate (issue #14).

What Google documents (https://cloud.google.com/iam/docs/workload-identity-federation-with-x509-certificates,
"Concepts", "Obtain an access token using plain request", "Limits"; the STS REST reference of
``subject_token``), and what ``verify_mtls_subject`` therefore checks, in order:

1. The exchange arrived over mTLS with a client certificate (``sts.mtls.googleapis.com``).
2. ``subject_token`` is a JSON list of base64 DER certificates (RFC 7515 §4.1.6), the leaf "used for
   the mTLS handshake" first: the leaf must be the presented client certificate.
3. The client certificate chains to one of the provider's trust anchors, through the token's
   certificates after the leaf and the trust store's intermediate CAs; every certificate is within its
   validity period at the request time, CA constraints hold and the leaf is usable for ``clientAuth``
   (RFC 5280 path validation, done by ``cryptography.x509.verification``; a leaf need not carry a SAN:
   Google's own example leaf has only a CN).
4. The documented limits: chain depth at most 5 including root and leaf, a leaf lifetime of at most
   390 days, RSA 2048-4096 or ECDSA P-256/P-384 keys.

``google.subject`` is the mapped attribute: ``subject.dn.cn`` by default (the documented default),
or ``san.uri`` (a SPIFFE ID), ``san.dns``, ``sha256Fingerprint``.

Undocumented, so chosen here and said so: the error bodies. STS answers RFC 6749 errors
(``{"error", "error_description"}``, upstream.md §1.3); a refused chain is ``invalid_grant`` and a
malformed or cert-less request ``invalid_request``, with descriptions written for this stand-in, not
Google's wording (none is published). How the front end treats a certificate it cannot chain at TLS
level is not documented either; the trust store is chosen by the request's ``audience``, so the
listener accepts any client certificate issued under a CA of *some* registered provider and leaves
the decision to step 3. (stdlib ``ssl`` cannot accept an arbitrary one: a certificate from an
unknown CA fails the handshake, which metaemu reports as a transport failure.)

The client certificate reaches the handler in the ``Client-Cert`` header of RFC 9440 (as a
TLS-terminating front end passes it on): ``inprocess.handler_app`` sets it from the TLS session
(served with ``mtls_server_context``) and strips any the client sent; ``InProcessClient`` sets it
from ``HttpRequest.client_certificate`` (without a handshake, so possession of the key is not proven
in process).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict

from metaemu.errors import ConfigError
from metaemu.testing.fake_google_sts import StsRejection, SubjectCheck
from metaemu.testing.inprocess import CLIENT_CERT_HEADER

#: Google's limits for X.509 federation ("Limits" of the guide above).
MAX_TRUST_ANCHORS = 3
MAX_INTERMEDIATE_CAS = 10
#: "The maximum depth for a certificate chain, including the root and client certificates."
MAX_CHAIN_DEPTH = 5
MAX_LEAF_LIFETIME = dt.timedelta(days=390)
RSA_KEY_BITS = (2048, 4096)
EC_CURVES = frozenset({"secp256r1", "secp384r1"})
#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the listener leaves validity to step 3, which reads the
#: stand-in's (possibly fake) clock instead of the real one.
_X509_V_FLAG_NO_CHECK_TIME = 0x200000

SubjectAttribute = Literal["subject.dn.cn", "san.uri", "san.dns", "sha256Fingerprint"]


@dataclass(frozen=True, slots=True, kw_only=True)
class X509Federation:
    """An X.509 provider: its trust store (REST ``TrustStore``: ``trustAnchors`` and optional
    ``intermediateCas``) and the attribute mapped to ``google.subject``."""

    trust_anchors: tuple[x509.Certificate, ...]
    intermediate_cas: tuple[x509.Certificate, ...] = ()
    subject_attribute: SubjectAttribute = "subject.dn.cn"

    def __post_init__(self) -> None:
        if not 1 <= len(self.trust_anchors) <= MAX_TRUST_ANCHORS:
            raise ConfigError("trustStore.trustAnchors", f"between 1 and {MAX_TRUST_ANCHORS} are allowed")
        if len(self.intermediate_cas) > MAX_INTERMEDIATE_CAS:
            raise ConfigError("trustStore.intermediateCas", f"at most {MAX_INTERMEDIATE_CAS} are allowed")


async def verify_mtls_subject(check: SubjectCheck) -> str:
    """``google.subject`` of a valid X.509 exchange; ``StsRejection`` naming the first failed check."""
    federation = check.provider.x509
    if federation is None:
        raise StsRejection("invalid_grant", "The provider is not an X.509 provider; it cannot accept an "
                           "mtls subject token.")
    presented = _presented_certificate(CIMultiDict(check.headers).get(CLIENT_CERT_HEADER))
    chain = _subject_chain(check.subject_token)
    leaf = chain[0]
    if leaf != presented:
        raise StsRejection("invalid_grant", "The first certificate of the subject token is not the client "
                           "certificate of the mTLS connection.")
    _check_limits(leaf, chain_length=len(chain))
    verified = _verify_chain(leaf, [*chain[1:], *federation.intermediate_cas], federation, now=check.now)
    if len(verified) > MAX_CHAIN_DEPTH:
        raise StsRejection("invalid_grant", f"The certificate chain is deeper than {MAX_CHAIN_DEPTH}.")
    return _subject(leaf, federation.subject_attribute)


def _presented_certificate(header: str | None) -> x509.Certificate:
    """The RFC 9440 ``Client-Cert`` value (an sf-binary ``:base64:`` of the DER certificate)."""
    if not header:
        raise StsRejection("invalid_request", "The token exchange for an mtls subject token must be sent over "
                           "mTLS with the workload's client certificate (sts.mtls.googleapis.com).")
    try:
        return x509.load_der_x509_certificate(base64.b64decode(header.strip().strip(":"), validate=True))
    except (ValueError, binascii.Error):
        raise StsRejection("invalid_request", "The client certificate could not be parsed.") from None


def _subject_chain(token: str) -> list[x509.Certificate]:
    try:
        items = json.loads(token)
    except ValueError:
        items = None
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise StsRejection("invalid_request", "subject_token must be a JSON list of base64-encoded DER "
                           "certificates, the client certificate first (RFC 7515 section 4.1.6).")
    try:
        return [x509.load_der_x509_certificate(base64.b64decode(i, validate=True)) for i in items]
    except (ValueError, binascii.Error):
        raise StsRejection("invalid_request", "subject_token holds an entry that is not a base64-encoded "
                           "DER certificate.") from None


def _check_limits(leaf: x509.Certificate, *, chain_length: int) -> None:
    if chain_length > MAX_CHAIN_DEPTH:
        raise StsRejection("invalid_grant", f"The certificate chain is deeper than {MAX_CHAIN_DEPTH}.")
    if leaf.not_valid_after_utc - leaf.not_valid_before_utc > MAX_LEAF_LIFETIME:
        raise StsRejection("invalid_grant", "The client certificate was issued for longer than 390 days.")
    key = leaf.public_key()
    if isinstance(key, rsa.RSAPublicKey) and RSA_KEY_BITS[0] <= key.key_size <= RSA_KEY_BITS[1]:
        return
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in EC_CURVES:
        return
    raise StsRejection("invalid_grant", "The client certificate key must be RSA 2048-4096 or ECDSA P-256/P-384.")


def _verify_chain(leaf: x509.Certificate, intermediates: list[x509.Certificate], federation: X509Federation,
                  *, now: dt.datetime) -> list[x509.Certificate]:
    ee_policy = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
    verifier = (verification.PolicyBuilder().store(verification.Store(list(federation.trust_anchors)))
                .time(now).max_chain_depth(MAX_CHAIN_DEPTH - 1)
                .extension_policies(ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
                .build_client_verifier())
    try:
        return list(verifier.verify(leaf, intermediates).chain)
    except verification.VerificationError as exc:
        raise StsRejection("invalid_grant", f"The client certificate could not be verified against the "
                           f"provider's trust store: {exc}") from None


def _subject(leaf: x509.Certificate, attribute: SubjectAttribute) -> str:
    values: list[str] = []
    if attribute == "subject.dn.cn":
        values = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    elif attribute == "sha256Fingerprint":
        values = [base64.b64encode(hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).digest()).decode()]
    else:
        kind = x509.UniformResourceIdentifier if attribute == "san.uri" else x509.DNSName
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            values = san.get_values_for_type(kind)
        except x509.ExtensionNotFound:
            values = []
    if not values or not values[0]:
        raise StsRejection("invalid_grant", f"The attribute mapping google.subject=assertion.{attribute} "
                           "yields no value for this certificate.")
    return values[0]  # "the subject alternative name's first URI", likewise for the others


# ---------------------------------------------------------------- the TLS listener


def mtls_server_context(*, cert_file: Path, key_file: Path,
                        client_cas: Iterable[x509.Certificate]) -> ssl.SSLContext:
    """A server context that requests (not requires: step 1 answers a missing one with an STS error)
    a client certificate issued under ``client_cas``, every registered provider's trust material."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    context.verify_mode = ssl.CERT_OPTIONAL
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in client_cas)
    context.load_verify_locations(cadata=pem.decode())
    # Any registered CA anchors at TLS level (intermediates too: PARTIAL_CHAIN); validity is step 3's.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | _X509_V_FLAG_NO_CHECK_TIME
    return context
