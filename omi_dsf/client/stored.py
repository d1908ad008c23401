"""The result objects as stored in the local PACS, read through the site's DICOMweb gateway (QIDO-RS)."""

from __future__ import annotations

import httpx

from omi_dsf.errors import UserError

SERIES_FIELDS = ("0008103E", "00080060", "0020000E", "00201209")


def _first(obj: dict, tag: str):
    values = (obj.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def stored_series(http: httpx.Client, service_root: str, study_uid: str) -> list[dict]:
    """Series of the stored study: uid, modality (SEG, SR, …), description, instance count."""
    url = f"{service_root.rstrip('/')}/studies/{study_uid}/series"
    try:
        r = http.get(url, params=[("includefield", f) for f in SERIES_FIELDS],
                     headers={"Accept": "application/dicom+json"})
    except httpx.HTTPError as exc:
        raise UserError(f"gateway {service_root}: {type(exc).__name__}: {str(exc) or 'no answer'}") from None
    if r.status_code == 204 or (r.status_code == 200 and not r.content):
        return []
    if r.status_code != 200:   # 404 too: a wrong gateway URL must not read as "not stored yet"
        try:
            reason = str(r.json().get("error", ""))[:200]
        except (ValueError, AttributeError):
            reason = ""
        raise UserError(f"gateway {service_root}: QIDO-RS series of the stored study: HTTP {r.status_code}"
                        + (f": {reason}" if reason else ""))
    try:
        out = []
        for s in r.json():
            n = _first(s, "00201209")
            out.append({"series_instance_uid": _first(s, "0020000E"), "modality": _first(s, "00080060"),
                        "description": _first(s, "0008103E"), "instances": None if n is None else int(n)})
    except (ValueError, TypeError, AttributeError) as exc:   # HTML, an object, odd values
        raise UserError(f"gateway {service_root}: the QIDO-RS answer is not a DICOM JSON list of series "
                        f"({type(exc).__name__})") from None
    return out
