"""The result as the DIC's FHIR store holds it: one transaction that a retried step can send again.

What the transaction writes (all built and checked with fhir.resources' R4B models, structurally R4):
  Endpoint       the site's DICOMweb gateway (connectionType dicom-wado-rs, address = its service
                 root); conditional update on identifier urn:ietf:rfc:3986|<address> (by its id
                 when the store has it already)
  Patient        conditional create on the patient identifier (found, or created with only that)
  ImagingStudy   the study the results were stored into (after re-identification the SEG and SR are
                 series of the original study): found by identifier urn:dicom:uid|urn:oid:<UID> and
                 updated (If-Match its version) or created; `endpoint` names the Endpoint on the
                 study and on every result series; the result series (uid, modality, instances)
                 replace earlier ones of the same UID, other series stay as they were
  Device, Observation, DiagnosticReport
                 conditional update on an identifier (Device: the algorithm and its version; the
                 others: the urn:uuid the inference gave them, derived from the SR's UID)
  Provenance     PUT on an id derived from the same urn:uuid (R4 Provenance has no identifier)
References by identifier in the inference's bundle (subject, imagingStudy, derivedFrom, entity)
become references to these resources.
"""

from __future__ import annotations

import copy
import uuid
from urllib.parse import quote
from dataclasses import dataclass, field
from typing import Iterable

from pydicom.dataset import Dataset

from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient

RFC3986 = "urn:ietf:rfc:3986"
DICOM_UID = "urn:dicom:uid"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
ALGORITHM_SYSTEM = "urn:omi-dsf:algorithm"
IMAGING_STUDY_PROFILE = ("https://www.medizininformatik-initiative.de/fhir/ext/modul-bildgebung/"
                         "StructureDefinition/mii-pr-bildgebung-bildgebungsstudie")
_NS = uuid.uuid5(uuid.NAMESPACE_URL, "urn:omi-dsf:fhir-store")


def search(system: str | None, value: str) -> str:
    """The value of an identifier search parameter, escaped for a URL's query."""
    return quote(f"{system}|{value}" if system else value, safe="")


def _urn(*parts: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NS, '|'.join(parts))}"


@dataclass
class SeriesInfo:
    uid: str
    modality: str
    number: int | None = None
    description: str | None = None
    instances: list[tuple[str, str, int | None]] = field(default_factory=list)   # (SOP UID, SOP class, number)


@dataclass
class StudyInfo:
    uid: str
    series: list[SeriesInfo]
    started: str | None = None


def study_of(datasets: Iterable[Dataset]) -> StudyInfo | None:
    """The study and series of the stored result objects (one study: the return step checked that)."""
    series: dict[str, SeriesInfo] = {}
    study_uid, started = "", None
    for ds in datasets:
        study_uid = str(ds.StudyInstanceUID)
        s = series.get(str(ds.SeriesInstanceUID))
        if s is None:
            number = ds.get("SeriesNumber")
            s = series[str(ds.SeriesInstanceUID)] = SeriesInfo(
                uid=str(ds.SeriesInstanceUID), modality=str(ds.get("Modality", "") or "OT"),
                number=int(number) if number not in (None, "") else None,
                description=str(ds.get("SeriesDescription", "") or "") or None)
        inst = ds.get("InstanceNumber")
        s.instances.append((str(ds.SOPInstanceUID), str(ds.SOPClassUID), int(inst) if inst not in (None, "") else None))
        date = str(ds.get("StudyDate", "") or "")
        if len(date) == 8 and date.isdigit():
            started = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    if not series:
        return None
    return StudyInfo(study_uid, list(series.values()), started)


def endpoint(address: str) -> dict:
    return Endpoint.model_validate({
        "resourceType": "Endpoint",
        "identifier": [{"system": RFC3986, "value": address}],
        "status": "active",
        "name": "DICOMweb gateway of the site's PACS (WADO-RS)",
        "connectionType": {"system": CONNECTION_TYPE, "code": "dicom-wado-rs"},
        # DICOM's own code for what the endpoint serves (DCM 113014 "Study"), as IHE's imaging
        # profiles use it; R4's endpoint-payload-type has no code for DICOM (HAPI refuses "DICOM")
        "payloadType": [{"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM",
                                     "code": "113014", "display": "Study"}], "text": "DICOM study"}],
        "payloadMimeType": ["application/dicom"],
        "address": address,
    }).model_dump(mode="json", exclude_none=True)


def _series_json(s: SeriesInfo, endpoint_ref: str) -> dict:
    out = {"uid": s.uid, "modality": {"system": DCM, "code": s.modality}, "numberOfInstances": len(s.instances),
           "endpoint": [{"reference": endpoint_ref}],
           "instance": [{"uid": uid, "sopClass": {"system": RFC3986, "code": f"urn:oid:{cls}"},
                         **({"number": n} if n is not None else {})} for uid, cls, n in s.instances]}
    if s.number is not None:
        out["number"] = s.number
    if s.description:
        out["description"] = s.description
    return out


