"""TLS for the webhook: a serving context from cert-manager's files (re-read when they change), or
a CA and serving certificate generated at start (``tls.generate``), whose CA the server writes into
its MutatingWebhookConfiguration's ``caBundle``.

The generated key never leaves the process except through a 0600 file in a private temporary
directory, because ``ssl`` loads a chain only from files. A generated CA is this process's own: with
more than one replica each would overwrite the others' bundle, so ``generate`` is for one replica
(use cert-manager for more).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from metaemu.webhook.settings import GeneratedTls

#: Generated certificates live a year; the process renews nothing (a restart generates anew and
#: rewrites the bundle), and a year outlasts any pod of a Deployment between rollouts.
GENERATED_LIFETIME = dt.timedelta(days=365)
#: Clock skew allowance between this process and the API server.
BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True, slots=True, kw_only=True)
class GeneratedCertificate:
    cert_file: Path
    key_file: Path
    ca_pem: bytes = field(repr=False)

    @property
    def ca_bundle(self) -> str:
        """``clientConfig.caBundle``: the base64 of the PEM CA."""
        return base64.b64encode(self.ca_pem).decode("ascii")


def dns_names(generate: GeneratedTls, namespace: str) -> list[str]:
    """The names the API server uses for a ``service`` clientConfig (``SERVICE.NAMESPACE.svc``)."""
    return [generate.service, f"{generate.service}.{namespace}", f"{generate.service}.{namespace}.svc",
            f"{generate.service}.{namespace}.svc.cluster.local"]


def generate_certificate(generate: GeneratedTls, *, namespace: str, now: dt.datetime) -> GeneratedCertificate:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"metaemu-webhook-ca.{namespace}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - BACKDATE)
          .not_valid_after(now + GENERATED_LIFETIME)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names(generate, namespace)]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in generate.ip_addresses]
    serving = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names(generate, namespace)[2])]))
               .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - BACKDATE).not_valid_after(now + GENERATED_LIFETIME)
               .add_extension(x509.SubjectAlternativeName(names), critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
               .sign(ca_key, hashes.SHA256()))
    directory = Path(tempfile.mkdtemp(prefix="metaemu-webhook-"))  # 0700
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    cert_file.write_bytes(serving.public_bytes(serialization.Encoding.PEM) + ca_pem)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return GeneratedCertificate(cert_file=cert_file, key_file=key_file,
                                ca_pem=ca_pem)


class ServingContext:
    """The server's ``SSLContext``; ``reload_if_changed`` loads the files again when their
    modification times change (cert-manager renews the Secret, kubelet updates the mount), and new
    handshakes use the new chain (``SSLContext.load_cert_chain`` on the live context)."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = self._mtimes()
        self.context.load_cert_chain(cert_file, key_file)

    def _mtimes(self) -> tuple[int, int]:
        return self.cert_file.stat().st_mtime_ns, self.key_file.stat().st_mtime_ns

    def reload_if_changed(self) -> bool:
        stamp = self._mtimes()
        if stamp == self._stamp:
            return False
        self.context.load_cert_chain(self.cert_file, self.key_file)
        self._stamp = stamp
        return True
