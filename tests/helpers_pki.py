"""The one throw-away X.509 PKI of the tests: a CA, leaf certificates for servers and clients, PEM files.

EC P-256 keys, one day of validity; keys are written unencrypted unless a password is given (then
encrypted PKCS#8, as a site's keys with a `*_password_file` are). The DSF test bed has its own PKI
(omi_dsf.testbed.certs), which tests/test_testbed.py tests and the DSF tests use.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER, CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
LOOPBACK = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]   # a server's SAN here


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: str, issuer: x509.Name, key) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1)))


def make_ca(cn: str):
    """(key, certificate) of a self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(cn, _name(cn), key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca_key, ca_cert, cn: str, usage, san: list | None = None):
    """(key, certificate) signed by the CA, for one extended key usage (server or client auth)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(cn, ca_cert.subject, key).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def write_pem(folder: Path, name: str, key, cert, password: str | None = None) -> tuple[str, str]:
    """`name`.pem and `name`.key in `folder` (the key encrypted with `password` if given); returns
    their paths (certificate, key)."""
    encryption = serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    (folder / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8, encryption))
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(folder / f"{name}.pem"), str(folder / f"{name}.key")


def write_ca(path: Path, cert) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)
