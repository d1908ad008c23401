"""The FHIR↔DICOM link: an ImagingStudy (MII imaging module profile) for a study found through a
DICOMweb gateway (QIDO-RS), whose `endpoint` references the Endpoint of the node that holds it.

The Endpoint is the gateway's own (omi_dsf.dicomweb.endpoint), so a FHIR client that finds the
ImagingStudy knows where to fetch the images (WADO-RS at Endpoint.address + /studies/<uid>).
"""

from __future__ import annotations

import datetime as dt

import httpx

from omi_dsf.dicomweb_client import DicomwebClient, DicomwebError
from omi_dsf.peer import PeerTlsError, PeerUnreachable

MII_IMAGING_STUDY = ("https://www.medizininformatik-initiative.de/fhir/ext/modul-bildgebung/"
                     "StructureDefinition/mii-pr-bildgebung-bildgebungsstudie")
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
# DICOM Body Part Examined → SNOMED CT (PS3.16 Annex L, the few parts OMI services use)
BODY_PARTS = {"CHEST": ("51185008", "Thoracic structure"), "THORAX": ("51185008", "Thoracic structure"),
              "LUNG": ("39607008", "Lung structure"), "HEAD": ("69536005", "Head structure"),
              "BRAIN": ("12738006", "Brain structure"), "ABDOMEN": ("818983003", "Abdomen"),
              "PELVIS": ("816092008", "Pelvis"), "BREAST": ("76752008", "Breast structure")}
QIDO_STUDY_FIELDS = ("00080020", "00080030", "00081030", "00080061", "00201206", "00201208")


class QidoError(Exception):
    """The gateway did not answer the query."""


def _first(obj: dict, tag: str):
    values = (obj.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _all(obj: dict, tag: str) -> list:
    return list((obj.get(tag) or {}).get("Value") or [])


def _started(date: str | None) -> str | None:
    # DICOM study times are local without a zone, and FHIR dateTime with a time needs one: date only
    if not date or len(date) != 8:
        return None
    try:
        return dt.date(int(date[:4]), int(date[4:6]), int(date[6:8])).isoformat()
    except ValueError:
        return None


def _body_site(value: str | None) -> dict | None:
    if not value:
        return None
    code = BODY_PARTS.get(value.upper())
    return {"system": SNOMED, "code": code[0], "display": code[1]} if code else {"display": value}


def imaging_study(study: dict, endpoint_reference: str, patient_reference: str,
                  series: list[dict] | None = None) -> dict:
    """An ImagingStudy from a QIDO-RS study result (DICOM JSON) and optionally its series results."""
    uid = _first(study, "0020000D")
    if not uid:
        raise ValueError("QIDO-RS result has no StudyInstanceUID (0020000D)")
    res = {
        "resourceType": "ImagingStudy",
        "meta": {"profile": [MII_IMAGING_STUDY]},
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
        "subject": {"reference": patient_reference},
        "endpoint": [{"reference": endpoint_reference}],
    }
    modalities = _all(study, "00080061") or sorted({_first(s, "00080060") for s in series or [] if _first(s, "00080060")})
    if modalities:
        res["modality"] = [{"system": DCM, "code": m} for m in modalities]
    started = _started(_first(study, "00080020"))
    if started:
        res["started"] = started
    for tag, key in (("00201206", "numberOfSeries"), ("00201208", "numberOfInstances")):
        n = _first(study, tag)
        if n is not None:
            res[key] = int(n)
    if _first(study, "00081030"):
        res["description"] = str(_first(study, "00081030"))
    out_series = []
    for s in series or []:
        suid, modality = _first(s, "0020000E"), _first(s, "00080060")
        if not suid or not modality:
            continue
        entry = {"uid": suid, "modality": {"system": DCM, "code": modality}}
        if _first(s, "00200011") is not None:
            entry["number"] = int(_first(s, "00200011"))
        if _first(s, "00201209") is not None:
            entry["numberOfInstances"] = int(_first(s, "00201209"))
        if _first(s, "0008103E"):
            entry["description"] = str(_first(s, "0008103E"))
        site = _body_site(_first(s, "00180015"))
        if site:
            entry["bodySite"] = site
        entry["endpoint"] = [{"reference": endpoint_reference}]
        out_series.append(entry)
    if out_series:
        res["series"] = out_series
    return res


def find_imaging_study(http: httpx.Client, service_root: str, study_uid: str, endpoint_reference: str,
                       patient_reference: str) -> dict | None:
    """Ask the gateway (QIDO-RS at `service_root`) for the study and its series; None if not there."""
    dicomweb = DicomwebClient(http=http, url=service_root)
    studies = _qido(service_root, dicomweb.search_for_studies, fields=QIDO_STUDY_FIELDS,
                    search_filters={"StudyInstanceUID": study_uid})
    if not studies:
        return None
    series = _qido(service_root, dicomweb.search_for_series, study_uid,
                   fields=("0008103E", "00180015", "00200011", "00201209"))
    from omi_dsf.registry.validation import _model  # validate as the project does: fhir.resources R4B
    res = imaging_study(studies[0], endpoint_reference, patient_reference, series)
    _model("ImagingStudy").model_validate(res)
    return res


def _qido(service_root: str, search, *args, **kwargs) -> list[dict]:
    try:
        return search(*args, **kwargs)
    except (DicomwebError, PeerTlsError, PeerUnreachable) as exc:
        raise QidoError(f"QIDO-RS {service_root}: {exc}") from None
