"""Checks of registered resources: valid FHIR R4 (fhir.resources R4B, as the project uses) and the
registry's own rules (owner, links), each failure naming the element at fault."""

from __future__ import annotations

import re
from functools import lru_cache

from omi_dsf.registry import definitions as d
from omi_dsf.registry.errors import forbidden, invalid, unprocessable

ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@lru_cache(maxsize=None)
def _model(rtype: str):
    from fhir.resources.R4B import get_fhir_model_class
    return get_fhir_model_class(rtype)


def _loc(rtype: str, loc: tuple) -> str:
    out = rtype
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def check_fhir(resource: object, where: str = "") -> dict:
    """The resource if it is valid FHIR of a registry type, else a 400 naming the first problem."""
    from pydantic import ValidationError

    prefix = f"{where}: " if where else ""
    if not isinstance(resource, dict):
        raise invalid(f"{prefix}expected a FHIR resource (JSON object)")
    rtype = resource.get("resourceType")
    if rtype not in d.RESOURCE_TYPES:
        raise invalid(f"{prefix}resourceType {rtype!r} is not registered here "
                      f"(registry types: {', '.join(d.RESOURCE_TYPES)})", "resourceType")
    null = _null_at(resource, rtype)
    if null:
        raise invalid(f"{prefix}{null}: null is not allowed in FHIR JSON (leave the element out)", null)
    rid = resource.get("id")
    if rid is not None and (not isinstance(rid, str) or not ID_RE.match(rid)):
        raise invalid(f"{prefix}{rtype}.id {rid!r} is not a valid FHIR id", f"{rtype}.id")
    try:
        _model(rtype).model_validate(resource)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        path = _loc(rtype, tuple(p for p in first["loc"] if p != "resourceType"))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise invalid(f"{prefix}not valid FHIR R4 {rtype}: {path}: {first['msg']}{more}", path) from None
    except (ValueError, TypeError, AttributeError) as exc:
        # fhir.resources raises these from some primitive checks, e.g. AttributeError for a JSON
        # boolean where a url belongs (Endpoint.address: false)
        raise invalid(f"{prefix}not valid FHIR R4 {rtype}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    return resource


def _null_at(node: object, where: str) -> str | None:
    """Where the first null is (FHIR JSON has none; the models would take one as absent)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        here = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}"
        if value is None:
            return here
        found = _null_at(value, here)
        if found:
            return found
    return None


def owner_of(resource: dict) -> str | None:
    """The DSF organization identifier the resource names as its owner."""
    rtype = resource["resourceType"]
    ref = {"HealthcareService": "providedBy", "Device": "owner", "Endpoint": "managingOrganization"}[rtype]
    ident = (resource.get(ref) or {}).get("identifier") or {}
    if ident.get("system", d.ORG_SID) != d.ORG_SID:
        return None
    return ident.get("value")


def check_owner(resource: dict, organization: str) -> None:
    rtype = resource["resourceType"]
    ref = {"HealthcareService": "providedBy", "Device": "owner", "Endpoint": "managingOrganization"}[rtype]
    owner = owner_of(resource)
    if owner is None:
        raise unprocessable(f"{rtype}.{ref} must name the provider by identifier "
                            f"(system {d.ORG_SID})", f"{rtype}.{ref}")
    if owner != organization:
        raise forbidden(f"{rtype}.{ref} is organization {owner!r}, but you authenticated as {organization!r}; "
                        "providers register and update their own entries only")


def identifiers(resource: dict) -> list[tuple[str, str]]:
    return [(i.get("system", ""), i["value"]) for i in resource.get("identifier", []) if i.get("value")]


def algorithm_ref(service: dict) -> str | None:
    for ext in service.get("extension", []):
        if ext.get("url") == d.EXT_ALGORITHM:
            return (ext.get("valueReference") or {}).get("reference")
    return None


def endpoint_kind(endpoint: dict) -> str:
    """'oip' for an Open Inference Protocol endpoint, 'dicomweb', or 'other'."""
    ct = endpoint.get("connectionType") or {}
    if ct.get("system") == d.CS_ENDPOINT_TYPE and ct.get("code") == d.OIP_V2:
        return "oip"
    if ct.get("system") == d.CS_HL7_CONNECTION and ct.get("code") in d.DICOMWEB_TYPES:
        return "dicomweb"
    return "other"


def model_name(device: dict) -> str | None:
    names = device.get("deviceName") or []
    for n in names:
        if n.get("type") == d.DEVICE_NAME_MODEL:
            return n.get("name")
    return names[0].get("name") if names else None


def device_property(device: dict, code: str) -> list[tuple[str, str]]:
    """(system, code) values of the Device's property of type `code` (modality, body-site)."""
    out = []
    for prop in device.get("property", []):
        if any(c.get("system") == d.CS_DEVICE_PROPERTY and c.get("code") == code
               for c in (prop.get("type") or {}).get("coding", [])):
            for vc in prop.get("valueCode", []):
                out += [(c.get("system", ""), c["code"]) for c in vc.get("coding", []) if c.get("code")]
    return out


def check_links(service: dict, resolve) -> None:
    """A HealthcareService must reference its Device and at least one OIP Endpoint, all resolvable.
    `resolve(reference)` gives the target resource or None."""
    alg = algorithm_ref(service)
    if not alg:
        raise unprocessable(f"HealthcareService needs extension {d.EXT_ALGORITHM} referencing its Device "
                            "(the algorithm)", "HealthcareService.extension")
    device = resolve(alg)
    if device is None or device.get("resourceType") != "Device":
        raise unprocessable(f"HealthcareService algorithm reference {alg!r} does not resolve to a Device "
                            "registered by you or in this Bundle", "HealthcareService.extension")
    if not model_name(device):
        raise unprocessable("Device.deviceName must give the Open Inference Protocol model name "
                            f"(type {d.DEVICE_NAME_MODEL})", "Device.deviceName")
    oip = 0
    for i, ref in enumerate(service.get("endpoint", [])):
        target = resolve(ref.get("reference", ""))
        if target is None or target.get("resourceType") != "Endpoint":
            raise unprocessable(f"HealthcareService.endpoint[{i}] {ref.get('reference')!r} does not resolve to "
                                "an Endpoint registered by you or in this Bundle", f"HealthcareService.endpoint[{i}]")
        oip += endpoint_kind(target) == "oip"
    if not oip:
        raise unprocessable("HealthcareService.endpoint must include an Endpoint with connectionType "
                            f"{d.CS_ENDPOINT_TYPE}|{d.OIP_V2}", "HealthcareService.endpoint")
