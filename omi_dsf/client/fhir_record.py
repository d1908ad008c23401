"""What the DIC's FHIR store holds for a stored result: the study's ImagingStudy and its Endpoint(s)
(written by the return step, omi_dsf/transfer/fhir_store.py), read by FHIR search."""

from __future__ import annotations

import httpx

from omi_dsf.errors import UserError
from omi_dsf.peer import json_answer
from omi_dsf.transfer.fhir_store import DICOM_UID, search

COUNTED = ("Patient", "Consent", "ImagingStudy", "Endpoint", "DiagnosticReport", "Observation", "Device", "Provenance")


def _get(http: httpx.Client, url: str, what: str) -> dict:
    try:
        r = http.get(url, headers={"Accept": "application/fhir+json", "Cache-Control": "no-cache"})
    except httpx.HTTPError as exc:
        raise UserError(f"FHIR store: {what}: {type(exc).__name__}") from None
    if r.status_code != 200:
        raise UserError(f"FHIR store: {what}: HTTP {r.status_code}")
    return json_answer(r, f"FHIR store: {what}", UserError, "Bundle")


def study_record(http: httpx.Client, base: str, study_uid: str) -> dict | None:
    """The ImagingStudy of the study (by its DICOM UID identifier) with its series and Endpoints, or None."""
    base = base.rstrip("/")
    bundle = _get(http, f"{base}/ImagingStudy?identifier={search(DICOM_UID, f'urn:oid:{study_uid}')}"
                        f"&_include=ImagingStudy:endpoint", "ImagingStudy search")
    found = [e.get("resource") or {} for e in bundle.get("entry") or ()]
    studies = [r for r in found if r.get("resourceType") == "ImagingStudy"]
    if not studies:
        return None
    img = studies[0]
    endpoints = {f"Endpoint/{r.get('id')}": r for r in found if r.get("resourceType") == "Endpoint"}
    refs = [e.get("reference") for e in img.get("endpoint") or ()]
    return {
        "fhir_base": base,
        "imaging_study": f"ImagingStudy/{img.get('id')}",
        "series": [{"uid": s.get("uid"), "modality": (s.get("modality") or {}).get("code"),
                    "instances": s.get("numberOfInstances"),
                    "endpoint": [e.get("reference") for e in s.get("endpoint") or ()]} for s in img.get("series") or ()],
        "endpoints": [{"endpoint": ref, "connection_type": ((endpoints.get(ref) or {}).get("connectionType") or {})
                       .get("code"), "address": (endpoints.get(ref) or {}).get("address")} for ref in refs],
    }


def counts(http: httpx.Client, base: str) -> dict[str, int]:
    """How many resources of each type the store holds (the types OMI reads or writes)."""
    base = base.rstrip("/")
    return {t: int(_get(http, f"{base}/{t}?_summary=count", f"{t} count").get("total") or 0) for t in COUNTED}


def render(record: dict | None, base: str) -> str:
    if record is None:
        return f"  no ImagingStudy for the study in the FHIR store at {base}"
    lines = [f"  in the FHIR store at {record['fhir_base']}: {record['imaging_study']}"]
    for s in record["series"]:
        lines.append(f"    series {s['modality'] or '?':<4} {s['instances'] if s['instances'] is not None else '?':>4} "
                     f"instance(s)  {s['uid']}")
    for e in record["endpoints"]:
        lines.append(f"    {e['endpoint']}  {e['connection_type'] or '?'}  {e['address'] or '?'}")
    return "\n".join(lines)
