"""The registry's configuration file (YAML); relative paths are relative to the file.

    host: 127.0.0.1
    port: 8700
    public_url: https://registry.example.org     # base of the links in Bundles (default: from host/port)
    fhir_store:                                   # the FHIR server holding the entries
      url: http://127.0.0.1:8090/fhir
      ca_file: fhir-ca.crt                        # and the other peer keys (client_cert, token_file, ...)
    tls:                                          # omit for plain HTTP (then only bearer tokens)
      certfile: server.crt
      keyfile: server.key
      keyfile_password_file: server.key-password
      client_ca: ca.crt                           # enables client certificates (mutual TLS)
    auth:
      organizations: {<sha512 thumbprint or CN>: <DSF organization identifier>}
      cert_attribute: organizationIdentifier      # or O, CN, OU, or null: mapping only
      public_read: true                           # searches and the status page without authentication
      jwt:
        - issuer: https://idp.example.org
          key_file: idp-public.pem                # PEM public key or JWKS
          audience: omi-registry
          organization_claim: organization
    health:
      interval: 30            # seconds between check rounds
      timeout: 5
      degraded_latency_ms: 1000
      heartbeat_timeout: 300
      ca_file: ca.crt         # for https service endpoints
      client_cert: health.crt # for services that require mutual TLS (with client_key, client_key_password_file)
    limits: {max_body_mb: 1, max_query_bytes: 8192, header_timeout: 10, body_timeout: 30, max_concurrent: 32}

Typed with pydantic (the models below, on omi_dsf.config; tls and limits are the servers' shared
sections of omi_dsf/serving/config.py): wrong types, unknown keys and missing files are refused at
start in one line naming the key.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from omi_dsf.config import ConfigError, HttpUrl, Name, PeerSettings, Section, load, parse
from omi_dsf.registry.auth import AuthSettings
from omi_dsf.registry.health import HealthSettings
from omi_dsf.serving.config import Limits, TlsSettings


class FhirStoreSettings(PeerSettings):
    """The FHIR R4 server that holds the registry's entries (HAPI FHIR JPA: `python -m omi_dsf fhir-store up`)."""
    url: HttpUrl = Field(description="its FHIR base, e.g. http://127.0.0.1:8090/fhir")


class RegistryConfig(Section):
    host: Name = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8700, ge=1, le=65535, description="TCP port")
    fhir_store: FhirStoreSettings | None = Field(None, description="the FHIR server that stores the entries "
                                                                  "(required)")
    public_url: HttpUrl | None = Field(None, description="base of the links in Bundles (default: from host, port "
                                                         "and tls)")
    tls: TlsSettings | None = Field(None, description="omit for plain HTTP (then only bearer tokens)")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="who may register and search")
    health: HealthSettings = Field(default_factory=HealthSettings, description="the registry's own checks of "
                                                                               "registered services")
    limits: Limits = Field(default_factory=Limits, description="what one request may cost")

    def store_peer(self, where: str = "registry config"):
        """The FHIR store as a Peer, or a one-line error naming fhir_store."""
        if self.fhir_store is None:
            raise ConfigError(f"{where}: fhir_store: required (the FHIR server that stores the entries: "
                              "fhir_store: {url: http://127.0.0.1:8090/fhir})")
        return self.fhir_store.peer(self.fhir_store.url, f"{where}: fhir_store", timeout=30)

    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"


def load_config(path: str | Path) -> RegistryConfig:
    return load(RegistryConfig, path)


def parse_config(raw: dict, base: Path, where: str = "registry config") -> RegistryConfig:
    return parse(RegistryConfig, raw, base, where)
