"""The gateway's YAML configuration as typed models (omi_dsf.config): each option with its type,
default and description; the option tables in docs/gateway.md are generated from them.

Example::

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

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, Discriminator, Field, PrivateAttr, model_validator

from omi_dsf.config import ConfigError, FilePath, HttpUrl, Name, Section, load, parse, tag
from omi_dsf.serving.config import AuthSettings, Limits, Listen, TlsSettings

__all__ = ["ConfigError", "GatewayConfig", "DimseBackendConfig", "StoreBackendConfig", "GatewayLimits",
           "MoveDestination", "load_config", "parse_config"]

AET_RE = re.compile(r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$")


def _aet(value: str) -> str:
    if not AET_RE.match(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 characters, no backslash)")
    return value


AeTitle = Annotated[str, AfterValidator(_aet)]
Port = Annotated[int, Field(ge=1, le=65535)]


class MoveDestination(Section):
    """The gateway's storage SCP for C-MOVE (needed by backends with retrieve: move or auto)."""
    aet: AeTitle | None = Field(None, description="its AE title, as the PACS knows it (default: dimse.calling_aet)")
    port: Port = Field(description="port the PACS connects to")
    host: Name = Field("127.0.0.1", description="where the PACS connects to (and where we listen)")
    bind: Name | None = Field(None, description="listen address (default: host)")


class DimseSettings(Section):
    calling_aet: AeTitle = Field("OMIGW", description="our AE title towards the PACS")
    move_destination: MoveDestination | None = Field(None, description="see below")


class DimseBackendConfig(Section):
    """A legacy PACS reached by DIMSE (C-FIND, C-GET / C-MOVE, C-STORE)."""
    type: Literal["dimse"] = Field("dimse", description="`dimse`")
    host: Name = Field(description="the PACS's host")
    port: Port = Field(description="the PACS's port")
    called_aet: AeTitle | None = Field(None, description="the PACS's AE title (default: the backend's name)")
    retrieve: Literal["get", "move", "auto"] = Field(
        "get", description="C-GET, C-MOVE (needs dimse.move_destination), or auto: C-GET, then C-MOVE when "
                           "C-GET finds nothing")
    connect_timeout: float = Field(5.0, ge=0, description="seconds to open the TCP connection")
    acse_timeout: float = Field(10.0, ge=0, description="seconds for association negotiation")
    dimse_timeout: float = Field(30.0, ge=0, description="seconds for a DIMSE response")
    network_timeout: float = Field(60.0, ge=0, description="seconds of network silence before giving up")
    pool_size: int = Field(4, ge=1, description="idle associations kept per kind (C-FIND, C-MOVE), within max_associations")
    max_associations: int = Field(16, ge=1, description="at most this many associations open to this PACS at once, working or idle")
    compute_missing: bool = Field(True, description="ModalitiesInStudy / NumberOf* by lower-level C-FINDs when "
                                                    "the PACS does not answer them")
    summary_ttl: float = Field(60.0, ge=0, description="seconds the computed study/series summaries are cached")
    max_pdu: int = Field(0, ge=0, description="largest PDU we accept (0: unlimited)")
    cache_mb: int = Field(128, ge=0, description="MiB of single instances kept for frames/rendered/bulk requests")
    _name: str = PrivateAttr("")

    @property
    def name(self) -> str:
        return self._name


class StoreBackendConfig(Section):
    """The embedded store: a folder with an index (a provider's inbox/outbox, the demo)."""
    type: Literal["store"] = Field("store", description="`store`")
    path: FilePath = Field(description="its folder (created when missing)")
    _name: str = PrivateAttr("")

    @property
    def name(self) -> str:
        return self._name


