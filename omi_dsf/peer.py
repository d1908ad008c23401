"""A peer: another site's or service's HTTP endpoint (a DICOMweb gateway, an AI service, a TTP, a
FHIR server, the registry), and the one place in omi_dsf that opens HTTP clients to one (httpx).

One set of configuration keys wherever a peer is configured (a site file's `steps.providers.<org>`,
a DICOMweb source or sink, `ai_services.<id>`, `fhir_results`, a pseudonym service): the URL and
`omi_dsf.config.PeerSettings` (ca_file, client_cert, client_key, client_key_password_file,
token_file, timeout, proxy), whose `peer(url, where)` makes the Peer.

TLS contexts (omi_dsf.tls) are built once per set of files (and their modification times), cached
here, and shared by every client of the process: loading a CA bundle costs more than a request on a LAN.
"""

from __future__ import annotations

import logging
import os
import ssl
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Mapping

import httpx

from omi_dsf.errors import RetryableError
from omi_dsf.tls import client_context

log = logging.getLogger(__name__)
# httpx logs every request's URL at INFO; DICOMweb URLs carry study and series UIDs, which count as
# identifying: warnings only
logging.getLogger("httpx").setLevel(logging.WARNING)



class PeerConfigError(ValueError):
    """The peer's settings are wrong; the message names the key (e.g. steps.providers.ai.ca_file)."""


class PeerTlsError(Exception):
    """The TLS handshake with the peer failed (untrusted certificate, wrong host, our client
    certificate refused): a setting to fix, retrying will not help."""


class PeerUnreachable(ConnectionError, RetryableError):
    """The peer did not answer (refused, reset, timed out, closed the connection): transient."""


