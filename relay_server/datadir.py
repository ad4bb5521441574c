"""The data directory: SQLite database, generated secrets (0600) and a fallback TLS certificate."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import secrets
from pathlib import Path

DB_NAME = "relay.db"


class DataDirError(Exception):
    pass


def prepare(path: str) -> Path:
    p = Path(path)
    try:
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDirError(f"data directory {path}: {exc.strerror}") from None
    if not os.access(p, os.W_OK):
        raise DataDirError(f"data directory {path}: not writable")
    return p


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def turn_secret(datadir: Path) -> str:
    """The TURN REST shared secret, generated on first start."""
    path = datadir / "turn_secret"
    if not path.exists():
        _write_private(path, secrets.token_urlsafe(32).encode() + b"\n")
    return path.read_text().strip()


def server_key(datadir: Path) -> bytes:
    """The rendezvous X25519 private key (base64 in the file), generated on first start."""
    path = datadir / "server_key"
    if not path.exists():
        _write_private(path, base64.b64encode(secrets.token_bytes(32)) + b"\n")
    raw = base64.b64decode(path.read_text().strip())
    if len(raw) != 32:
        raise DataDirError(f"{path}: not a 32-byte base64 key")
    return raw


def self_signed_certificate(datadir: Path, addresses: list[str]) -> tuple[str, str]:
    """A self-signed certificate for TURN over TLS when the operator gives none."""
    cert_path, key_path = datadir / "tls_cert.pem", datadir / "tls_key.pem"
    if cert_path.exists() and key_path.exists():
        return str(cert_path), str(key_path)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "overlay-relay")])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = [x509.DNSName("overlay-relay")]
    for a in addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(a)))
        except ValueError:
            pass
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    for p in (cert_path, key_path):
        if p.exists():
            p.unlink()
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)
