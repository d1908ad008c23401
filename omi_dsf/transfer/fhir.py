"""Where the requester keeps the FHIR result: a folder or the DIC's FHIR store.

Site settings, `steps.fhir_results` in the site YAML (FhirResultsSettings, omi_dsf.transfer.config):
a folder path, or {url: FHIR base, with the peer keys ca_file, client_cert, client_key, token_file,
timeout; patient_identifier_system, wado_url}.
Folder: <folder>/<business key>.json (the collection Bundle), written whole and renamed.
FHIR store: one transaction (omi_dsf/transfer/fhir_store.py): Endpoint, Patient, the study's
ImagingStudy with the result series, Device, Observations, DiagnosticReport, Provenance; every
entry conditional on an identifier or a derived id, so a retried step updates, never duplicates.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

from omi_dsf.errors import RetryableError
from omi_dsf.peer import PeerConfigError, PeerTlsError, PeerUnreachable
from omi_dsf.transfer.config import FhirResultsSettings
from omi_dsf.transfer.errors import TransferError
from omi_dsf.transfer.fhir_store import DICOM_UID, RFC3986, search, study_of, transaction


class FhirUnavailable(ConnectionError, RetryableError):
    """The FHIR server did not answer or answered 5xx: retried."""


def write_fhir_result(target: FhirResultsSettings | None, bundle: dict, business_key: str, datasets: Sequence = (),
                      *, gateway_url: str | None = None, patient_system: str | None = None) -> str:
    """Store the bundle where the site says; returns where (for the audit: a folder or a base URL).
    For the FHIR store: `datasets`, the result objects as stored (re-identified), give the ImagingStudy;
    `gateway_url` (unless `wado_url` is set) the Endpoint's address; `patient_system` (unless
    `patient_identifier_system` is set) the system of the patient identifier."""
    if target is None:
        raise TransferError("site configuration steps.fhir_results is missing (a folder or {url: FHIR base})")
    if target.url:
        return _to_server(target, bundle, datasets, target.wado_url or gateway_url,
                          target.patient_identifier_system or patient_system)
    return _to_folder(Path(target.folder), bundle, business_key)


def _to_folder(folder: Path, bundle: dict, business_key: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", business_key) or "result"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(bundle, fh, indent=1)
        os.replace(tmp, folder / f"{name}.json")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(folder)


def _to_server(cfg: FhirResultsSettings, bundle: dict, datasets: Sequence, gateway: str | None,
               patient_system: str | None) -> str:
    study = study_of(datasets)
    if study is not None and not gateway:
        raise TransferError("steps.gateway_url is missing: the ImagingStudy's Endpoint names the site's DICOMweb "
                            "gateway (or set steps.fhir_results.wado_url)")
    try:
        peer = cfg.peer(cfg.url, "steps.fhir_results", timeout=60)
        http = peer.client(base_url=False)
    except PeerConfigError as exc:
        raise TransferError(str(exc)) from None
    base = peer.url.rstrip("/")
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    try:
        with peer.errors("the FHIR store"):
            existing = _imaging_study(http, base, study.uid) if study is not None else None
            endpoint_id = _endpoint_id(http, base, str(gateway)) if existing is not None else None
            tx = transaction(bundle, base=base, gateway_url=str(gateway) if gateway else None, study=study,
                             existing_study=existing, patient_system=patient_system, endpoint_id=endpoint_id)
            resp = http.post(base, content=json.dumps(tx), headers=headers)
    except PeerTlsError:
        raise TransferError("TLS with the FHIR store failed (check steps.fhir_results ca_file)") from None
    except PeerUnreachable as exc:
        raise FhirUnavailable(f"the FHIR store does not answer ({str(exc).rsplit(': ', 1)[-1]})") from None
    finally:
        http.close()
    if resp.status_code >= 500 or resp.status_code in (409, 412, 429):
        # 409/412: the ImagingStudy changed between reading and writing it; the retry reads it again
        raise FhirUnavailable(f"the FHIR store answered HTTP {resp.status_code}")
    if resp.status_code >= 400:
        # HAPI's diagnostics can quote the patient identifier: the status only (the store logs the rest)
        raise TransferError(f"the FHIR store refused the result bundle (HTTP {resp.status_code})")
    return base


def _search(http, base: str, rtype: str, system: str, value: str) -> list[dict]:
    # no-cache: HAPI would otherwise answer a repeated search from its cache for a minute
    resp = http.get(f"{base}/{rtype}?identifier={search(system, value)}",
                    headers={"Accept": "application/fhir+json", "Cache-Control": "no-cache"})
    if resp.status_code >= 500 or resp.status_code == 429:
        raise FhirUnavailable(f"the FHIR store answered HTTP {resp.status_code} to the {rtype} search")
    if resp.status_code != 200:
        raise TransferError(f"the FHIR store refused the {rtype} search (HTTP {resp.status_code})")
    try:
        return [e["resource"] for e in resp.json().get("entry") or ()
                if e.get("resource", {}).get("resourceType") == rtype]
    except (ValueError, AttributeError, KeyError) as exc:
        raise TransferError(f"the FHIR store's answer to the {rtype} search is not a Bundle "
                            f"({type(exc).__name__})") from None


def _endpoint_id(http, base: str, address: str) -> str | None:
    found = _search(http, base, "Endpoint", RFC3986, address)
    return str(found[0]["id"]) if len(found) == 1 else None


def _imaging_study(http, base: str, study_uid: str) -> dict | None:
    found = _search(http, base, "ImagingStudy", DICOM_UID, f"urn:oid:{study_uid}")
    if len(found) > 1:
        raise TransferError(f"the FHIR store holds {len(found)} ImagingStudy resources for the study; "
                            "merge them so that one names the study")
    return found[0] if found else None
