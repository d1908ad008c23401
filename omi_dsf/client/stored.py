"""The result objects as stored in the local PACS, read through the site's DICOMweb gateway (QIDO-RS)."""

from __future__ import annotations

import httpx

from omi_dsf.dicomweb_client import DicomwebClient, DicomwebError, DicomwebRefused
from omi_dsf.errors import UserError
from omi_dsf.peer import PeerTlsError, PeerUnreachable

SERIES_FIELDS = ("0008103E", "00080060", "0020000E", "00201209")


def _first(obj: dict, tag: str):
    values = (obj.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def stored_series(http: httpx.Client, service_root: str, study_uid: str) -> list[dict]:
    """Series of the stored study: uid, modality (SEG, SR, …), description, instance count."""
    dicomweb = DicomwebClient(http=http, url=service_root)
    try:
        found = dicomweb.search_for_series(study_uid, fields=SERIES_FIELDS)
    except (PeerUnreachable, PeerTlsError) as exc:
        raise UserError(f"gateway {service_root}: {exc}") from None
    except DicomwebRefused as exc:   # 404 too: a wrong gateway URL must not read as "not stored yet"
        raise UserError(f"gateway {service_root}: QIDO-RS series of the stored study: HTTP {exc.status}"
                        + (f": {exc.reason}" if exc.reason else "")) from None
    except DicomwebError as exc:     # 5xx, HTML, an object instead of a list
        raise UserError(f"gateway {service_root}: the QIDO-RS answer is not a DICOM JSON list of series "
                        f"({exc})") from None
    try:
        out = []
        for s in found:
            n = _first(s, "00201209")
            out.append({"series_instance_uid": _first(s, "0020000E"), "modality": _first(s, "00080060"),
                        "description": _first(s, "0008103E"), "instances": None if n is None else int(n)})
    except (ValueError, TypeError, AttributeError) as exc:   # odd values
        raise UserError(f"gateway {service_root}: the QIDO-RS answer is not a DICOM JSON list of series "
                        f"({type(exc).__name__})") from None
    return out
