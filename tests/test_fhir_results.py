"""The return step's FHIR result in the DIC's FHIR store (a real HAPI FHIR JPA server, fixture
fhir_store): Endpoint, Patient, the study's ImagingStudy with the result series, Device,
Observations, DiagnosticReport, Provenance; a retried step updates, never duplicates; from the
ImagingStudy through its Endpoint to the SEG by WADO-RS at the site's gateway."""

from __future__ import annotations

import io
import uuid

import httpx
import pydicom
import pytest

from conftest import free_port
from omi_dsf.dicomweb.config import parse_config
from omi_dsf.dicomweb.server import BackgroundServer
from omi_dsf.client import fhir_record
from omi_dsf.dicomweb_client import DicomwebClient
from omi_dsf.errors import UserError
from omi_dsf.inference import lungseg, results
from omi_dsf.testkit import phantom
from omi_dsf.transfer.config import FhirResultsSettings
from omi_dsf.transfer.errors import TransferError
from omi_dsf.transfer.fhir import write_fhir_result
from omi_dsf.transfer.fhir_store import imaging_study, study_of, transaction

ALGO = results.Algorithm("lung-seg", "1.0.0")
SYSTEM = "https://dic.example.org/sid/patient-id"
BASE = "https://fhir.dic.example.org/fhir"


def _made(tmp_path, seed: int, patient_id: str):
    """A CT study of one patient and the AI's SEG and SR for it, as the return step holds them after
    re-identification (original patient and study)."""
    paths = phantom.write_ct_study(tmp_path / f"ct{seed}", slices=6, rows=64, cols=64, seed=seed)
    source = [pydicom.dcmread(p) for p in paths]
    for ds in source:
        ds.PatientID = patient_id
    labels = lungseg.segment_lungs(phantom.phantom_hu(6, seed, 64, 64))
    volumes = lungseg.volumes_ml(labels, (2.5, 0.7, 0.7))
    uids = results.result_uids(source[0].SeriesInstanceUID, ALGO)
    seg = results.build_segmentation(source, labels, ALGO, uids)
    sr = results.build_measurement_report(source, seg, volumes, ALGO, uids)
    datasets = [pydicom.dcmread(io.BytesIO(results.to_part10(d))) for d in (seg, sr)]
    return source, datasets, results.fhir_bundle_from_report(datasets[1])


def _search(c, query: str) -> list[dict]:
    r = c.get(query)
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry") or ()]


