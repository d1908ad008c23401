"""Test PKI for the DSF test bed, generated with `cryptography`.

One self-signed test CA issues
- a server certificate per DSF server (FHIR and BPE of every site), SAN localhost / 127.0.0.1;
- one client certificate per site, shared by the site's FHIR server (its own client) and its BPE,
  because DSF identifies the local organization by that certificate's SHA-512 thumbprint;
- one extra client certificate that is deliberately *not* on any allow list.

Private keys are written as encrypted PKCS#8 PEM (DSF reads them with a password); the password
sits next to each key in `<name>.key.password`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_PASSWORD = "password"  # test bed only
CA_NAME = "OMI DSF Test Bed CA"


@dataclass(frozen=True)
class CertFiles:
    """Paths of one certificate, its encrypted key and the key password."""

    cert: Path
    key: Path
    password: str = KEY_PASSWORD

    @property
    def thumbprint(self) -> str:
        return thumbprint(self.cert)


def thumbprint(cert_pem: Path) -> str:
    """SHA-512 over the DER encoding, lower-case hex: what DSF stores in the allow list."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    return hashlib.sha512(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OMI DSF Test Bed"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _key() -> rsa.RSAPrivateKey:
    # RSA rather than EC: what DSF's own test data generator uses, no surprises in Java.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key, path: Path, password: str | None) -> None:
    enc = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    )
    path.chmod(0o600)
    if password:
        pw = path.with_name(path.name + ".password")
        pw.write_text(password)
        pw.chmod(0o600)


class TestCA:
    """A CA that lives in a folder: `ca.crt`, `ca.key`."""

    __test__ = False  # not a pytest class

    def __init__(self, folder: Path):
        self.folder = folder
        self.cert_path = folder / "ca.crt"
        self.key_path = folder / "ca.key"

    def ensure(self) -> None:
        if self.cert_path.exists() and self.key_path.exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(CA_NAME))
            .issuer_name(_name(CA_NAME))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, self.key_path, None)

    def issue(self, name: str, cn: str, *, server: bool, client: bool) -> CertFiles:
        """Issue (or reuse) `<name>.crt` / `<name>.key` in the CA folder."""
        files = CertFiles(self.folder / f"{name}.crt", self.folder / f"{name}.key")
        if files.cert.exists() and files.key.exists():
            return files
        ca_key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=825))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_encipherment=True, key_agreement=False,
                    content_commitment=False, data_encipherment=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), False
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, files.key, KEY_PASSWORD)
        return files
