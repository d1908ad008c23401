"""Build the provider a site configuration names."""

from __future__ import annotations

from typing import Any, Mapping

from omi_dsf.peer import Peer, PeerConfigError

from ..store import SiteStore
from .base import PseudonymProvider


class ConfigError(ValueError):
    pass


def make_provider(config: Mapping[str, Any] | None, key: bytes, store: SiteStore) -> PseudonymProvider:
    """config: {"kind": "embedded"} (default) | {"kind": "gpas", "wsdl": URL} |
    {"kind": "ttp-fhir", "url": base URL}; optional the peer keys (omi_dsf.peer): "ca_file", "client_cert",
    "client_key", "token_file", "timeout" (the deprecated "verify"/"cert"/"key" translated with a warning)."""
    config = dict(config or {})
    kind = config.get("kind", "embedded")
    if kind == "embedded":
        from .embedded import EmbeddedProvider
        return EmbeddedProvider(key, store)
    url_key = {"gpas": "wsdl", "ttp-fhir": "url"}.get(kind)
    if url_key is None:
        raise ConfigError(f"unknown pseudonym provider kind {kind!r} (embedded, gpas, ttp-fhir)")
    if not config.get(url_key):
        hint = "…/gpas/gpasService?wsdl" if kind == "gpas" else "…/ttp-fhir/fhir/gpas"
        raise ConfigError(f"pseudonym provider {kind} needs {url_key!r} ({hint})")
    try:
        peer = Peer.from_config(config, f"pseudonymization.provider ({kind})", url_key=url_key, timeout=10.0)
    except PeerConfigError as exc:
        raise ConfigError(str(exc)) from None
    if kind == "gpas":
        from .gpas import GpasProvider
        return GpasProvider(peer)
    from .ttp_fhir import TtpFhirProvider
    return TtpFhirProvider(peer.url, client=peer.client(base_url=False))
