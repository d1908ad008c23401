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
      public_read: true                           # searches without authentication
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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from omi_dsf.cli import UserError
from omi_dsf.registry.auth import ATTRIBUTES, AuthSettings, JwtProvider
from omi_dsf.registry.health import HealthSettings


@dataclass
class TlsSettings:
    certfile: Path
    keyfile: Path
    client_ca: Path | None = None
    keyfile_password: str | None = None


@dataclass
class RegistryConfig:
    host: str = "127.0.0.1"
    port: int = 8700
    database: str = "registry.db"
    public_url: str | None = None
    tls: TlsSettings | None = None
    auth: AuthSettings = field(default_factory=AuthSettings)
    health: HealthSettings = field(default_factory=HealthSettings)

    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"


def _path(base: Path, value, key: str, where: str) -> Path:
    p = base / str(value)
    if not p.exists():
        raise UserError(f"{where}: {key} {p} does not exist")
    return p


def load_config(path: str | Path) -> RegistryConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise UserError(f"registry config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"registry config {path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise UserError(f"registry config {path}: must be a mapping")
    return parse_config(raw, path.resolve().parent, str(path))


def parse_config(raw: dict, base: Path, where: str = "registry config") -> RegistryConfig:
    known = {"host", "port", "database", "public_url", "tls", "auth", "health"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    cfg = RegistryConfig()
    cfg.host = str(raw.get("host", cfg.host))
    try:
        cfg.port = int(raw.get("port", cfg.port))
    except (TypeError, ValueError):
        raise UserError(f"{where}: port must be a number") from None
    db = str(raw.get("database", cfg.database))
    cfg.database = db if db.startswith(("postgresql://", "postgres://")) else str(base / db.removeprefix("sqlite:///"))
    cfg.public_url = raw.get("public_url")
    if raw.get("tls"):
        t = raw["tls"]
        password = None
        if t.get("keyfile_password_file"):
            password = _path(base, t["keyfile_password_file"], "tls.keyfile_password_file", where).read_text().strip()
        cfg.tls = TlsSettings(_path(base, t.get("certfile", ""), "tls.certfile", where),
                              _path(base, t.get("keyfile", ""), "tls.keyfile", where),
                              _path(base, t["client_ca"], "tls.client_ca", where) if t.get("client_ca") else None,
                              password)
    a = raw.get("auth") or {}
    attr = a.get("cert_attribute", "organizationIdentifier")
    if attr is not None and attr not in ATTRIBUTES:
        raise UserError(f"{where}: auth.cert_attribute must be one of {', '.join(ATTRIBUTES)} or null")
    jwts = []
    for i, j in enumerate(a.get("jwt") or []):
        if not j.get("issuer") or not j.get("key_file"):
            raise UserError(f"{where}: auth.jwt[{i}] needs issuer and key_file")
        kw = {"audience": j.get("audience"), "organization_claim": j.get("organization_claim", "organization")}
        if j.get("algorithms"):
            kw["algorithms"] = list(j["algorithms"])
        jwts.append(JwtProvider(j["issuer"], _path(base, j["key_file"], f"auth.jwt[{i}].key_file", where), **kw))
    cfg.auth = AuthSettings(organizations={str(k): str(v) for k, v in (a.get("organizations") or {}).items()},
                            cert_attribute=attr, jwt=jwts, public_read=bool(a.get("public_read", True)))
    h = raw.get("health") or {}
    try:
        cfg.health = HealthSettings(interval=float(h.get("interval", 30)), timeout=float(h.get("timeout", 5)),
                                    degraded_latency_ms=float(h.get("degraded_latency_ms", 1000)),
                                    heartbeat_timeout=float(h.get("heartbeat_timeout", 300)),
                                    ca_file=str(_path(base, h["ca_file"], "health.ca_file", where)) if h.get("ca_file") else None)
    except (TypeError, ValueError):
        raise UserError(f"{where}: health settings must be numbers") from None
    return cfg
