"""Test PKI for X.509 workload identity federation (issue #14): CAs, intermediates and leaves made
with ``cryptography``, shaped as the workloads that federate with their own PKI hold them.

- ``Authority.root`` / ``Authority.intermediate``: CA certificates with the extensions Google's guide
  gives its ``ca_exts`` (basicConstraints critical CA:TRUE, keyUsage keyCertSign, extendedKeyUsage
  clientAuth; https://cloud.google.com/iam/docs/workload-identity-federation-with-x509-certificates,
  "Generate self-signed certificates").
- ``Authority.issue``: a leaf as the guide's ``leaf_exts`` (keyUsage critical digitalSignature and
  keyEncipherment, basicConstraints critical CA:FALSE) plus extendedKeyUsage clientAuth, with an
  optional URI SAN — a SPIFFE X.509-SVID carries exactly one (SPIFFE X509-SVID §2) — or DNS SANs,
  as cert-manager writes ``tls.crt`` (leaf then its issuing intermediate) and ``tls.key``.
- ``Authority.server``: a TLS server certificate for the stand-in's listener (``localhost``, 127.0.0.1).

Not owned here: verification (``fake_google_x509``) and where the files go (tests decide).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Leaves live a day, like a short-lived SVID; CAs ten years, like the guide's ``-days 3650``.
LEAF_LIFETIME = dt.timedelta(days=1)
CA_LIFETIME = dt.timedelta(days=3650)
#: Backdating absorbs clock skew between the issuer and the verifier, as real CAs do.
BACKDATE = dt.timedelta(minutes=5)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedCertificate:
    """A certificate, its private key, and the chain above it (issuer first, root excluded)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def cert_pem(self) -> bytes:
        return _pem(self.certificate)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @property
    def chain_pem(self) -> bytes:
        """The leaf followed by its intermediates: cert-manager's ``tls.crt``."""
        return self.cert_pem + b"".join(_pem(c) for c in self.chain)

    @property
    def intermediates_pem(self) -> bytes:
        return b"".join(_pem(c) for c in self.chain)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """``<stem>.pem`` (the leaf alone) and ``<stem>.key``; returns both paths."""
        cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        return cert, key


@dataclass(frozen=True, slots=True, kw_only=True)
class Authority:
    """A CA that can issue intermediates, leaves and server certificates."""

    issued: IssuedCertificate

    @property
    def certificate(self) -> x509.Certificate:
        return self.issued.certificate

    @property
    def pem(self) -> bytes:
        return self.issued.cert_pem

    @classmethod
    def root(cls, common_name: str, *, now: dt.datetime, client_auth: bool = True) -> Authority:
        """A self-signed root; ``client_auth=False`` leaves out the clientAuth EKU of the guide's
        ``ca_exts`` (a CA for TLS server certificates, whose chain OpenSSL checks for serverAuth)."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _ca_builder(_name(common_name), _name(common_name), key.public_key(), now=now,
                              client_auth=client_auth)
        cert = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                                     critical=False).sign(key, hashes.SHA256())
        return cls(issued=IssuedCertificate(certificate=cert, key=key))

    def intermediate(self, common_name: str, *, now: dt.datetime) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _ca_builder(_name(common_name), self.certificate.subject, key.public_key(), now=now)
        cert = self._sign(builder)
        return Authority(issued=IssuedCertificate(certificate=cert, key=key,
                                                  chain=(self.certificate, *self.issued.chain)))

    def issue(self, common_name: str, *, now: dt.datetime, uri: str | None = None, dns: tuple[str, ...] = (),
              lifetime: dt.timedelta = LEAF_LIFETIME, client_auth: bool = True) -> IssuedCertificate:
        """A workload leaf valid from ``now`` - ``BACKDATE`` for ``lifetime``."""
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [ExtendedKeyUsageOID.SERVER_AUTH]
        builder = (_base_builder(_name(common_name), self.certificate.subject, key.public_key(),
                                 not_before=now - BACKDATE, not_after=now - BACKDATE + lifetime)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(_key_usage(digital_signature=True, key_encipherment=True, cert_sign=False),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        if uri is not None:
            names.append(x509.UniformResourceIdentifier(uri))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        # The chain a workload holds stops below the root (its trust anchor is configured at Google).
        chain = (self.certificate, *self.issued.chain[:-1]) if self.issued.chain else ()
        return IssuedCertificate(certificate=self._sign(builder), key=key, chain=chain)

    def server(self, *, now: dt.datetime) -> IssuedCertificate:
        """A server certificate for ``localhost`` and 127.0.0.1 (the stand-in's TLS listener)."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (_base_builder(_name("localhost"), self.certificate.subject, key.public_key(),
                                 not_before=now - BACKDATE, not_after=now + CA_LIFETIME)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.SubjectAlternativeName([
                       x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False))
        return IssuedCertificate(certificate=self._sign(builder), key=key)

    def _sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        issuer_key = self.issued.key
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())


def _base_builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, *,
                  not_before: dt.datetime, not_after: dt.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _ca_builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, *,
                now: dt.datetime, client_auth: bool = True) -> x509.CertificateBuilder:
    builder = (_base_builder(subject, issuer, public_key, not_before=now - BACKDATE, not_after=now + CA_LIFETIME)
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(_key_usage(digital_signature=False, key_encipherment=False, cert_sign=True),
                              critical=True))
    if client_auth:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder


def _key_usage(*, digital_signature: bool, key_encipherment: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=key_encipherment, data_encipherment=False, key_agreement=False,
                         key_cert_sign=cert_sign, crl_sign=False, encipher_only=False, decipher_only=False)
