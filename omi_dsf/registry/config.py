"""The registry's configuration file (YAML); relative paths are relative to the file.

    host: 127.0.0.1
    port: 8700
    public_url: https://registry.example.org     # base of the links in Bundles (default: from host/port)
    database: registry.db                         # SQLite file, or postgresql://user@host/db
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

Checked with pydantic (omi_dsf/serving/config.py): wrong types, unknown keys and missing files are
refused at start in one line naming the key.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from omi_dsf.registry.auth import AuthSettings
from omi_dsf.registry.health import HealthSettings
from omi_dsf.serving import config as serving
from omi_dsf.serving.config import Limits, Name, Section, TlsSettings


class RegistryConfig(Section):
    host: Name = "127.0.0.1"
    port: int = Field(8700, ge=1, le=65535)
    database: Name = "registry.db"
    public_url: str | None = None
    tls: TlsSettings | None = None
    auth: AuthSettings = Field(default_factory=AuthSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    limits: Limits = Field(default_factory=Limits)

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {url!r}")
        return url

    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"


def load_config(path: str | Path) -> RegistryConfig:
    cfg = serving.load(RegistryConfig, path)
    return _with_database(cfg, Path(path).resolve().parent)


def parse_config(raw: dict, base: Path, where: str = "registry config") -> RegistryConfig:
    return _with_database(serving.parse(RegistryConfig, raw, base, where), base)


def _with_database(cfg: RegistryConfig, base: Path) -> RegistryConfig:
    db = cfg.database
    if not db.startswith(("postgresql://", "postgres://")):   # a SQLite file, relative to the configuration
        cfg.database = str(base / db.removeprefix("sqlite:///"))
    return cfg