def _backend_type(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"={kind}" if kind in ("dimse", "store") else None


Backend = Annotated[Union[Annotated[DimseBackendConfig, tag("dimse")], Annotated[StoreBackendConfig, tag("store")]],
                    Discriminator(_backend_type, custom_error_type="invalid_kind",
                                  custom_error_message="type: must be dimse or store",
                                  custom_error_context={"key": "type", "expected": "dimse, store"})]


class GatewayLimits(Limits):
    """What one request may cost (the limits every server shares, with the gateway's defaults, and its
    own). Past one the answer names it (``limits.max_instance_mb``)."""
    max_body_mb: float = Field(2048.0, gt=0, description="a request body (STOW-RS) in MiB (413 above)")
    max_concurrent: int = Field(64, ge=1, description="requests at once, /health excepted (503 above)")
    max_instance_mb: int = Field(256, ge=1, description="one instance: its part, its inflated data set, a decoded "
                                                         "frame, in MiB")
    max_parts: int = Field(10000, ge=1, description="parts of one STOW-RS request")
    max_frames: int = Field(1000, ge=1, description="frame numbers in one request (duplicates merged)")
    query_timeout: float = Field(30.0, gt=0, description="seconds one QIDO-RS search may take")

    @property
    def max_instance(self) -> int:
        return self.max_instance_mb << 20


DEFAULT_BACKENDS = {"STORE": {"type": "store", "path": "dicom-store"}}


class GatewayConfig(Section):
    listen: Listen = Field(default_factory=lambda: Listen(port=8042), description="host (127.0.0.1), port (8042)")
    base_url: HttpUrl | None = Field(None, description="the URL clients see (RetrieveURL, BulkDataURI, Endpoint); "
                                                       "default from listen and tls")
    name: Name = Field("OMI DICOMweb gateway", description="the gateway's name (Endpoint resources)")
    tls: TlsSettings | None = Field(None, description="omit for plain HTTP")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="at least one way in: anonymous, jwt, or "
                                                                         "mutual TLS")
    dimse: DimseSettings = Field(default_factory=DimseSettings, description="the gateway as a DIMSE SCU")
    backends: dict[AeTitle, Backend] = Field(
        default_factory=lambda: dict(DEFAULT_BACKENDS), min_length=1,
        description="name (the AE title clients address: /aets/NAME) → backend; default one embedded store "
                    "`STORE` in `dicom-store`")
    default: AeTitle | None = Field(None, description="the backend of the unprefixed URLs (default: the first)")
    max_results: int = Field(1000, ge=1, description="QIDO answers without limit are cut here (with a Warning)")
    stream_queue: int = Field(8, ge=1, description="instances buffered between C-GET and the HTTP answer")
    cors_origins: list[Name] = Field(default_factory=list, description="browser viewers on other origins "
                                                                      "(https://viewer.example.org)")
    limits: GatewayLimits = Field(default_factory=GatewayLimits, description="see Limits")
    workers: int | None = Field(None, ge=1, le=64, description=(
        "worker processes sharing the listening socket, each with its own associations and caches "
        "(default: the machine's cores, at most 4; 1 when dimse.move_destination is set)"))
    # the folder the worker processes share (association slots, STOW marks); set by serve()
    _shared: Path | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _default_backends(cls, data: Any) -> Any:
        if isinstance(data, dict) and "backends" not in data:
            return {**data, "backends": dict(DEFAULT_BACKENDS)}   # with relative paths resolved
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "GatewayConfig":
        try:
            self.auth.require_a_way_in(self.tls)
        except ValueError as exc:
            raise ValueError(f"auth: {exc}") from None
        for name, backend in self.backends.items():
            backend._name = name
            if isinstance(backend, DimseBackendConfig):
                if backend.called_aet is None:
                    backend.called_aet = name
                if backend.retrieve in ("move", "auto") and self.dimse.move_destination is None:
                    raise ValueError(f"backends.{name}.retrieve: {backend.retrieve} needs dimse.move_destination")
        if self.default is not None and self.default not in self.backends:
            raise ValueError(f"default: no backend named {self.default!r}")
        if self.workers is not None and self.workers > 1 and self.dimse.move_destination is not None:
            raise ValueError("workers: more than 1 cannot share dimse.move_destination (one listener "
                             "receives the C-MOVE sub-operations); use 1, or retrieve: get")
        if self.dimse.move_destination is not None and self.dimse.move_destination.aet is None:
            self.dimse.move_destination.aet = self.dimse.calling_aet
        return self

    # what the rest of the gateway reads
    @property
    def host(self) -> str:
        return self.listen.host

    @property
    def port(self) -> int:
        return self.listen.port

    @property
    def calling_aet(self) -> str:
        return self.dimse.calling_aet

    @property
    def move_destination(self) -> MoveDestination | None:
        return self.dimse.move_destination

    @property
    def worker_count(self) -> int:
        if self.workers is not None:
            return self.workers
        return 1 if self.dimse.move_destination is not None else max(1, min(4, os.cpu_count() or 1))

    @property
    def default_backend(self) -> str:
        return self.default or next(iter(self.backends))

    def public_base(self) -> str:
        if self.base_url:
            return self.base_url.rstrip("/")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"


def parse_config(data: Any, base: Path = Path("."), where: str = "") -> GatewayConfig:
    """A gateway configuration (a YAML document); relative paths are relative to `base`."""
    return parse(GatewayConfig, data, base, where)


def load_config(path: str | Path) -> GatewayConfig:
    return load(GatewayConfig, path)