@dataclass(frozen=True)
class Peer:
    url: str
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    client_key_password_file: str | None = None
    token_file: str | None = None
    timeout: float = 60.0
    proxy: str | None = None
    where: str = "peer"      # the configuration key path, for messages
    client_key_password: str | None = field(default=None, repr=False)   # in memory (else the file's)

    def __post_init__(self) -> None:
        if not self.url:
            raise PeerConfigError(f"{self.where}: no URL")
        if not str(self.url).startswith(("http://", "https://")):
            raise PeerConfigError(f"{self.where}: {str(self.url)[:200]!r} is not an http(s) URL")
        if self.client_cert and not self.client_key:
            raise PeerConfigError(f"{self.where}: client_cert needs client_key")
        if self.client_key and not self.client_cert:
            raise PeerConfigError(f"{self.where}: client_key needs client_cert")
        if not self.timeout > 0:
            raise PeerConfigError(f"{self.where}.timeout must be a number of seconds > 0")
        for key in ("ca_file", "client_cert", "client_key", "client_key_password_file", "token_file"):
            value = getattr(self, key)
            if value is not None and not Path(value).is_file():
                raise PeerConfigError(f"{self.where}.{key}: {value} is not a file")

    # -- TLS and credentials ------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        password = self.client_key_password
        if self.client_key_password_file:
            password = self._read(self.client_key_password_file, "client_key_password_file")
        try:
            return _context(_stamp(self.ca_file), _stamp(self.client_cert), _stamp(self.client_key), password)
        except (OSError, ssl.SSLError) as exc:
            raise PeerConfigError(f"{self.where}: cannot load its TLS files (ca_file, client_cert, client_key): "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None

    def token(self) -> str | None:
        return self._read(self.token_file, "token_file") if self.token_file else None

    def _read(self, path: str, key: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise PeerConfigError(f"{self.where}.{key}: {exc.strerror or exc}") from None

    # -- the HTTP client ------------------------------------------------------------------------

    def client(self, *, timeout: float | None = None, headers: Mapping[str, str] | None = None,
               base_url: bool = True) -> httpx.Client:
        """An httpx client to the peer: verifying TLS with the peer's CA (and our client certificate),
        the bearer token, the timeout; `base_url=False` for a peer addressed by full URLs."""
        return http_client(self.url if base_url else "", self.ssl_context(),
                           self.timeout if timeout is None else timeout, headers, self.token(), self.proxy)

    def requests_session(self):
        """A requests session with the same settings, for zeep (the gPAS SOAP client), whose transport
        speaks requests only; the one use of requests in omi_dsf."""
        import requests

        session = requests.Session()
        session.trust_env = False
        session.verify = self.ca_file or True
        if self.client_cert:
            session.cert = (self.client_cert, self.client_key)
        token = self.token()
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        if self.proxy:
            session.proxies = {"https": self.proxy, "http": self.proxy}
        return session

    @contextmanager
    def errors(self, what: str = "") -> Iterator[None]:
        """Transport failures inside the block (sending, or reading a streamed answer) become
        PeerTlsError or PeerUnreachable, with `what` and the peer's URL in the message."""
        label = f"{what}: " if what else ""
        try:
            yield
        except httpx.TransportError as exc:
            text = _chain_text(exc)
            if isinstance(exc, httpx.ConnectError) and ("SSL" in text or "certificate" in text.lower()):
                raise PeerTlsError(f"{label}TLS with {self.url} failed: {tls_reason(text)}") from None
            hint = ""
            if not self.client_cert and isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
                # TLS 1.3: a server that requires a client certificate just closes the connection
                hint = ("; it closed the connection after the TLS handshake, as a server that requires a "
                        "client certificate does (none is configured)")
            raise PeerUnreachable(f"{label}{self.url} does not answer: {type(exc).__name__}{hint}") from None


def http_client(base_url: str = "", verify: ssl.SSLContext | None = None, timeout: float = 60.0,
                headers: Mapping[str, str] | None = None, token: str | None = None,
                proxy: str | None = None) -> httpx.Client:
    """The one constructor of HTTP clients to peers (Peer.client, and callers that hold a TLS
    context of their own, e.g. a test's): verification always on (`verify` None: the system CAs),
    the environment's proxy and CA variables not used."""
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=base_url, verify=verify or _context(None, None, None, None), timeout=timeout,
                        headers=all_headers, proxy=proxy, trust_env=False)


def json_answer(response: httpx.Response, what: str, error: type[Exception],
                resource_type: str | None = None) -> dict:
    """The JSON object a peer answered, or `error` naming `what` and what is wrong with the answer:
    not JSON, not a JSON object, or (with `resource_type`) not that FHIR resource. The one reading of
    a peer's JSON answer (FHIR servers, the TTP, the registry's Device, an OIP v2 server)."""
    try:
        data = response.json()
    except ValueError:
        raise error(f"{what}: the answer is not JSON") from None
    if not isinstance(data, dict):
        raise error(f"{what}: the answer is not a JSON object")
    if resource_type is not None and data.get("resourceType") != resource_type:
        raise error(f"{what}: the answer is not a {resource_type} resource")
    return data


def _chain_text(exc: BaseException) -> str:
    parts = []
    seen = 0
    while exc is not None and seen < 5:
        parts.append(str(exc))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return " ".join(parts)


def tls_reason(text: str) -> str:
    """What a TLS failure means, in words of the configuration."""
    if "CERTIFICATE_VERIFY_FAILED" in text:
        detail = text.split("certificate verify failed:", 1)[-1].split("(_ssl")[0].strip(" )'\"")
        if "hostname" in detail.lower() or "doesn't match" in detail or "IP address mismatch" in detail:
            return "its server certificate does not name the host of its URL"
        return f"its server certificate is not trusted by the configured ca_file ({detail or 'verify failed'})"
    if "hostname" in text.lower() or "doesn't match" in text:
        return "its server certificate does not name the host of its URL"
    if "alert" in text.lower():
        return "it refused our client certificate (check client_cert / client_key)"
    return "handshake failed"


def _stamp(path: str | None) -> tuple[str, int] | None:
    """A file and its modification time: a renewed certificate gets a new context."""
    if not path:
        return None
    try:
        return path, os.stat(path).st_mtime_ns
    except OSError:
        return path, 0


@lru_cache(maxsize=32)
def _context(ca: tuple[str, int] | None, cert: tuple[str, int] | None, key: tuple[str, int] | None,
             password: str | None) -> ssl.SSLContext:
    return client_context(ca[0] if ca else None, cert[0] if cert else None, key[0] if key else None, password)
