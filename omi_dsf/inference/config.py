"""The reference AI service's configuration (YAML, `python -m omi_dsf ai-service --config FILE`).

    listen: {host: 127.0.0.1, port: 8500}
    tls:                               # optional; without it plain HTTP
      certfile: ai.pem
      keyfile: ai.key
      client_ca: ca.pem
      require_client_cert: true        # mutual TLS
    auth:                              # at least one way in: anonymous, jwt, or mutual TLS
      anonymous: false
      jwt: [{issuer: https://idp.example.org, key_file: idp.pem, audience: omi-ai}]
    limits:
      max_body_mb: 320                 # an inference request (a 600-slice 512x512 CT is 300 MB)
      max_json_mb: 16                  # its JSON part (tensors as JSON numbers take ~10x that in memory)
      max_query_bytes: 8192
      header_timeout: 10
      body_timeout: 30
      max_concurrent: 16               # requests in progress (health excepted)
      max_concurrent_infer: 2          # inference requests at once (their bodies are held in memory)
    max_slices: 600                    # the model's limit, announced in its metadata

Sections tls, auth and limits are the ones every server of the project shares (omi_dsf/serving).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, model_validator

from omi_dsf.config import ExistingFile, HttpUrl, Name, PeerSettings, Section, existing_file
from omi_dsf.serving.config import AuthSettings, Limits, Listen, TlsSettings

DEFAULT_PORT = 8500


DEFAULT_MODEL = "lung-seg"


class AiLimits(Limits):
    max_body_mb: float = Field(320.0, gt=0, description="an inference request in MiB (a 600-slice 512x512 CT is "
                                                         "300 MB; 413 above)")
    max_json_mb: float = Field(16.0, gt=0, description="its JSON part in MiB (tensors as JSON numbers take ~10x "
                                                        "that in memory)")
    max_concurrent: int = Field(16, ge=1, description="requests in progress, health excepted (503 above)")
    max_concurrent_infer: int = Field(2, ge=1, description="inference requests at once (their bodies are held in "
                                                            "memory)")

    @property
    def max_json(self) -> int:
        return int(self.max_json_mb * (1 << 20))


class ServiceConfig(Section):
    listen: Listen = Field(default_factory=lambda: Listen(port=DEFAULT_PORT),
                           description=f"host (127.0.0.1), port ({DEFAULT_PORT})")
    tls: TlsSettings | None = Field(None, description="omit for plain HTTP")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="at least one way in: anonymous, jwt, "
                                                                         "or mutual TLS")
    limits: AiLimits = Field(default_factory=AiLimits, description="what one request may cost")
    max_slices: int = Field(600, ge=3, description="the model's limit, announced in its metadata")

    @model_validator(mode="after")
    def _a_way_in(self) -> "ServiceConfig":
        self.auth.require_a_way_in(self.tls)
        return self

    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.listen.host}:{self.listen.port}"


def _url_or_file(value: Any, info: ValidationInfo) -> str | Path:
    if isinstance(value, str) and value.startswith(("https://", "http://")):
        return value
    try:
        return existing_file(value, info)
    except ValueError:
        raise ValueError(f"{value!r:.200} is neither a URL nor a file") from None


def _grpc_url(value: str) -> str:
    scheme, _, address = value.partition("://")
    host, _, port = address.rpartition(":")
    if scheme not in ("grpc", "grpcs") or not host or not port.isdigit():
        raise ValueError(f"{value!r:.200}: expected grpc://host:port or grpcs://host:port")
    return value


class AiServiceSettings(PeerSettings):
    """An AI service the infer step may call (`steps.ai_services.<ai-service-identifier>`): an Open
    Inference Protocol v2 server and the model, with the peer keys for TLS and authentication."""
    url: HttpUrl = Field(description="the server's base URL")
    model: Name = Field(DEFAULT_MODEL, description="the model's name on that server")
    device: Annotated[str | Path, BeforeValidator(_url_or_file)] | None = Field(
        None, description="for a server whose model metadata has no parameters (KServe): the model's Device in the "
                          "registry, its URL or a file holding it")
    device_ca_file: ExistingFile | None = Field(None, description="the CA of the registry's certificate, for a "
                                                                  "device URL")
    grpc_url: Annotated[str, AfterValidator(_grpc_url)] | None = Field(
        None, description="the server's OIP v2 gRPC port, grpc://host:port (grpcs:// with this entry's CA and client "
                          "certificate): inference then goes there, tensors as raw bytes; for KServe and MLServer, "
                          "which turn tensors sent over HTTP into Python lists (MLServer's HTTP takes JSON only)")

