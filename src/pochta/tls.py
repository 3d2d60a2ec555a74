"""TLS contexts for the listeners and the delivery client, and the self-signed certificate made
on first start when none is configured. Imports `cryptography` (certificate generation) and ssl.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def ensure_self_signed(cert: Path, key: Path, hostname: str) -> None:
    """Write a self-signed certificate for `hostname` unless both files exist."""
    if cert.exists() and key.exists():
        return
    cert.parent.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    tmp_key = key.with_suffix(".tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.replace(tmp_key, key)
    tmp_cert = cert.with_suffix(".tmp")
    tmp_cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_cert, cert)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+ server context (RFC 8314 §4.1 recommends 1.2 or later)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def client_context(*, verify: bool = True, cafile: str | None = None) -> ssl.SSLContext:
    """A client context; `verify=False` is opportunistic TLS (RFC 7435) for MX delivery."""
    ctx = ssl.create_default_context(cafile=cafile)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def describe(obj: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """`TLS1.3 TLS_AES_256_GCM_SHA384` for Received: headers and logs."""
    if obj is None:
        return None
    version = (obj.version() or "TLS").replace("v", "")
    cipher = obj.cipher()
    return f"{version} {cipher[0]}" if cipher else version
