"""Typed configuration: the base every configuration model of the project builds on (pydantic).

Each option is a model field with its type, default and description (`Field(description=...)`);
the option tables in the docs are generated from the models (`python -m omi_dsf config-docs`).
Strict types (a string is not a number, 1 is not true), unknown keys refused, file names relative
to the configuration file's folder wherever they appear; every error is one line naming the key,
e.g. ``site.yaml: steps.providers.ai-org.ca_file: file /etc/omi/ca.pem does not exist``.

The models live in the part they configure (dicomweb, registry, inference, serving, deid, consent,
transfer, steps, worker); the pieces more than one part uses are here: `Section`, the file and path
types, `PeerSettings` (the keys of every HTTP peer), and `parse` / `load`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (BaseModel, TypeAdapter, BeforeValidator, ConfigDict, Field, ValidationError,
                      Tag, ValidationInfo, model_validator)

from omi_dsf.database import resolve
from omi_dsf.errors import UserError


class ConfigError(UserError, ValueError):
    """The configuration is wrong; the message names the key (one line, exit code 2 at the command line)."""


def _base(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("base", "."))


def _relative(value: Any, info: ValidationInfo) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError(f"expected a file name, got {value!r}")
    path = Path(os.fspath(value)).expanduser()
    return path if path.is_absolute() else _base(info) / path


def existing_file(value: Any, info: ValidationInfo) -> Path:
    """A file that must exist (a validator: relative to the configuration file's folder)."""
    path = _relative(value, info)
    if not path.is_file():
        raise ValueError(f"file {path} does not exist")
    return path


def _existing_dir(value: Any, info: ValidationInfo) -> Path:
    path = _relative(value, info)
    if not path.is_dir():
        raise ValueError(f"folder {path} does not exist")
    return path


def _database(value: Any, info: ValidationInfo) -> str:
    """A database (omi_dsf/database.py): a postgresql:// URL as it is, a SQLite file (a path or
    sqlite:///FILE) relative to the configuration file's folder."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a string (a file name or a postgresql:// URL), got {value!r}")
    return resolve(value, _base(info))


ExistingFile = Annotated[Path, BeforeValidator(existing_file)]
"""A file that must exist; relative names are relative to the configuration file's folder."""
ExistingDir = Annotated[Path, BeforeValidator(_existing_dir)]
"""A folder that must exist; relative names are relative to the configuration file's folder."""
FilePath = Annotated[Path, BeforeValidator(_relative)]
"""A file or folder that may not exist yet (written by us); relative to the configuration file's folder."""
Database = Annotated[str, BeforeValidator(_database)]
"""A SQLite file (relative to the configuration file's folder) or a postgresql:// URL."""
Name = Annotated[str, Field(min_length=1)]
HttpUrl = Annotated[str, Field(pattern=r"^https?://[^/\s]+")]


class Section(BaseModel):
    """A block of a configuration file: unknown keys are errors, types are strict."""
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


DEPRECATED_PEER_KEYS = {"verify": "ca_file", "cert": "client_cert", "key": "client_key"}


class PeerSettings(Section):
    """The keys of every HTTP peer (another site's gateway, an AI service, a TTP, a FHIR server):
    the TLS trust and credentials; the URL key is the using model's (url, gateway_url, wsdl)."""
    ca_file: ExistingFile | None = Field(
        None, description="PEM file with the CA(s) that sign the peer's server certificate (default: the "
                          "system CAs); verification is always on")
    client_cert: ExistingFile | None = Field(None, description="PEM client certificate for mutual TLS (with client_key)")
    client_key: ExistingFile | None = Field(None, description="PEM key of client_cert")
    client_key_password_file: ExistingFile | None = Field(None, description="file holding client_key's password")
    token_file: ExistingFile | None = Field(
        None, description="file holding a bearer token (read when a client is opened; never in the YAML)")
    timeout: float | None = Field(None, gt=0, description="seconds per HTTP request (default per use: 60-120; an AI "
                                                                 "service ai_timeout_s; a pseudonym service 10)")
    proxy: str | None = Field(None, description="an explicit proxy URL; the environment's proxy and CA "
                                                "variables are never used")

    @model_validator(mode="before")
    @classmethod
    def _deprecated_keys(cls, data: Any) -> Any:
        """verify: PATH / cert / key, the keys DICOMweb sources and sinks and pseudonym providers took
        before, read as ca_file / client_cert / client_key."""
        if not isinstance(data, dict) or not any(k in data for k in DEPRECATED_PEER_KEYS):
            return data
        data = dict(data)
        for old, new in DEPRECATED_PEER_KEYS.items():
            if old not in data:
                continue
            value = data.pop(old)
            logging.getLogger("omi_dsf.config").warning("the peer key %r is deprecated: write %s instead", old, new)
            if old == "verify":
                if value is False:
                    raise ValueError("verify: false is not supported (verification is always on); give the "
                                     "peer's CA as ca_file")
                if value is True or value is None:
                    continue
            data.setdefault(new, value)
        return data

    @model_validator(mode="after")
    def _key_with_cert(self):
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("client_cert and client_key go together")
        return self

    def peer(self, url: str, where: str, timeout: float = 60.0):
        """The `omi_dsf.peer.Peer` these settings describe, at `url` (`where`: the key path, for messages)."""
        from omi_dsf.peer import Peer

        def s(p: Path | None) -> str | None:
            return str(p) if p is not None else None
        return Peer(url=str(url or "").rstrip("/"), ca_file=s(self.ca_file), client_cert=s(self.client_cert),
                    client_key=s(self.client_key), client_key_password_file=s(self.client_key_password_file),
                    token_file=s(self.token_file), timeout=self.timeout or timeout, proxy=self.proxy, where=where)


# -- errors as one line ---------------------------------------------------------------------------------

def key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and (part.startswith("function-") or part == "[key]" or part.startswith("=")):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def tag(kind: str) -> Tag:
    """The tag of one model of a tagged union (`Discriminator`); left out of key paths in messages."""
    return Tag(f"={kind}")


_SUBKEY = re.compile(r"^([A-Za-z_][\w.\[\]-]*): (.+)$", re.S)
_MESSAGES = {"extra_forbidden": "unknown key", "missing": "required",
             "int_type": "expected an integer", "float_type": "expected a number", "bool_type": "expected true or false",
             "string_type": "expected a string", "list_type": "expected a list", "dict_type": "expected a mapping",
             "model_type": "expected a mapping", "model_attributes_type": "expected a mapping"}


def error_line(exc: ValidationError, where: str) -> str:
    """The first problem of a validation as one line: ``<where>: <key>: <what is wrong>``."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = tuple(first["loc"])
    msg = _MESSAGES.get(first["type"])
    if first["type"] == "invalid_kind":   # a tagged union: the key that chooses (type, kind) is wrong
        ctx, given = first.get("ctx") or {}, first.get("input")
        loc += (ctx.get("key", "kind"),)
        value = given.get(ctx.get("key", "kind")) if isinstance(given, dict) else given
        msg = f"must be one of {ctx.get('expected')}, got {value!r:.80}"
    elif msg is None:
        msg = str(first["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if msg.startswith("Input should be"):
            msg = "must be" + msg.removeprefix("Input should be") + f", got {first.get('input')!r:.80}"
        elif first["type"] == "too_short" and isinstance(first.get("input"), (dict, list)):
            msg = "must not be empty"
        elif first["type"] == "string_pattern_mismatch" and "https" in str((first.get("ctx") or {}).get("pattern")):
            scheme = "http(s)" if "https?" in first["ctx"]["pattern"] else "https"
            msg = f"must be an {scheme} URL, got {first.get('input')!r:.80}"
    elif first["type"] not in ("extra_forbidden", "missing"):
        msg += f", got {first.get('input')!r:.80}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    sub = _SUBKEY.match(msg) if first["type"] == "value_error" else None
    if sub:   # a model's own check naming one of its keys: "path: required for kind folder"
        loc, msg = loc + (sub.group(1),), sub.group(2)
    key = key_path(loc)
    prefix = f"{where}: " if where else ""
    return f"{prefix}{key + ': ' if key else ''}{msg}{more}".replace("\n", " ")


# -- reading ----------------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: Any, base: Path = Path("."), where: str = "") -> M:
    """`data` (a YAML document) as `model`; relative file names are relative to `base`."""
    where = where or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of keys to values")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: key {bad[0]!r} is not a name")
    try:
        if isinstance(model, type) and issubclass(model, BaseModel):
            return model.model_validate(data, context={"base": base})
        return TypeAdapter(model).validate_python(data, context={"base": base})   # a union of models
    except ValidationError as exc:
        raise ConfigError(error_line(exc, where)) from None


def read_yaml(path: str | Path) -> Any:
    """A YAML file's document, or a one-line ConfigError."""
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


__all__ = ["ConfigError", "Database", "ExistingDir", "ExistingFile", "FilePath", "HttpUrl", "Name",
           "PeerSettings", "Section", "error_line", "key_path", "load", "parse", "read_yaml"]
