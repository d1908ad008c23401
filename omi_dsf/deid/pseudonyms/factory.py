"""Build the provider a site configuration names."""

from __future__ import annotations

from omi_dsf.config import ConfigError
from omi_dsf.peer import PeerConfigError

from ..store import SiteStore
from .base import PseudonymProvider




def make_provider(config, key: bytes, store: SiteStore) -> PseudonymProvider:
    """The provider `config` (PseudonymProviderSettings, omi_dsf.deid.config; None: embedded) names."""
    kind = getattr(config, "kind", "embedded")
    if kind == "embedded":
        from .embedded import EmbeddedProvider
        return EmbeddedProvider(key, store)
    if kind not in ("gpas", "ttp-fhir"):
        raise ConfigError(f"unknown pseudonym provider kind {kind!r} (embedded, gpas, ttp-fhir)")
    try:
        peer = config.peer(config.wsdl if kind == "gpas" else config.url, f"pseudonymization.provider ({kind})",
                           timeout=10.0)
    except PeerConfigError as exc:
        raise ConfigError(str(exc)) from None
    if kind == "gpas":
        from .gpas import GpasProvider
        return GpasProvider(peer)
    from .ttp_fhir import TtpFhirProvider
    return TtpFhirProvider(peer.url, client=peer.client(base_url=False))
