"""The provider's DICOMweb gateway as the requester sees it: URL, TLS trust, client certificate.

Site settings, `steps.providers.<provider organization>` in the site YAML: ProviderSettings
(omi_dsf.transfer.config): gateway_url and the keys of every peer.

Errors: a configuration the requester must fix (unknown provider, plain http, a certificate the
CA does not vouch for) is a TransferError; a gateway that does not answer is `ProviderUnreachable`,
which the worker runtime retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from omi_dsf.dicomweb_client import DicomwebClient
from omi_dsf.peer import PeerConfigError, PeerTlsError, PeerUnreachable
from omi_dsf.transfer.config import ProviderSettings
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


def provider_settings(providers: Mapping[str, ProviderSettings], organization: str) -> ProviderSettings:
    entry = providers.get(organization)
    if not organization:
        raise TransferError("input provider-organization is missing")
    if not entry:
        known = ", ".join(sorted(providers)) or "none configured"
        raise TransferError(f"provider organization {organization!r} is not configured at this site "
                        f"(steps.providers: {known})")
    return entry


def open_gateway(providers: Mapping[str, ProviderSettings], organization: str) -> ProviderGateway:
    """The gateway of `organization` (`providers`: steps.providers)."""
    cfg = provider_settings(providers, organization)
    try:
        peer = cfg.peer(cfg.gateway_url, f"steps.providers.{organization}", timeout=120)
        return ProviderGateway(organization, peer, DicomwebClient(peer))
    except PeerConfigError as exc:
        raise TransferError(str(exc)) from None

def gateway_for_location(providers: Mapping[str, ProviderSettings], location: str, sent_to: str | None = None,
                         study_uid: str = "") -> ProviderGateway:
    """The configured provider whose gateway serves `location` (a result URL from a DSF message).

    We only fetch from gateways we have a CA for: a location elsewhere is not followed. The
    provider's worker may name its gateway by an inner address (loopback); then a location of the
    form …/studies/<result study UID> is read from the gateway of `sent_to`, the provider this
    request's study went to (the process variable provider-organization)."""
    for organization, cfg in providers.items():
        base = cfg.gateway_url.rstrip("/")
        if base and (location == base or location.startswith(base + "/")):
            return open_gateway(providers, organization)
    if sent_to and study_uid and location.rstrip("/").endswith(f"/studies/{study_uid}"):
        return open_gateway(providers, sent_to)
    raise TransferError("result-location is not at the gateway of any configured provider (steps.providers)")
