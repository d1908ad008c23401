"""The registry's search parameters: declared once here, served in the CapabilityStatement, documented
in docs/registry.md, and the only ones accepted (anything else is a 400 naming the parameter).

The FHIR server does the searching: each parameter names what the server searches with (a FHIR R4
parameter, or one of the registry's SearchParameters in store.SEARCH_PARAMETERS; a HealthcareService's
modality and body site are chained through its algorithm Device). `health` is the registry's own
(its checks live in the registry): it becomes an `_id` list of the services in that state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from omi_dsf.registry import definitions as d
from omi_dsf.registry.errors import invalid


@dataclass(frozen=True)
class Param:
    name: str
    type: str                      # token | string
    description: str
    server: str                    # the FHIR server's parameter ("" : the registry's own, health)


COMMON = [
    Param("_id", "token", "logical id", "_id"),
    Param("identifier", "token", "a business identifier of the resource", "identifier"),
    Param("organization", "token", "the provider organization (DSF organization identifier, system "
          f"{d.ORG_SID})", "omi-organization"),
]

PARAMS: dict[str, dict[str, Param]] = {
    "HealthcareService": {p.name: p for p in COMMON + [
        Param("service-type", "token", "HealthcareService.type, e.g. "
              f"{d.CS_OMI_SERVICE_TYPE}|segmentation", "service-type"),
        Param("modality", "token", "a modality the algorithm accepts (Device property modality; DICOM DCM codes "
              "such as CT, MR)", "omi-algorithm.omi-modality"),
        Param("body-site", "token", "a body site the algorithm works on (Device property body-site; SNOMED CT or "
              "DICOM body part codes)", "omi-algorithm.omi-body-site"),
        Param("active", "token", "true | false", "active"),
        Param("health", "token", "result of the registry's checks: up | degraded | down | unknown", ""),
        Param("name", "string", "the service name", "name"),
    ]},
    "Device": {p.name: p for p in COMMON + [
        Param("modality", "token", "Device property modality", "omi-modality"),
        Param("body-site", "token", "Device property body-site", "omi-body-site"),
        Param("model-name", "string", "the Open Inference Protocol model name", "omi-model-name"),
    ]},
    "Endpoint": {p.name: p for p in COMMON + [
        Param("connection-type", "token", f"Endpoint.connectionType (e.g. {d.CS_ENDPOINT_TYPE}|{d.OIP_V2}, "
              "dicom-wado-rs)", "connection-type"),
        Param("status", "token", "Endpoint.status", "status"),
    ]},
}
# Not filters: how the result is shaped.
CONTROL = {"_count": "page size (1 to 1000, default 100; the FHIR server may give fewer per page)",
           "_offset": "entries to skip (paging)",
           "_include": "HealthcareService:algorithm and/or HealthcareService:endpoint",
           "_format": "json (the only format served)"}
INCLUDES = {"HealthcareService:algorithm": "HealthcareService:omi-algorithm",
            "HealthcareService:endpoint": "HealthcareService:endpoint"}


@dataclass
class Query:
    rtype: str
    server: list[tuple[str, str]]               # the FHIR server's parameters, in its names
    health: list[list[str]]                     # health filters (AND of ORs)
    count: int = 100
    offset: int = 0


def parse(rtype: str, items: Iterable[tuple[str, str]]) -> Query:
    """The registry's search as the FHIR server's, or a 400 naming the parameter at fault."""
    declared = PARAMS[rtype]
    q = Query(rtype, [], [])
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
                includes.append(INCLUDES[value])
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
        if not param.server:
            q.health.append(values)
        else:
            q.server.append((param.server + (f":{modifier}" if modifier else ""), ",".join(values)))
    q.server += [("_include", i) for i in dict.fromkeys(includes)]
    return q


def _int(key: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or not lo <= n <= hi:
        raise invalid(f"{key}={value!r} must be an integer from {lo} to {hi}", key)
    return n
