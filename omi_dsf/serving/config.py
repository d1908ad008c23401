"""Configuration sections the project's HTTP servers share (the gateway, the registry, the AI
service): listen, tls, auth, limits; models on omi_dsf.config (strict types, unknown keys refused,
files relative to the configuration file and required to exist, errors naming the key)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from omi_dsf.config import ExistingFile, Name, Section

PUBLIC_KEY_ALGORITHMS = ["RS256", "ES256", "PS256", "EdDSA"]


class Listen(Section):
    host: Name = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")


class TlsSettings(Section):
    """Omit for plain HTTP."""
    certfile: ExistingFile = Field(description="PEM server certificate (chain)")
    keyfile: ExistingFile = Field(description="PEM key of certfile")
    keyfile_password_file: ExistingFile | None = Field(None, description="file holding keyfile's password")
    client_ca: ExistingFile | None = Field(None, description="PEM CA(s) client certificates are checked against")
    require_client_cert: bool = Field(False, description="mutual TLS: the handshake fails without a client "
                                                         "certificate (needs client_ca)")

    @model_validator(mode="after")
    def _client_ca_for_mtls(self) -> "TlsSettings":
        if self.require_client_cert and self.client_ca is None:
            raise ValueError("require_client_cert needs client_ca (the CA that signs the client certificates)")
        return self

    @property
    def keyfile_password(self) -> str | None:
        if self.keyfile_password_file is None:
            return None
        return self.keyfile_password_file.read_text().strip()


class JwtIssuer(Section):
    issuer: Name = Field(description="must equal the token's iss")
    key_file: ExistingFile = Field(description="a PEM public key or certificate, or a JWKS JSON file")
    audience: str | None = Field(None, description="then the token's aud must match")
    algorithms: list[Name] = Field(default_factory=lambda: list(PUBLIC_KEY_ALGORITHMS), min_length=1,
                                   description="accepted signature algorithms (public-key ones only)")

    @field_validator("key_file")
    @classmethod
    def _key_loads(cls, path: Path) -> Path:
        """Loaded now, so that a wrong file is this error and not a traceback at start-up."""
        from types import SimpleNamespace

        from omi_dsf.serving.auth import key_of
        try:
            key_of(SimpleNamespace(key_file=path))
        except Exception as exc:  # noqa: BLE001 - cryptography's and pyjwt's reasons vary
            raise ValueError(f"{path} is not a PEM public key, certificate or JWKS ({type(exc).__name__})") from None
        return path

    @field_validator("algorithms")
    @classmethod
    def _public_key_only(cls, algs: list[str]) -> list[str]:
        if any(a.lower() == "none" or a.upper().startswith("HS") for a in algs):
            raise ValueError("only public-key algorithms are allowed (not none or HS*)")
        return algs


class AuthSettings(Section):
    """At least one way in: anonymous, jwt, or mutual TLS."""
    anonymous: bool = Field(False, description="true: no authentication at all (tests, demo)")
    jwt: list[JwtIssuer] = Field(default_factory=list, description="bearer tokens these issuers sign are accepted")

    def require_a_way_in(self, tls: TlsSettings | None) -> None:
        """Refuse to serve with no way in at all: anonymous is a choice, never a default."""
        if not self.anonymous and not self.jwt and not (tls and tls.require_client_cert):
            raise ValueError("no way in: set auth.anonymous: true, configure auth.jwt, "
                             "or tls.require_client_cert: true")


class Limits(Section):
    """What one request may cost; past a limit the answer names it (413, 414, 431, 408, 503)."""
    max_body_mb: float = Field(1.0, gt=0, description="request body in MiB (Content-Length checked before reading; 413)")
    max_query_bytes: int = Field(8192, ge=64, description="path and query string (414 above)")
    max_header_bytes: int = Field(16384, ge=1024, description="request line and headers (431 above)")
    header_timeout: float = Field(10.0, gt=0, description="seconds for a request's headers to arrive (408)")
    body_timeout: float = Field(30.0, gt=0, description="seconds of silence while a body is read (408)")
    max_concurrent: int = Field(32, ge=1, description="requests in progress at once (503 above)")

    @property
    def max_body(self) -> int:
        return int(self.max_body_mb * (1 << 20))
