"""Configuration sections the project's HTTP servers share, checked with pydantic.

Strict types (a string is not a number, 1 is not true), unknown keys refused, file paths relative
to the configuration file and required to exist; every error is one line naming the key, e.g.
``registry.yaml: limits.max_body_mb: expected a number, got 'big'``.

    tls:
      certfile: server.pem
      keyfile: server.key
      keyfile_password_file: server.key-password    # optional
      client_ca: ca.pem                             # client certificates are checked against this CA
      require_client_cert: true                     # mutual TLS: the handshake fails without one
    auth:
      anonymous: false                              # true: no authentication at all (tests, demo)
      jwt:
        - {issuer: https://idp.example.org, key_file: idp.pem, audience: omi, algorithms: [RS256]}
    limits: {max_body_mb: 1, max_query_bytes: 8192, max_header_bytes: 16384, header_timeout: 10, body_timeout: 30,
             max_concurrent: 32}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from omi_dsf.errors import UserError

PUBLIC_KEY_ALGORITHMS = ["RS256", "ES256", "PS256", "EdDSA"]


class ConfigError(UserError, ValueError):
    """The configuration is wrong; the message names the key (one line, exit code 2 at the command line)."""


def _existing_file(value: Any, info: ValidationInfo) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError(f"expected a file name, got {value!r}")
    path = Path(value)
    if not path.is_absolute():
        path = Path((info.context or {}).get("base", ".")) / path
    if not path.is_file():
        raise ValueError(f"file {path} does not exist")
    return path


ExistingFile = Annotated[Path, BeforeValidator(_existing_file)]
Name = Annotated[str, Field(min_length=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


class Listen(Section):
    host: Name = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class TlsSettings(Section):
    certfile: ExistingFile
    keyfile: ExistingFile
    keyfile_password_file: ExistingFile | None = None
    client_ca: ExistingFile | None = None
    require_client_cert: bool = False

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
    issuer: Name                         # must equal the token's "iss"
    key_file: ExistingFile               # a PEM public key or certificate, or a JWKS JSON file
    audience: str | None = None          # then "aud" must match
    algorithms: list[Name] = Field(default_factory=lambda: list(PUBLIC_KEY_ALGORITHMS), min_length=1)

    @field_validator("algorithms")
    @classmethod
    def _public_key_only(cls, algs: list[str]) -> list[str]:
        if any(a.lower() == "none" or a.upper().startswith("HS") for a in algs):
            raise ValueError("only public-key algorithms are allowed (not none or HS*)")
        return algs


class AuthSettings(Section):
    anonymous: bool = False
    jwt: list[JwtIssuer] = Field(default_factory=list)

    def require_a_way_in(self, tls: TlsSettings | None) -> None:
        """Refuse to serve with no way in at all: anonymous is a choice, never a default."""
        if not self.anonymous and not self.jwt and not (tls and tls.require_client_cert):
            raise ValueError("no way in: set auth.anonymous: true, configure auth.jwt, "
                             "or tls.require_client_cert: true")


class Limits(Section):
    """What one request may cost; past a limit the answer names it (413, 414, 431, 408, 503)."""
    max_body_mb: float = Field(1.0, gt=0)        # request body (Content-Length checked before reading)
    max_query_bytes: int = Field(8192, ge=64)    # path and query string (414 above)
    max_header_bytes: int = Field(16384, ge=1024)  # request line and headers (431 above)
    header_timeout: float = Field(10.0, gt=0)    # seconds for a request's headers to arrive (408)
    body_timeout: float = Field(30.0, gt=0)      # seconds of silence while a body is read (408)
    max_concurrent: int = Field(32, ge=1)        # requests in progress at once (503 above)

    @property
    def max_body(self) -> int:
        return int(self.max_body_mb * (1 << 20))


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_MESSAGES = {"extra_forbidden": "unknown key", "missing": "required",
             "int_type": "expected an integer", "float_type": "expected a number", "bool_type": "expected true or false",
             "string_type": "expected a string", "list_type": "expected a list", "dict_type": "expected a mapping",
             "model_type": "expected a mapping", "model_attributes_type": "expected a mapping"}


def error_line(exc: ValidationError, where: str) -> str:
    """The first problem of a validation as one line: ``<where>: <key>: <what is wrong>``."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    msg = _MESSAGES.get(first["type"])
    if msg is None:
        msg = str(first["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if msg.startswith("Input should be"):
            msg = "must be" + msg.removeprefix("Input should be") + f", got {first.get('input')!r:.80}"
    elif first["type"] not in ("extra_forbidden", "missing"):
        msg += f", got {first.get('input')!r:.80}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    key = _where(loc)
    return f"{where}: {key + ': ' if key else ''}{msg}{more}".replace("\n", " ")


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: Any, base: Path, where: str) -> M:
    """`data` (a YAML document) as `model`; relative file names are relative to `base`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of keys to values")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: key {bad[0]!r} is not a name")
    try:
        return model.model_validate(data, context={"base": base})
    except ValidationError as exc:
        raise ConfigError(error_line(exc, where)) from None


def read_yaml(path: str | Path) -> Any:
    """A YAML file's document, or a one-line ConfigError (also for the gateway's configuration)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None


def load(model: type[M], path: str | Path) -> M:
    """A YAML configuration file as `model`, or a one-line ConfigError."""
    path = Path(path)
    return parse(model, read_yaml(path), path.resolve().parent, str(path))
