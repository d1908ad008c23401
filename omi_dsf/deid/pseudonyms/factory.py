"""Build the provider a site configuration names."""

from __future__ import annotations

from typing import Any, Mapping

from ..store import SiteStore
from .base import PseudonymProvider


class ConfigError(ValueError):
    pass


def make_provider(config: Mapping[str, Any] | None, key: bytes, store: SiteStore) -> PseudonymProvider:
    """config: {"kind": "embedded"} (default) | {"kind": "gpas", "wsdl": URL} |
    {"kind": "ttp-fhir", "url": base URL}; optional "timeout", "verify", "cert", "key"."""
    config = dict(config or {})
    kind = config.get("kind", "embedded")
    cert = (config["cert"], config["key"]) if config.get("cert") else None
    timeout = float(config.get("timeout", 10.0))
    verify = config.get("verify", True)
    if kind == "embedded":
        from .embedded import EmbeddedProvider
        return EmbeddedProvider(key, store)
    if kind == "gpas":
        from .gpas import GpasProvider
        if not config.get("wsdl"):
            raise ConfigError("pseudonym provider gpas needs 'wsdl' (…/gpas/gpasService?wsdl)")
        return GpasProvider(config["wsdl"], timeout=timeout, verify=verify, cert=cert)
    if kind == "ttp-fhir":
        from .ttp_fhir import TtpFhirProvider
        if not config.get("url"):
            raise ConfigError("pseudonym provider ttp-fhir needs 'url' (…/ttp-fhir/fhir/gpas)")
        return TtpFhirProvider(config["url"], timeout=timeout, verify=verify, cert=cert)
    raise ConfigError(f"unknown pseudonym provider kind {kind!r} (embedded, gpas, ttp-fhir)")
