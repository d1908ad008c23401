"""The registry's search parameters: declared once here, served in the CapabilityStatement, documented
in docs/registry.md, and the only ones accepted (anything else is a 400 naming the parameter).

Token values: `code`, `system|code`, or `|code` (no system); a comma means OR, a repeated parameter
AND. String values match case-insensitively at the start, or anywhere with `:contains`.
The registry holds tens to hundreds of services, so matching runs over the stored resources in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from omi_dsf.registry import definitions as d
from omi_dsf.registry import validation as v
from omi_dsf.registry.errors import invalid

Tokens = list[tuple[str, str]]


@dataclass(frozen=True)
class Param:
    name: str
    type: str                      # token | string
    description: str
    values: Callable[[dict, "Context"], Iterable]   # (system, code) pairs or strings


@dataclass
class Context:
    """What a HealthcareService's search values depend on besides itself."""
    resolve: Callable[[str], dict | None]   # "Device/x" -> resource
    health: Callable[[str], str]            # service id -> up | degraded | down | unknown


def _codings(concepts: Iterable[dict]) -> Tokens:
    return [(c.get("system", ""), c["code"]) for cc in concepts for c in (cc or {}).get("coding", []) if c.get("code")]


def _ids(r: dict) -> Tokens:
    return v.identifiers(r)


def _device(service: dict, ctx: Context) -> dict:
    ref = v.algorithm_ref(service)
    return (ctx.resolve(ref) if ref else None) or {}


def _org(r: dict, _ctx=None) -> Tokens:
    owner = v.owner_of(r)
    return [(d.ORG_SID, owner)] if owner else []


COMMON = [
    Param("_id", "token", "logical id", lambda r, c: [("", r["id"])]),
    Param("identifier", "token", "a business identifier of the resource", lambda r, c: _ids(r)),
    Param("organization", "token", "the provider organization (DSF organization identifier, system "
          f"{d.ORG_SID})", _org),
]

PARAMS: dict[str, dict[str, Param]] = {
    "HealthcareService": {p.name: p for p in COMMON + [
        Param("service-type", "token", "HealthcareService.type, e.g. "
              f"{d.CS_OMI_SERVICE_TYPE}|segmentation", lambda r, c: _codings(r.get("type", []))),
        Param("modality", "token", "a modality the algorithm accepts (Device property modality; DICOM DCM codes "
              "such as CT, MR)", lambda r, c: v.device_property(_device(r, c), "modality")),
        Param("body-site", "token", "a body site the algorithm works on (Device property body-site; SNOMED CT or "
              "DICOM body part codes)", lambda r, c: v.device_property(_device(r, c), "body-site")),
        Param("active", "token", "true | false", lambda r, c: [("", "true" if r.get("active", True) else "false")]),
        Param("health", "token", "result of the registry's checks: up | degraded | down | unknown",
              lambda r, c: [("", c.health(r["id"]))]),
        Param("name", "string", "the service name", lambda r, c: [r.get("name", "")]),
    ]},
    "Device": {p.name: p for p in COMMON + [
        Param("modality", "token", "Device property modality", lambda r, c: v.device_property(r, "modality")),
        Param("body-site", "token", "Device property body-site", lambda r, c: v.device_property(r, "body-site")),
        Param("model-name", "string", "the Open Inference Protocol model name",
              lambda r, c: [v.model_name(r) or ""]),
    ]},
    "Endpoint": {p.name: p for p in COMMON + [
        Param("connection-type", "token", f"Endpoint.connectionType (e.g. {d.CS_ENDPOINT_TYPE}|{d.OIP_V2}, "
              "dicom-wado-rs)", lambda r, c: _codings([{"coding": [r.get("connectionType") or {}]}])),
        Param("status", "token", "Endpoint.status", lambda r, c: [("", r.get("status", ""))]),
    ]},
}
# Not filters: how the result is shaped.
CONTROL = {"_count": "page size (1 to 1000, default 100)", "_offset": "entries to skip (paging)",
           "_include": "HealthcareService:algorithm and/or HealthcareService:endpoint",
           "_format": "json (the only format served)"}
INCLUDES = {"HealthcareService:algorithm", "HealthcareService:endpoint"}


@dataclass
class Query:
    rtype: str
    filters: list[tuple[Param, str | None, list[str]]]   # (param, modifier, OR-values)
    count: int = 100
    offset: int = 0
    includes: tuple[str, ...] = ()


def parse(rtype: str, items: Iterable[tuple[str, str]]) -> Query:
    declared = PARAMS[rtype]
    q = Query(rtype, [])
    includes = []
    for key, value in items:
        name, _, modifier = key.partition(":")
        if name in CONTROL:
            if name == "_count":
                q.count = _int(key, value, 1, 1000)
            elif name == "_offset":
                q.offset = _int(key, value, 0, 10**9)
            elif name == "_include":
                if rtype != "HealthcareService" or value not in INCLUDES:
                    raise invalid(f"_include={value!r} is not supported for {rtype} "
                                  f"(supported: {', '.join(sorted(INCLUDES))} on HealthcareService)", "_include")
                includes.append(value)
            elif value not in ("json", "application/fhir+json", "application/json"):
                raise invalid(f"_format={value!r} is not supported (only json)", "_format")
            continue
        param = declared.get(name)
        if param is None:
            raise invalid(f"unknown search parameter {name!r} for {rtype} "
                          f"(supported: {', '.join(sorted(declared))}, {', '.join(CONTROL)})", name)
        allowed = {"token": {""}, "string": {"", "contains", "exact"}}[param.type]
        if modifier not in allowed:
            raise invalid(f"search parameter {name!r} does not support modifier ':{modifier}'", key)
        values = [x for x in value.split(",") if x != ""]
        if not values:
            raise invalid(f"search parameter {name!r} has an empty value", name)
        q.filters.append((param, modifier or None, values))
    q.includes = tuple(dict.fromkeys(includes))
    return q


def _int(key: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or not lo <= n <= hi:
        raise invalid(f"{key}={value!r} must be an integer from {lo} to {hi}", key)
    return n


def _token_match(wanted: str, have: Tokens) -> bool:
    if "|" in wanted:
        system, _, code = wanted.partition("|")
        return any(s == system and c == code for s, c in have)
    return any(c == wanted for _, c in have)


def _string_match(wanted: str, modifier: str | None, have: Iterable[str]) -> bool:
    w = wanted.casefold()
    for h in have:
        h = (h or "")
        if modifier == "exact":
            if h == wanted:
                return True
        elif modifier == "contains":
            if w in h.casefold():
                return True
        elif h.casefold().startswith(w):
            return True
    return False


def matches(resource: dict, query: Query, ctx: Context) -> bool:
    for param, modifier, values in query.filters:
        have = list(param.values(resource, ctx))
        if param.type == "token":
            ok = any(_token_match(w, have) for w in values)
        else:
            ok = any(_string_match(w, modifier, have) for w in values)
        if not ok:
            return False
    return True
