"""The webhook's TLS: the generated certificate names the Service (and the configured addresses),
chains to the CA written into caBundle, keeps its key 0600; files from cert-manager are re-read
when they change, and new handshakes use them."""

from __future__ import annotations

import base64
import datetime as dt
import os
import ssl
import stat
from pathlib import Path

from cryptography import x509

from metaemu.webhook.certs import ServingContext, generate_certificate
from metaemu.webhook.settings import GeneratedTls

NOW = dt.datetime(2026, 12, 7, tzinfo=dt.UTC)


def test_the_generated_certificate_names_the_service_and_chains_to_the_bundle() -> None:
    generated = generate_certificate(GeneratedTls(service="metaemu-webhook", webhook_configuration="w",
                                                  ip_addresses=("127.0.0.1",)), namespace="infra", now=NOW)
    serving = x509.load_pem_x509_certificates(generated.cert_file.read_bytes())[0]
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "metaemu-webhook.infra.svc" in names.get_values_for_type(x509.DNSName)
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(generated.ca_bundle))
    serving.verify_directly_issued_by(ca)
    assert stat.S_IMODE(os.stat(generated.key_file).st_mode) == 0o600


def test_renewed_files_are_loaded_only_when_they_change(tmp_path: Path) -> None:
    first = generate_certificate(GeneratedTls(service="a", webhook_configuration="w"), namespace="n", now=NOW)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(first.cert_file.read_bytes())
    key.write_bytes(first.key_file.read_bytes())
    context = ServingContext(cert, key)
    assert isinstance(context.context, ssl.SSLContext)
    assert not context.reload_if_changed()
    second = generate_certificate(GeneratedTls(service="b", webhook_configuration="w"), namespace="n", now=NOW)
    cert.write_bytes(second.cert_file.read_bytes())
    key.write_bytes(second.key_file.read_bytes())
    os.utime(cert, ns=(1, 10**18))  # a new modification time, as kubelet's atomic swap gives
    assert context.reload_if_changed()
    assert not context.reload_if_changed()
