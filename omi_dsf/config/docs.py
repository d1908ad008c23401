"""Option tables for the docs, generated from the configuration models.

A table sits in a docs page between two markers naming the model (and optionally a key prefix and
fields to list without their sub-keys)::

    <!-- options: omi_dsf.dicomweb.config:GatewayConfig -->
    | key | type | default | what |
    ...
    <!-- /options -->

`python -m omi_dsf config-docs` rewrites every table from the models; `--check` only reports the
pages whose tables are out of date (a unit test runs it).
"""

from __future__ import annotations

import importlib
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = re.compile(r"(<!-- options: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /options -->)", re.S)
HEADER = "| key | type | default | what |\n|---|---|---|---|\n"


def _model(ref: str) -> type[BaseModel]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _strip_annotated(tp: Any) -> tuple[Any, list]:
    meta: list = []
    while typing.get_origin(tp) is typing.Annotated:
        args = typing.get_args(tp)
        tp, meta = args[0], meta + list(args[1:])
    return tp, meta


def _members(tp: Any) -> list[Any]:
    """The alternatives of a union (None left out), else [tp]."""
    bare, _ = _strip_annotated(tp)
    if typing.get_origin(bare) in (Union, types.UnionType):
        return [a for a in typing.get_args(bare) if a is not type(None)]
    return [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


# what a value checked by one of these validators is, in the tables
_VALIDATED = {"existing_file": "file (must exist)", "_existing_dir": "folder (must exist)",
              "_database": "file or postgresql:// URL", "_relative": "path", "_url_or_file": "URL or file (must exist)"}


def _type_name(tp: Any, extra: list | None = None) -> str:
    names = []
    for member in _members(tp):
        bare, meta = _strip_annotated(member)
        meta = meta + list(extra or ())
        validators = " ".join(getattr(getattr(m, "func", None), "__name__", "") for m in meta)
        origin = typing.get_origin(bare)
        label = next((text for name, text in _VALIDATED.items() if name in validators.split()), None)
        if label:
            names.append(label)
        elif origin is Literal:
            names.append(" \\| ".join(f"`{a}`" for a in typing.get_args(bare)))
        elif origin in (list, tuple):
            names.append(f"list of {_type_name(typing.get_args(bare)[0])}")
        elif origin is dict:
            names.append("mapping")
        elif _is_model(bare):
            names.append("mapping")
        elif bare is bool:
            names.append("true/false")
        elif bare is int:
            names.append("integer")
        elif bare is float:
            names.append("number")
        elif bare is str:
            names.append("URL" if "https" in repr(meta) else "text")
        else:
            names.append(getattr(bare, "__name__", str(bare)))
    return " or ".join(dict.fromkeys(names))


def _default(field: FieldInfo, given: Any = PydanticUndefined) -> str:
    value = given
    if value is PydanticUndefined:
        if field.is_required():
            return "required"
        value = field.get_default(call_default_factory=True)
    if value is None or _is_model(type(value)) or isinstance(value, dict):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]" if value else "[]"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def _describe(field: FieldInfo) -> str:
    return " ".join((field.description or "").split()).replace("|", "\\|")


def rows(model: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None,
         skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, description) per option of `model`, nested blocks flattened to key paths.
    The peer keys a model inherits unchanged from PeerSettings are one row (they have a table of their own)."""
    from omi_dsf.config import PeerSettings

    peer_keys = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        if model is not PeerSettings and _inherited(model, PeerSettings, name):
            peer_keys.append(name)
            continue
        given = getattr(defaults, name, PydanticUndefined) if defaults is not None else PydanticUndefined
        yield key, _type_name(field.annotation, field.metadata), _default(field, given), _describe(field)
        if key in skip:
            continue
        nested: list[Iterator] = []
        for member in _members(field.annotation):
            bare, _ = _strip_annotated(member)
            origin = typing.get_origin(bare)
            if _is_model(bare):
                default = given if given is not PydanticUndefined else (
                    None if field.is_required() else field.get_default(call_default_factory=True))
                nested.append(rows(bare, f"{key}.", default if isinstance(default, bare) else None, skip))
            elif origin is dict:
                for alt in _members(typing.get_args(bare)[1]):
                    alt_bare, _ = _strip_annotated(alt)
                    if _is_model(alt_bare):
                        nested.append(rows(alt_bare, f"{key}.<name>.", None, skip))
            elif origin is list:
                item, _ = _strip_annotated(typing.get_args(bare)[0])
                if _is_model(item):
                    nested.append(rows(item, f"{key}[].", None, skip))
        yield from _merged(nested)
    if peer_keys:
        yield (f"{prefix}{peer_keys[0]}, …", "the peer keys", "",
               f"{', '.join(peer_keys)}: the TLS trust and credentials of every peer (see the peer keys)")


def _inherited(model: type[BaseModel], base: type[BaseModel], name: str) -> bool:
    """Whether `model`'s field `name` is `base`'s, unchanged."""
    mine, theirs = model.model_fields[name], base.model_fields.get(name)
    return theirs is not None and (mine.annotation, mine.default, mine.description) == (
        theirs.annotation, theirs.default, theirs.description)


def _merged(alternatives: list[Iterator]) -> Iterator[tuple[str, str, str, str]]:
    """The rows of a union's alternatives (e.g. the kinds of a provider): each key once, its
    types, defaults and descriptions joined where they differ."""
    merged: dict[str, list[list[str]]] = {}
    for alternative in alternatives:
        for row in alternative:
            cells = merged.setdefault(row[0], [[], [], []])
            for cell, value in zip(cells, row[1:]):
                if value and value not in cell:
                    cell.append(value)
    for key, (kinds, defaults, descriptions) in merged.items():
        yield key, " \\| ".join(kinds), defaults[0] if len(defaults) == 1 else "", "; ".join(descriptions)


def table(spec: str) -> str:
    """The table a marker's spec names: `module:Model [prefix=P] [skip=a,b]`."""
    parts = spec.split()
    opts = dict(p.split("=", 1) for p in parts[1:])
    skip = frozenset(k for k in opts.get("skip", "").split(",") if k)
    lines = [f"| `{key}` | {kind} | {default} | {what} |" for key, kind, default, what
             in rows(_model(parts[0]), opts.get("prefix", ""), None, skip)]
    return HEADER + "\n".join(lines) + "\n"


def render(text: str) -> str:
    """`text` (a docs page) with every options table generated anew."""
    return MARKER.sub(lambda m: m.group(1) + table(m.group("spec")) + m.group(4), text)


def pages(root: Path) -> list[Path]:
    return sorted(p for p in [*root.glob("docs/*.md"), root / "README.md"] if p.is_file() and MARKER.search(p.read_text()))


def update(root: Path, check: bool = False) -> list[Path]:
    """The pages whose tables differ from the models; rewritten unless `check`."""
    stale = []
    for page in pages(root):
        text = page.read_text()
        new = render(text)
        if new != text:
            stale.append(page)
            if not check:
                page.write_text(new)
    return stale