# -- unit: the transaction -----------------------------------------------------------------------
def test_transaction_is_conditional_and_links_by_reference(tmp_path):
    _, datasets, bundle = _made(tmp_path, 3, "PAT-T")
    study = study_of(datasets)
    tx = transaction(bundle, base=BASE, gateway_url="https://gw.dic.example.org/dicomweb", study=study, existing_study=None,
                     patient_system=SYSTEM)
    kinds = [(e["resource"]["resourceType"], e["request"]["method"]) for e in tx["entry"]]
    assert kinds[:3] == [("Patient", "POST"), ("Endpoint", "PUT"), ("ImagingStudy", "POST")]
    assert sorted(k for k, _ in kinds[3:]) == ["Device", "DiagnosticReport", "Observation", "Observation",
                                               "Observation", "Provenance"]
    for e in tx["entry"]:     # every write is conditional or on a derived id: a retry cannot duplicate
        req = e["request"]
        assert "ifNoneExist" in req or "?identifier=" in req["url"] or req["url"].startswith("Provenance/")
    by_type = {e["resource"]["resourceType"]: e for e in tx["entry"]}
    patient_urn, study_urn = by_type["Patient"]["fullUrl"], by_type["ImagingStudy"]["fullUrl"]
    report = by_type["DiagnosticReport"]["resource"]
    assert report["subject"] == {"reference": patient_urn} and report["imagingStudy"] == [{"reference": study_urn}]
    img = by_type["ImagingStudy"]["resource"]
    assert img["endpoint"] == [{"reference": by_type["Endpoint"]["fullUrl"]}]
    assert {s["modality"]["code"] for s in img["series"]} == {"SEG", "SR"}
    assert by_type["Endpoint"]["resource"]["connectionType"]["code"] == "dicom-wado-rs"
    # an ImagingStudy the store already has: its other series and endpoints stay, ours are added once
    existing = {"resourceType": "ImagingStudy", "id": "77", "meta": {"versionId": "3"}, "status": "available",
                "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study.uid}"}],
                "subject": {"reference": "Patient/5"}, "endpoint": [{"reference": "Endpoint/pacs"}],
                "series": [{"uid": "1.2.3", "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM",
                                                         "code": "CT"}, "numberOfInstances": 6}]}
    merged = imaging_study(existing, study, "Patient/5", "urn:uuid:ep")
    again = imaging_study(merged, study, "Patient/5", "urn:uuid:ep")
    assert [s["uid"] for s in again["series"]][0] == "1.2.3" and len(again["series"]) == 3
    assert again["endpoint"] == [{"reference": "Endpoint/pacs"}, {"reference": "urn:uuid:ep"}]
    assert again["numberOfInstances"] == 6 + 2
    tx = transaction(bundle, base=BASE, gateway_url="https://gw", study=study, existing_study=existing,
                     patient_system=SYSTEM)
    img_entry = next(e for e in tx["entry"] if e["resource"]["resourceType"] == "ImagingStudy")
    assert img_entry["request"] == {"method": "PUT", "url": "ImagingStudy/77", "ifMatch": 'W/"3"'}
    assert img_entry["fullUrl"] == f"{BASE}/ImagingStudy/77"      # absolute (R4 bdl-7)
    # the store has the Endpoint already and the study names it: by its id, still once
    named = {**existing, "endpoint": [{"reference": "Endpoint/9"}]}
    tx = transaction(bundle, base=BASE, gateway_url="https://gw", study=study, existing_study=named,
                     patient_system=SYSTEM, endpoint_id="9")
    img = next(e for e in tx["entry"] if e["resource"]["resourceType"] == "ImagingStudy")["resource"]
    assert img["endpoint"] == [{"reference": "Endpoint/9"}]
    assert next(e for e in tx["entry"] if e["resource"]["resourceType"] == "Endpoint")["request"] == {
        "method": "PUT", "url": "Endpoint/9"}


def test_fhir_store_without_a_gateway_is_a_config_error(tmp_path):
    _, datasets, bundle = _made(tmp_path, 4, "PAT-U")
    with pytest.raises(TransferError, match="steps.gateway_url is missing"):
        write_fhir_result(FhirResultsSettings(url="http://127.0.0.1:9/fhir"), bundle, "bk", datasets)


def test_a_store_that_does_not_answer_is_one_line_for_the_client():
    with httpx.Client(timeout=5) as http, pytest.raises(UserError) as exc:
        fhir_record.study_record(http, f"http://127.0.0.1:{free_port()}/fhir", "1.2.3")
    assert str(exc.value) == "FHIR store: ImagingStudy search: ConnectError"


# -- integration: the real store and the site's gateway -----------------------------------------
@pytest.fixture(scope="module")
def site_gateway(tmp_path_factory):
    """The site's DICOMweb gateway over a store (where the return step's objects are found by WADO-RS)."""
    cfg = parse_config({"listen": {"port": free_port()}, "auth": {"anonymous": True}, "default": "PACS",
                        "backends": {"PACS": {"type": "store", "path": str(tmp_path_factory.mktemp("pacs"))}}})
    with BackgroundServer(cfg) as gw:
        yield gw


