"""The provider's DICOMweb gateway as the requester sees it: URL, TLS trust, client certificate.

Site settings, `steps.providers.<provider organization>` in the site YAML:
    gateway_url   DICOMweb base URL of the provider's gateway (https)
    ca_file       PEM file with the CA(s) that sign the gateway's server certificate (required)
    client_cert   PEM client certificate for mutual TLS (optional; with client_key)
    client_key
    client_key_password_file  file holding the client key's password (optional)
    token_file    file holding a bearer token (optional; the token never sits in the YAML)
    timeout       seconds per HTTP request (default 120)
    proxy         an explicit proxy URL (the environment's proxy settings are not used)

These are the keys of every peer (omi_dsf.peer).

Errors: a configuration the requester must fix (unknown provider, plain http, a certificate the
CA does not vouch for) is a TransferError; a gateway that does not answer is `ProviderUnreachable`,
which the worker runtime retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from omi_dsf.dicomweb_client import DicomwebClient
from omi_dsf.peer import Peer, PeerConfigError, PeerTlsError, PeerUnreachable
from omi_dsf.transfer.errors import TransferError


class ProviderUnreachable(PeerUnreachable):
    """The provider's gateway did not answer (refused, reset, timed out): transient, retried."""


@dataclass
class ProviderGateway:
    organization: str
    peer: Peer
    dicomweb: DicomwebClient

    @property
    def base_url(self) -> str:
        return self.peer.url

    @property
    def client_cert(self) -> str | None:
        return self.peer.client_cert

    def translated(self, call, *args, **kwargs):
        """`call(*args)` on the DICOMweb client; TLS and connection failures become a TransferError
        or ProviderUnreachable naming the provider."""
        try:
            return call(*args, **kwargs)
        except PeerTlsError as exc:
            reason = str(exc).split(" failed: ", 1)[-1]
            raise TransferError(f"TLS with the gateway of {self.organization} failed: {reason}") from None
        except PeerUnreachable as exc:
            detail = str(exc).split(" does not answer: ", 1)[-1].replace("a server that", "a gateway that")
            raise ProviderUnreachable(f"the gateway of {self.organization} ({self.base_url}) does not answer: "
                                      f"{detail}") from None

    def close(self) -> None:
        self.dicomweb.close()


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
    where = f"steps.providers.{organization}"
    if not str(cfg.get("gateway_url") or "").startswith("https://"):
        raise TransferError(f"{where}.gateway_url must be an https:// URL")
    if not cfg.get("ca_file"):
        raise TransferError(f"{where}.ca_file is missing or not a file")
    try:
        peer = Peer.from_config(cfg, where, url_key="gateway_url", timeout=120)
        return ProviderGateway(organization, peer, DicomwebClient(peer))
    except PeerConfigError as exc:
        raise TransferError(str(exc).replace(f"{where}.ca_file: ", f"{where}.ca_file is missing or not a file: ")) \
            from None

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
