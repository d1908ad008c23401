"""The gateway's YAML configuration, checked into dataclasses (errors name the key that is wrong).

Example (see docs/gateway.md for all keys)::

    listen: {host: 127.0.0.1, port: 8042}
    base_url: https://gateway.example.org          # what clients see (RetrieveURL, BulkDataURI, Endpoint)
    tls: {certfile: gw.pem, keyfile: gw.key, client_ca: ca.pem, require_client_cert: true}
    auth:
      anonymous: false
      jwt: [{issuer: https://idp.example.org, key_file: idp-pub.pem, audience: omi-gateway}]
    dimse:
      calling_aet: OMIGW
      move_destination: {aet: OMIGW, port: 11114}   # the gateway's storage SCP for C-MOVE
    default: LEGACYPACS
    backends:
      LEGACYPACS: {type: dimse, host: 10.0.0.5, port: 104, retrieve: get}
      OUTBOX:     {type: store, path: /var/lib/omi/outbox}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from omi_dsf.serving import config as serving_config

AET_RE = re.compile(r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$")


class ConfigError(ValueError):
    """The configuration is wrong; the message names the key."""


@dataclass
class TlsConfig:
    certfile: Path
    keyfile: Path
    client_ca: Path | None = None
    require_client_cert: bool = False


@dataclass
class JwtIssuer:
    issuer: str
    key_file: Path                      # a PEM public key or a JWKS JSON file
    audience: str | None = None
    algorithms: list[str] = field(default_factory=lambda: ["RS256", "ES256", "PS256", "EdDSA"])


@dataclass
class AuthConfig:
    anonymous: bool = False
    jwt: list[JwtIssuer] = field(default_factory=list)


@dataclass
class MoveDestination:
    aet: str
    port: int
    host: str = "127.0.0.1"             # where the PACS connects to (and where we listen)
    bind: str | None = None             # listen address; default: host


@dataclass
class DimseBackendConfig:
    name: str
    host: str
    port: int
    called_aet: str
    retrieve: str = "get"               # get | move | auto (C-GET, then C-MOVE when C-GET finds nothing)
    engine: str = "lean"                # C-FIND and C-GET by: lean (dimse/lean_*.py) | pynetdicom
    connect_timeout: float = 5.0
    acse_timeout: float = 10.0
    dimse_timeout: float = 30.0
    network_timeout: float = 60.0
    pool_size: int = 4                  # idle associations kept per kind
    max_associations: int = 16          # at most this many operations at once on this PACS
    compute_missing: bool = True        # ModalitiesInStudy / NumberOf* by lower-level C-FINDs
    summary_ttl: float = 60.0           # seconds the computed study/series summaries are cached
    max_pdu: int = 0                    # 0 = unlimited
    cache_mb: int = 128                 # single instances kept for frames/rendered/bulk requests
    type: str = "dimse"


class GatewayLimits(serving_config.Limits):
    """What one request may cost (serving.config.Limits: body, query and header size, header and body
    timeouts, requests at once), with the gateway's defaults and its own limits. Past one the
    answer names it (``limits.max_instance_mb``)."""
    max_body_mb: float = Field(2048.0, gt=0)      # a STOW-RS request body
    max_concurrent: int = Field(64, ge=1)         # requests at once (not /health)
    max_instance_mb: int = Field(256, ge=1)       # one instance: its part, its inflated data set, a decoded frame
    max_parts: int = Field(10000, ge=1)           # parts of one STOW-RS request
    max_frames: int = Field(1000, ge=1)           # frame numbers in one request (duplicates merged)
    query_timeout: float = Field(30.0, gt=0)      # seconds one QIDO-RS search may take

    @property
    def max_instance(self) -> int:
        return self.max_instance_mb << 20


class _LimitsSection(serving_config.Section):
    limits: GatewayLimits | None = None


@dataclass
class StoreBackendConfig:
    name: str
    path: Path
    type: str = "store"


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8042
    base_url: str | None = None
    tls: TlsConfig | None = None
    auth: AuthConfig = field(default_factory=AuthConfig)
    calling_aet: str = "OMIGW"
    move_destination: MoveDestination | None = None
    backends: dict[str, DimseBackendConfig | StoreBackendConfig] = field(default_factory=dict)
    default: str | None = None
    max_results: int = 1000             # QIDO answers without limit are cut here (with a Warning)
    stream_queue: int = 8               # instances buffered between C-GET and the HTTP answer
    limits: GatewayLimits = field(default_factory=lambda: GatewayLimits())   # docs/gateway.md, Limits
    name: str = "OMI DICOMweb gateway"
    cors_origins: list[str] = field(default_factory=list)   # browser viewers on other origins

    @property
    def default_backend(self) -> str:
        return self.default or next(iter(self.backends))

    def public_base(self) -> str:
        if self.base_url:
            return self.base_url.rstrip("/")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"


def _typed(value: Any, kind: type, key: str):
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
        return value
    raise AssertionError(kind)


def _map(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping")
    return value


def _unknown(d: dict, allowed: set[str], key: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(map(str, extra))}")


def _path(value: Any, key: str, base: Path, must_exist: bool = True) -> Path:
    p = Path(_typed(value, str, key))
    if not p.is_absolute():
        p = base / p
    if must_exist and not p.exists():
        raise ConfigError(f"{key}: file {p} does not exist")
    return p


def _aet(value: Any, key: str) -> str:
    aet = _typed(value, str, key)
    if not AET_RE.match(aet):
        raise ConfigError(f"{key}: {aet!r} is not a valid AE title (1-16 characters, no backslash)")
    return aet


def _port(value: Any, key: str) -> int:
    port = _typed(value, int, key)
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: port {port} out of range")
    return port


_DIMSE_NUMBERS = {"connect_timeout": float, "acse_timeout": float, "dimse_timeout": float,
                  "network_timeout": float, "pool_size": int, "max_associations": int, "summary_ttl": float, "max_pdu": int,
                  "cache_mb": int}


def _backend(name: str, d: dict, base: Path) -> DimseBackendConfig | StoreBackendConfig:
    key = f"backends.{name}"
    kind = d.get("type")
    if kind == "store":
        _unknown(d, {"type", "path"}, key)
        if "path" not in d:
            raise ConfigError(f"{key}.path: required for a store backend")
        return StoreBackendConfig(name=name, path=_path(d["path"], f"{key}.path", base, must_exist=False))
    if kind != "dimse":
        raise ConfigError(f"{key}.type: must be 'dimse' or 'store', got {kind!r}")
    _unknown(d, {"type", "host", "port", "called_aet", "retrieve", "engine", "compute_missing",
                 *_DIMSE_NUMBERS}, key)
    for req in ("host", "port"):
        if req not in d:
            raise ConfigError(f"{key}.{req}: required for a dimse backend")
    cfg = DimseBackendConfig(name=name, host=_typed(d["host"], str, f"{key}.host"),
                             port=_port(d["port"], f"{key}.port"),
                             called_aet=_aet(d.get("called_aet", name), f"{key}.called_aet"))
    retrieve = d.get("retrieve", "get")
    if retrieve not in ("get", "move", "auto"):
        raise ConfigError(f"{key}.retrieve: must be get, move or auto, got {retrieve!r}")
    cfg.retrieve = retrieve
    engine = d.get("engine", "lean")
    if engine not in ("lean", "pynetdicom"):
        raise ConfigError(f"{key}.engine: must be lean or pynetdicom, got {engine!r}")
    cfg.engine = engine
    if "compute_missing" in d:
        cfg.compute_missing = _typed(d["compute_missing"], bool, f"{key}.compute_missing")
    for attr, kind_ in _DIMSE_NUMBERS.items():
        if attr in d:
            value = _typed(d[attr], kind_, f"{key}.{attr}")
            if value < 0 or (attr in ("pool_size", "max_associations") and value < 1):
                raise ConfigError(f"{key}.{attr}: out of range")
            setattr(cfg, attr, value)
    return cfg


def parse_config(data: Any, base: Path = Path(".")) -> GatewayConfig:
    top = _map(data, "config")
    _unknown(top, {"listen", "base_url", "tls", "auth", "dimse", "backends", "default", "max_results",
                   "stream_queue", "name", "cors_origins", "limits"}, "config")
    cfg = GatewayConfig()
    listen = _map(top.get("listen"), "listen")
    _unknown(listen, {"host", "port"}, "listen")
    cfg.host = _typed(listen.get("host", cfg.host), str, "listen.host")
    cfg.port = _port(listen.get("port", cfg.port), "listen.port")
    if "base_url" in top:
        cfg.base_url = _typed(top["base_url"], str, "base_url")
        if not re.match(r"^https?://[^/\s]+", cfg.base_url):
            raise ConfigError(f"base_url: {cfg.base_url!r} is not an http(s) URL")
    if "name" in top:
        cfg.name = _typed(top["name"], str, "name")
    if top.get("cors_origins") is not None:
        origins = top["cors_origins"]
        if not isinstance(origins, list) or any(not isinstance(o, str) or not o for o in origins):
            raise ConfigError("cors_origins: expected a list of origins (https://viewer.example.org)")
        cfg.cors_origins = origins
    for attr in ("max_results", "stream_queue"):
        if attr in top:
            setattr(cfg, attr, _typed(top[attr], int, attr))
            if getattr(cfg, attr) < 1:
                raise ConfigError(f"{attr}: must be at least 1")
    try:   # the section the project's servers share (serving.config.Limits), with the gateway's own
        cfg.limits = serving_config.parse(_LimitsSection, {"limits": top.get("limits")}, base,
                                          "config").limits or GatewayLimits()
    except serving_config.ConfigError as exc:
        raise ConfigError(str(exc).removeprefix("config: ")) from None
    if top.get("tls") is not None:
        t = _map(top["tls"], "tls")
        _unknown(t, {"certfile", "keyfile", "client_ca", "require_client_cert"}, "tls")
        for req in ("certfile", "keyfile"):
            if req not in t:
                raise ConfigError(f"tls.{req}: required when tls is given")
        cfg.tls = TlsConfig(certfile=_path(t["certfile"], "tls.certfile", base),
                            keyfile=_path(t["keyfile"], "tls.keyfile", base))
        if t.get("client_ca") is not None:
            cfg.tls.client_ca = _path(t["client_ca"], "tls.client_ca", base)
        cfg.tls.require_client_cert = _typed(t.get("require_client_cert", False), bool,
                                             "tls.require_client_cert")
        if cfg.tls.require_client_cert and not cfg.tls.client_ca:
            raise ConfigError("tls.client_ca: required when require_client_cert is true")
    auth = _map(top.get("auth"), "auth")
    _unknown(auth, {"anonymous", "jwt"}, "auth")
    cfg.auth.anonymous = _typed(auth.get("anonymous", False), bool, "auth.anonymous")
    issuers = auth.get("jwt") or []
    if not isinstance(issuers, list):
        raise ConfigError("auth.jwt: expected a list of issuers")
    for i, item in enumerate(issuers):
        key = f"auth.jwt[{i}]"
        item = _map(item, key)
        _unknown(item, {"issuer", "key_file", "audience", "algorithms"}, key)
        for req in ("issuer", "key_file"):
            if req not in item:
                raise ConfigError(f"{key}.{req}: required")
        iss = JwtIssuer(issuer=_typed(item["issuer"], str, f"{key}.issuer"),
                        key_file=_path(item["key_file"], f"{key}.key_file", base))
        if item.get("audience") is not None:
            iss.audience = _typed(item["audience"], str, f"{key}.audience")
        if item.get("algorithms") is not None:
            algs = item["algorithms"]
            if not isinstance(algs, list) or not algs or any(not isinstance(a, str) for a in algs):
                raise ConfigError(f"{key}.algorithms: expected a list of names")
            if any(a.lower() == "none" or a.upper().startswith("HS") for a in algs):
                raise ConfigError(f"{key}.algorithms: only public-key algorithms are allowed")
            iss.algorithms = algs
        try:   # loaded now, so that a wrong file is this error and not a traceback at start-up
            from omi_dsf.serving.auth import TokenChecker
            TokenChecker([iss])
        except Exception as exc:  # noqa: BLE001 - cryptography's and pyjwt's reasons vary
            raise ConfigError(f"{key}.key_file: {iss.key_file} is not a PEM public key, certificate or JWKS "
                              f"({type(exc).__name__})") from None
        cfg.auth.jwt.append(iss)
    if not cfg.auth.anonymous and not cfg.auth.jwt and not (cfg.tls and cfg.tls.require_client_cert):
        raise ConfigError("auth: no way in -- set auth.anonymous: true, configure auth.jwt, "
                          "or tls.require_client_cert: true")
    dimse = _map(top.get("dimse"), "dimse")
    _unknown(dimse, {"calling_aet", "move_destination"}, "dimse")
    cfg.calling_aet = _aet(dimse.get("calling_aet", cfg.calling_aet), "dimse.calling_aet")
    if dimse.get("move_destination") is not None:
        md = _map(dimse["move_destination"], "dimse.move_destination")
        _unknown(md, {"aet", "host", "port", "bind"}, "dimse.move_destination")
        if "port" not in md:
            raise ConfigError("dimse.move_destination.port: required")
        cfg.move_destination = MoveDestination(
            aet=_aet(md.get("aet", cfg.calling_aet), "dimse.move_destination.aet"),
            port=_port(md["port"], "dimse.move_destination.port"),
            host=_typed(md.get("host", "127.0.0.1"), str, "dimse.move_destination.host"))
        if md.get("bind") is not None:
            cfg.move_destination.bind = _typed(md["bind"], str, "dimse.move_destination.bind")
    if "backends" not in top:  # no PACS: the embedded store (a provider's inbox/outbox, the demo)
        top = {**top, "backends": {"STORE": {"type": "store", "path": "dicom-store"}}}
    backends = _map(top.get("backends"), "backends")
    if not backends:
        raise ConfigError("backends: at least one backend is required")
    for name, item in backends.items():
        name = _aet(str(name), "backends")
        cfg.backends[name] = _backend(name, _map(item, f"backends.{name}"), base)
        b = cfg.backends[name]
        if isinstance(b, DimseBackendConfig) and b.retrieve in ("move", "auto") and not cfg.move_destination:
            raise ConfigError(f"backends.{name}.retrieve: {b.retrieve} needs dimse.move_destination")
    if "default" in top:
        cfg.default = _typed(top["default"], str, "default")
        if cfg.default not in cfg.backends:
            raise ConfigError(f"default: no backend named {cfg.default!r}")
    return cfg


def load_config(path: str | Path) -> GatewayConfig:
    path = Path(path)
    try:
        data = serving_config.read_yaml(path)
    except serving_config.ConfigError as exc:
        raise ConfigError(str(exc)) from None
    return parse_config(data, path.parent.resolve())
