"""The provider's DICOMweb gateway as the requester sees it: URL, TLS trust, client certificate.

Site settings, `steps.providers.<provider organization>` in the site YAML:
    gateway_url   DICOMweb base URL of the provider's gateway (https)
    ca_file       PEM file with the CA(s) that sign the gateway's server certificate (required)
    client_cert   PEM client certificate for mutual TLS (optional; with client_key, unencrypted)
    client_key
    token_file    file holding a bearer token (optional; the token never sits in the YAML)
    timeout       seconds per HTTP request (default 120)

Errors: a configuration the requester must fix (unknown provider, plain http, a certificate the
CA does not vouch for) is a TransferError; a gateway that does not answer is `ProviderUnreachable`,
which the worker runtime retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import requests

from omi_dsf.errors import RetryableError
from omi_dsf.transfer.errors import TransferError


class ProviderUnreachable(ConnectionError, RetryableError):
    """The provider's gateway did not answer (refused, reset, timed out): transient, retried."""


@dataclass
class ProviderGateway:
    organization: str
    base_url: str
    session: requests.Session
    timeout: float
    client_cert: str | None = None

    def url(self, path: str) -> str:
        return self.base_url + path

    def request(self, method: str, path_or_url: str, **kwargs) -> requests.Response:
        """One HTTP exchange; TLS and connection failures become a TransferError or ProviderUnreachable."""
        url = path_or_url if path_or_url.startswith(("http://", "https://")) else self.url(path_or_url)
        kwargs.setdefault("timeout", self.timeout)
        try:
            return self.session.request(method, url, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise TransferError(f"TLS with the gateway of {self.organization} failed: {_tls_reason(exc)}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            hint = ""
            if not self.client_cert and "RemoteDisconnected" in str(exc):
                # TLS 1.3: a gateway that requires a client certificate just closes the connection
                hint = ("; it closed the connection after the TLS handshake, as a gateway that requires a "
                        "client certificate does (none is configured for this provider)")
            raise ProviderUnreachable(f"the gateway of {self.organization} ({self.base_url}) does not answer: "
                                      f"{type(exc).__name__}{hint}") from None

    def close(self) -> None:
        self.session.close()


def _tls_reason(exc: Exception) -> str:
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        detail = text.split("certificate verify failed:", 1)[-1].split("(_ssl")[0].strip(" )'\"")
        return f"its server certificate is not trusted by the configured ca_file ({detail or 'verify failed'})"
    if "hostname" in text.lower() or "doesn't match" in text:
        return "its server certificate does not name the host of gateway_url"
    if "alert" in text.lower():
        return "the gateway refused our client certificate (check client_cert / client_key)"
    return type(exc).__name__


def provider_settings(site: Mapping[str, Any], organization: str) -> Mapping[str, Any]:
    providers = site.get("providers") or {}
    entry = providers.get(organization)
    if not organization:
        raise TransferError("input provider-organization is missing")
    if not entry:
        known = ", ".join(sorted(providers)) or "none configured"
        raise TransferError(f"provider organization {organization!r} is not configured at this site "
                        f"(steps.providers: {known})")
    return entry


def open_gateway(site: Mapping[str, Any], organization: str) -> ProviderGateway:
    cfg = provider_settings(site, organization)
    base = str(cfg.get("gateway_url") or "").rstrip("/")
    if not base.startswith("https://"):
        raise TransferError(f"steps.providers.{organization}.gateway_url must be an https:// URL")
    ca_file = cfg.get("ca_file")
    if not ca_file or not Path(ca_file).is_file():
        raise TransferError(f"steps.providers.{organization}.ca_file is missing or not a file")
    session = requests.Session()
    # Only the configured CA decides: REQUESTS_CA_BUNDLE and friends in the environment would
    # otherwise override it (requests lets the environment win over session.verify).
    session.trust_env = False
    session.verify = str(ca_file)
    cert = cfg.get("client_cert")
    if cert:
        if not cfg.get("client_key"):
            raise TransferError(f"steps.providers.{organization}: client_cert needs client_key")
        session.cert = (str(cert), str(cfg["client_key"]))
    if cfg.get("token_file"):
        try:
            token = Path(cfg["token_file"]).read_text().strip()
        except OSError as exc:
            raise TransferError(f"steps.providers.{organization}.token_file: {exc.strerror}") from None
        session.headers["Authorization"] = f"Bearer {token}"
    if cfg.get("proxy"):  # trust_env is off, so a needed proxy is configured explicitly
        session.proxies = {"https": str(cfg["proxy"])}
    return ProviderGateway(organization, base, session, float(cfg.get("timeout", 120)),
                           str(cert) if cert else None)


def gateway_for_location(site: Mapping[str, Any], location: str, sent_to: str | None = None,
                         study_uid: str = "") -> ProviderGateway:
    """The configured provider whose gateway serves `location` (a result URL from a DSF message).

    We only fetch from gateways we have a CA for: a location elsewhere is not followed. The
    provider's worker may name its gateway by an inner address (loopback); then a location of the
    form …/studies/<result study UID> is read from the gateway of `sent_to`, the provider this
    request's study went to (the process variable provider-organization)."""
    for organization, cfg in (site.get("providers") or {}).items():
        base = str((cfg or {}).get("gateway_url") or "").rstrip("/")
        if base and (location == base or location.startswith(base + "/")):
            return open_gateway(site, organization)
    if sent_to and study_uid and location.rstrip("/").endswith(f"/studies/{study_uid}"):
        return open_gateway(site, sent_to)
    raise TransferError("result-location is not at the gateway of any configured provider (steps.providers)")