@pytest.mark.integration
def test_result_in_the_fhir_store_and_from_there_to_the_seg(fhir_store, site_gateway, tmp_path):
    pid = f"PAT-{uuid.uuid4().hex[:8]}"
    source, datasets, bundle = _made(tmp_path, 7, pid)
    study_uid = str(source[0].StudyInstanceUID)
    with httpx.Client(timeout=60) as http:   # the return step stored the SEG and SR at the site
        DicomwebClient(http=http, url=site_gateway.url).store_instances([results.to_part10(d) for d in datasets])
    base = fhir_store.state().base_url
    target = FhirResultsSettings(url=base)
    site = {"gateway_url": site_gateway.url, "patient_system": SYSTEM}     # as the return step passes them
    with fhir_store.client() as c:
        # the source study's ImagingStudy exists already (the DIC's own, with its CT series)
        patient = c.post("/Patient", json={"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": pid}]},
                         headers={"Content-Type": "application/fhir+json"}).json()
        c.post("/ImagingStudy", headers={"Content-Type": "application/fhir+json"}, json={
            "resourceType": "ImagingStudy", "status": "available", "subject": {"reference": f"Patient/{patient['id']}"},
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
            "series": [{"uid": str(source[0].SeriesInstanceUID), "numberOfInstances": len(source),
                        "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}}]})

        assert write_fhir_result(target, bundle, "bk-fhir", datasets, **site) == base
        write_fhir_result(target, bundle, "bk-fhir", datasets, **site)           # a retried step
        write_fhir_result(target, bundle, "bk-fhir", datasets, **site)

        assert len(_search(c, f"/Patient?identifier={SYSTEM}|{pid}")) == 1
        studies = _search(c, f"/ImagingStudy?identifier=urn:dicom:uid|urn:oid:{study_uid}&_include=ImagingStudy:endpoint")
        img = [r for r in studies if r["resourceType"] == "ImagingStudy"]
        endpoints = [r for r in studies if r["resourceType"] == "Endpoint"]
        assert len(img) == 1 and len(endpoints) == 1
        img = img[0]
        assert img["meta"]["versionId"] == "2"   # the DIC's v1, our write v2; the retries changed nothing
        assert sorted(s["modality"]["code"] for s in img["series"]) == ["CT", "SEG", "SR"]
        assert img["subject"]["reference"] == f"Patient/{patient['id']}"
        reports = _search(c, f"/DiagnosticReport?subject=Patient/{patient['id']}")
        assert len(reports) == 1
        assert reports[0]["imagingStudy"][0]["reference"] == f"ImagingStudy/{img['id']}"
        observations = _search(c, f"/Observation?subject=Patient/{patient['id']}")
        assert len(observations) == 3 and all(o["device"]["reference"].startswith("Device/") for o in observations)
        assert sorted(o["valueQuantity"]["unit"] for o in observations) == ["mL"] * 3
        assert len(_search(c, "/Device?identifier=urn:omi-dsf:algorithm|lung-seg|1.0.0")) == 1
        provenance = _search(c, f"/Provenance?target=DiagnosticReport/{reports[0]['id']}")
        assert len(provenance) == 1 and provenance[0]["entity"][0]["what"]["reference"] == f"ImagingStudy/{img['id']}"

        # from the FHIR store to the pixels: ImagingStudy -> Endpoint -> WADO-RS -> the SEG
        ep = endpoints[0]
        assert ep["connectionType"]["code"] == "dicom-wado-rs" and ep["address"] == site_gateway.url
        seg_series = next(s for s in img["series"] if s["modality"]["code"] == "SEG")
        assert seg_series["endpoint"][0]["reference"] == f"Endpoint/{ep['id']}"
        with httpx.Client(timeout=60) as http:
            parts = DicomwebClient(http=http, url=ep["address"]).retrieve_series(study_uid, seg_series["uid"])
        seg = pydicom.dcmread(io.BytesIO(parts[0]))
        assert seg.Modality == "SEG" and str(seg.SOPInstanceUID) == seg_series["instance"][0]["uid"]
        assert str(seg.PatientID) == pid

        # what `omi results` and the demo print from the store
        record = fhir_record.study_record(c, base, study_uid)
        assert record["imaging_study"] == f"ImagingStudy/{img['id']}"
        assert record["endpoints"] == [{"endpoint": f"Endpoint/{ep['id']}", "connection_type": "dicom-wado-rs",
                                        "address": site_gateway.url}]
        text = fhir_record.render(record, base)
        assert f"ImagingStudy/{img['id']}" in text and f"Endpoint/{ep['id']}  dicom-wado-rs  {site_gateway.url}" in text
        assert "series SEG     1 instance(s)" in text
        held = fhir_record.counts(c, base)
        assert held["ImagingStudy"] >= 1 and held["Endpoint"] >= 1 and held["DiagnosticReport"] >= 1
        assert fhir_record.study_record(c, base, "1.2.826.0.1.3680043.8.498.999") is None


@pytest.mark.integration
def test_a_new_study_gets_its_imaging_study_created(fhir_store, site_gateway, tmp_path):
    pid = f"PAT-{uuid.uuid4().hex[:8]}"
    source, datasets, bundle = _made(tmp_path, 8, pid)
    target = FhirResultsSettings(url=fhir_store.state().base_url, patient_identifier_system=SYSTEM,
                                 wado_url=site_gateway.url)
    write_fhir_result(target, bundle, "bk-new", datasets)
    write_fhir_result(target, bundle, "bk-new", datasets)
    with fhir_store.client() as c:
        img = _search(c, f"/ImagingStudy?identifier=urn:dicom:uid|urn:oid:{source[0].StudyInstanceUID}")
        assert len(img) == 1 and img[0]["meta"]["versionId"] == "1"   # created once; the retry changed nothing
        assert sorted(s["modality"]["code"] for s in img[0]["series"]) == ["SEG", "SR"]
        assert img[0]["meta"]["profile"] == [
            "https://www.medizininformatik-initiative.de/fhir/ext/modul-bildgebung/StructureDefinition/"
            "mii-pr-bildgebung-bildgebungsstudie"]
        patients = _search(c, f"/Patient?identifier={SYSTEM}|{pid}")
        assert len(patients) == 1 and img[0]["subject"]["reference"] == f"Patient/{patients[0]['id']}"
        # two studies, one gateway: one Endpoint
        assert len(_search(c, f"/Endpoint?identifier=urn:ietf:rfc:3986|{site_gateway.url}")) == 1


@pytest.mark.integration
def test_store_errors_are_retried_or_refused(fhir_store, site_gateway, tmp_path, monkeypatch):
    from omi_dsf.transfer import fhir as transfer_fhir
    from omi_dsf.transfer.fhir import FhirUnavailable

    pid = f"PAT-{uuid.uuid4().hex[:8]}"
    _, datasets, bundle = _made(tmp_path, 9, pid)
    target = FhirResultsSettings(url=fhir_store.state().base_url, patient_identifier_system=SYSTEM)
    site = {"gateway_url": site_gateway.url}
    write_fhir_result(target, bundle, "bk-err", datasets, **site)
    # the ImagingStudy changed between our read and our write (another writer): HAPI answers 409, retried
    real = transfer_fhir._imaging_study

    def stale(http, base, uid):
        found = real(http, base, uid)
        with fhir_store.client() as c:
            c.put(f"/ImagingStudy/{found['id']}", json={**found, "description": "changed meanwhile"},
                  headers={"Content-Type": "application/fhir+json"}).raise_for_status()
        return found

    monkeypatch.setattr(transfer_fhir, "_imaging_study", stale)
    with pytest.raises(FhirUnavailable, match="HTTP 409"):
        write_fhir_result(target, bundle, "bk-err", datasets, **site)
    monkeypatch.setattr(transfer_fhir, "_imaging_study", real)
    write_fhir_result(target, bundle, "bk-err", datasets, **site)          # the retry reads it again and succeeds
    # a result the store refuses (an Observation status FHIR does not know): a step error, no retry
    broken = {**bundle, "entry": [dict(e) for e in bundle["entry"]]}
    obs = next(e for e in broken["entry"] if e["resource"]["resourceType"] == "Observation")
    obs["resource"] = {**obs["resource"], "status": "not-a-status"}
    # (422 from a validating store, 400 from the parser of one that does not validate)
    with pytest.raises(TransferError, match=r"the FHIR store refused the result bundle \(HTTP 4(00|22)\)"):
        write_fhir_result(target, broken, "bk-err", datasets, **site)
    # a store that does not answer: retried
    down = FhirResultsSettings(url=f"http://127.0.0.1:{free_port()}/fhir")
    with pytest.raises(FhirUnavailable, match="does not answer"):
        write_fhir_result(down, bundle, "bk-err", datasets, **site)
