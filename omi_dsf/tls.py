"""Client TLS contexts, verifying always: a private CA from a file (else the system CAs) and, for
mutual TLS, a client certificate."""

from __future__ import annotations

import ssl

import httpx


def client_context(ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                   key_password: str | None = None) -> ssl.SSLContext:
    """OSError or ssl.SSLError (also an OSError) say what could not be loaded."""
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else httpx.create_ssl_context()
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file, key_password)
    return ctx