def imaging_study(existing: dict | None, study: StudyInfo, patient_ref: str, endpoint_ref: str) -> dict:
    """The study's ImagingStudy with the result series and the Endpoint: `existing` updated, or new."""
    if existing is not None:
        res = copy.deepcopy(existing)
    else:
        res = {"resourceType": "ImagingStudy", "meta": {"profile": [IMAGING_STUDY_PROFILE]}, "status": "available",
               "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{study.uid}"}],
               "subject": {"reference": patient_ref}}
        if study.started:
            res["started"] = study.started
    refs = [e.get("reference") for e in res.get("endpoint") or ()]
    if endpoint_ref not in refs:
        res["endpoint"] = [*(res.get("endpoint") or ()), {"reference": endpoint_ref}]
    ours = {s.uid: _series_json(s, endpoint_ref) for s in study.series}
    kept = [s for s in res.get("series") or () if s.get("uid") not in ours]
    res["series"] = kept + list(ours.values())
    modalities = {(m.get("system"), m.get("code")) for m in res.get("modality") or ()}
    for s in study.series:
        if (DCM, s.modality) not in modalities:
            res.setdefault("modality", []).append({"system": DCM, "code": s.modality})
            modalities.add((DCM, s.modality))
    res["numberOfSeries"] = len(res["series"])
    if all("numberOfInstances" in s for s in res["series"]):
        res["numberOfInstances"] = sum(s["numberOfInstances"] for s in res["series"])
    return ImagingStudy.model_validate(res).model_dump(mode="json", exclude_none=True)


def _retarget(obj, mapping: dict[tuple[str, str], str]):
    """Replace references by identifier ({type, identifier}) with literal references where we know the target."""
    if isinstance(obj, dict):
        ident = obj.get("identifier") if isinstance(obj.get("identifier"), dict) else None
        if ident is not None and "type" in obj and "reference" not in obj:
            target = mapping.get((obj["type"], ident.get("value", "")))
            if target is not None:
                out = {k: v for k, v in obj.items() if k not in ("type", "identifier")}
                out["reference"] = target
                return out
        return {k: _retarget(v, mapping) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_retarget(v, mapping) for v in obj]
    return obj


def transaction(bundle: dict, *, base: str, gateway_url: str | None, study: StudyInfo | None,
                existing_study: dict | None, patient_system: str | None, endpoint_id: str | None = None) -> dict:
    """The transaction Bundle for the store at FHIR base `base` (see the module docstring). Entries
    for resources the store holds have their absolute URL at `base` as fullUrl (R4 bdl-7; a
    validating server refuses relative ones) and are referenced by their relative URL."""
    base = base.rstrip("/")
    entries: list[dict] = []
    mapping: dict[tuple[str, str], str] = {}

    subject = next((e["resource"].get("subject") for e in bundle.get("entry", [])
                    if e["resource"].get("resourceType") == "DiagnosticReport"), None) or {}
    pid = (subject.get("identifier") or {}).get("value")
    system = patient_system or (subject.get("identifier") or {}).get("system")
    patient_ref = None
    if pid:
        patient_ref = _urn("patient", system or "", pid)
        ident = {"system": system, "value": pid} if system else {"value": pid}
        patient = Patient.model_validate({"resourceType": "Patient", "identifier": [ident]})
        query = f"identifier={search(system, pid)}"
        entries.append({"fullUrl": patient_ref, "resource": patient.model_dump(mode="json", exclude_none=True),
                        "request": {"method": "POST", "url": "Patient", "ifNoneExist": query}})
        mapping[("Patient", pid)] = patient_ref

    if study is not None and gateway_url:
        if endpoint_id:     # the store has it: by its id, so that the ImagingStudy names it once
            ep_ref = f"Endpoint/{endpoint_id}"
            entries.append({"fullUrl": f"{base}/{ep_ref}", "resource": {**endpoint(gateway_url), "id": endpoint_id},
                            "request": {"method": "PUT", "url": ep_ref}})
        else:
            ep_ref = _urn("endpoint", gateway_url)
            entries.append({"fullUrl": ep_ref, "resource": endpoint(gateway_url), "request": {
                "method": "PUT", "url": f"Endpoint?identifier={search(RFC3986, gateway_url)}"}})
        res = imaging_study(existing_study, study, patient_ref or "", ep_ref)
        if existing_study is not None:
            ref = f"ImagingStudy/{existing_study['id']}"
            version = (existing_study.get("meta") or {}).get("versionId")
            request = {"method": "PUT", "url": ref, **({"ifMatch": f'W/"{version}"'} if version else {})}
            if patient_ref and not res.get("subject"):
                res["subject"] = {"reference": patient_ref}
            entries.append({"fullUrl": f"{base}/{ref}", "resource": res, "request": request})
        else:
            ref = _urn("imaging-study", study.uid)
            if not patient_ref:
                res.pop("subject", None)
            entries.append({"fullUrl": ref, "resource": res, "request": {
                "method": "POST", "url": "ImagingStudy",
                "ifNoneExist": f"identifier={search(DICOM_UID, f'urn:oid:{study.uid}')}"}})
        mapping[("ImagingStudy", f"urn:oid:{study.uid}")] = ref

    for entry in bundle.get("entry", []):
        res = _retarget(copy.deepcopy(entry["resource"]), mapping)
        rtype, full = res["resourceType"], entry["fullUrl"]
        if rtype == "Device":
            name = (res.get("deviceName") or [{}])[0].get("name", "")
            version = (res.get("version") or [{}])[0].get("value", "")
            key = f"{name}|{version}"
            res["identifier"] = [{"system": ALGORITHM_SYSTEM, "value": key}]
            request = {"method": "PUT", "url": f"Device?identifier={search(ALGORITHM_SYSTEM, key)}"}
        elif rtype == "Provenance":
            res["id"] = full.rsplit(":", 1)[-1]
            request = {"method": "PUT", "url": f"Provenance/{res['id']}"}
        else:
            res["identifier"] = [*(res.get("identifier") or ()), {"system": RFC3986, "value": full}]
            request = {"method": "PUT", "url": f"{rtype}?identifier={search(RFC3986, full)}"}
        entries.append({"fullUrl": full, "resource": res, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
