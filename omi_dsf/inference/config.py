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

from pydantic import Field, model_validator

from omi_dsf.serving.config import AuthSettings, Limits, Listen, Section, TlsSettings

DEFAULT_PORT = 8500


class AiLimits(Limits):
    max_body_mb: float = Field(320.0, gt=0)
    max_json_mb: float = Field(16.0, gt=0)
    max_concurrent: int = Field(16, ge=1)
    max_concurrent_infer: int = Field(2, ge=1)

    @property
    def max_json(self) -> int:
        return int(self.max_json_mb * (1 << 20))


class ServiceConfig(Section):
    listen: Listen = Field(default_factory=lambda: Listen(port=DEFAULT_PORT))
    tls: TlsSettings | None = None
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: AiLimits = Field(default_factory=AiLimits)
    max_slices: int = Field(600, ge=3)

    @model_validator(mode="after")
    def _a_way_in(self) -> "ServiceConfig":
        self.auth.require_a_way_in(self.tls)
        return self

    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.listen.host}:{self.listen.port}"
