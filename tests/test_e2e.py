"""End to end on the DSF test bed: a DIC's legacy PACS → consent → send (pseudonymized and
leak-checked instance by instance, STOW-RS over TLS as it goes) → the provider's DSF and AI service → result message → re-identified results in the PACS.
Plus the failure paths, each ending with a clear error on the requester's Task and nothing
identifying at the provider."""

from __future__ import annotations

import io
import signal
import ssl
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from omi_dsf.audit import AuditTrail
from omi_dsf.deid.identity import Identity
from omi_dsf.deid.leakcheck import find_leaks
from omi_dsf.client import fhir_record
from omi_dsf.demo import PATIENT_SYSTEM, Demo
from omi_dsf.dicomweb_client import DicomwebClient
from omi_dsf.dsf.tasks import outputs
from omi_dsf.peer import http_client
from omi_dsf.testbed.bed import plugin_problems

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo(dsf_testbed, tmp_path_factory):
    # one instance per STOW request, so that a worker can be killed in the middle of a send; the
    # provider's model on KServe's model server, as AI providers run theirs
    # the requester's FHIR store (HAPI FHIR JPA): consent is read from it, results go into it
    d = Demo(dsf_testbed, tmp_path_factory.mktemp("e2e"), slices=12, size=128, send={"batch_instances": 1},
             ai_server="kserve", fhir_store=True)
    d.start()
    d.start_workers()
    yield d
    d.stop()


def c_find(demo, level: str, **keys) -> list:
    ae = AE(ae_title="OMITEST")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(demo.pacs.host, demo.pacs.port, ae_title=demo.pacs.aet)
    assert assoc.is_established
    q = pydicom.Dataset()
    q.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(q, k, v)
    try:
        return [i for s, i in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)
                if s and s.Status in (0xFF00, 0xFF01) and i is not None]
    finally:
        assoc.release()


def fhir_subjects(demo, study) -> dict[str, int]:
    """How many DiagnosticReports and Observations the FHIR store holds on the study's patient."""
    with demo.store.client() as c:
        (patient,) = [e["resource"] for e in c.get("/Patient", params={
            "identifier": f"{PATIENT_SYSTEM}|{study.patient_id}"}).json()["entry"]]
        return {t: c.get(f"/{t}", params={"subject": f"Patient/{patient['id']}", "_summary": "count"}).json()["total"]
                for t in ("DiagnosticReport", "Observation")}


def provider_files(demo) -> list[Path]:
    return sorted((demo.provider_store / "files").rglob("*.dcm")) if (demo.provider_store / "files").exists() else []


def assert_nothing_identifying_at_provider(demo) -> None:
    identity = Identity()
    for study in demo.studies:
        for p in study.files:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            identity.add_dataset(ds)
            identity.add_uids({str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)})
    for p in provider_files(demo):
        assert find_leaks(pydicom.dcmread(p), identity) == [], p.name


@pytest.mark.dsf_mixed
def test_inference_end_to_end(demo, dsf_testbed):
    bpe_logs = {s.log_file: s.log_file.stat().st_size for s in dsf_testbed.servers if s.kind == "bpe"}
    study = demo.add_study(seed=4101)
    task_id = demo.submit(study)
    bk = demo.business_key(task_id)
    task = demo.wait(task_id, timeout=600)
    out = outputs(task)
    assert task["status"] == "completed", out
    assert out["stored-study-instance-uid"] == study.uid
    assert out["result-location"].startswith(demo.provider_gw + "/studies/")

    # the legacy PACS: SEG and SR in the ORIGINAL study, found under the ORIGINAL PatientID
    studies = c_find(demo, "STUDY", PatientID=study.patient_id, StudyInstanceUID="")
    assert [str(s.StudyInstanceUID) for s in studies] == [study.uid]
    series = c_find(demo, "SERIES", StudyInstanceUID=study.uid, Modality="", SeriesInstanceUID="")
    assert sorted(str(s.Modality) for s in series) == ["CT", "SEG", "SR"]

    # the FHIR store: the report on the original patient, the study's ImagingStudy with the result
    # series and an Endpoint at the requester's gateway; through it, WADO-RS gives the SEG
    assert fhir_subjects(demo, study) == {"DiagnosticReport": 1, "Observation": 3}
    with demo.store.client() as c:
        record = fhir_record.study_record(c, demo.fhir_base, study.uid)
    assert sorted(s["modality"] for s in record["series"]) == ["SEG", "SR"]
    (endpoint,) = record["endpoints"]
    assert endpoint["connection_type"] == "dicom-wado-rs" and endpoint["address"] == demo.requester_gw
    seg_series = next(s for s in record["series"] if s["modality"] == "SEG")
    assert seg_series["endpoint"] == [endpoint["endpoint"]]
    with http_client(verify=ssl.create_default_context(cafile=demo.ca), timeout=60) as http:
        parts = DicomwebClient(http=http, url=endpoint["address"]).retrieve_series(study.uid, seg_series["uid"])
    seg = pydicom.dcmread(io.BytesIO(parts[0]))
    assert seg.Modality == "SEG" and str(seg.PatientID) == study.patient_id
    assert "ImagingStudy/" in demo.fhir_summary(study) and "Endpoint/" in demo.fhir_summary(study)

    # nothing identifying at the provider: every object it holds passes the leak check
    assert len(provider_files(demo)) >= demo.slices + 2
    assert_nothing_identifying_at_provider(demo)

    # audit trails at both sites: what was sent and received, by whom, in which domain; no patient data
    dic = AuditTrail(demo.folder / "sites" / "dic-audit.sqlite").events(bk)
    ai = AuditTrail(demo.folder / "sites" / "ai-audit.sqlite").events(bk)
    sent = next(e for e in dic if e.action == "sent")
    assert sent.details["pseudonym_domain"] == "omi-demo" and sent.details["instances"] == demo.slices
    assert {"received", "stored"} <= {e.action for e in dic}
    assert any(e.action == "step-completed" and e.details.get("outcome") == "infer" for e in ai)
    for db in ("dic-audit.sqlite", "ai-audit.sqlite"):
        text = (demo.folder / "sites" / db).read_bytes().decode("latin-1")
        assert study.patient_id not in text and study.patient_name.split("^")[0] not in text and study.uid not in text

    # neither BPE met a plugin class it could not load or create on the way
    for log_file, size in bpe_logs.items():
        assert plugin_problems(log_file, since=size) == [], log_file


def _pacs_results(demo) -> list[pydicom.Dataset]:
    """The SEG and SR objects the legacy PACS holds (headers), from its storage area."""
    found = []
    for path in (demo.folder / "pacs").rglob("*"):
        if path.is_file() and path.name != "index.dat":
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if str(ds.get("Modality", "")) in ("SEG", "SR"):
                found.append(ds)
    return found


def test_two_requests_at_once_keep_their_results_apart(demo):
    studies = [demo.add_study(seed=4111), demo.add_study(seed=4112)]
    assert studies[0].patient_id != studies[1].patient_id
    task_ids = [demo.submit(s) for s in studies]          # both in flight: the workers take both
    tasks = [demo.wait(t, timeout=600) for t in task_ids]
    assert [t["status"] for t in tasks] == ["completed", "completed"], [outputs(t) for t in tasks]
    results = _pacs_results(demo)
    for study, task_id, task in zip(studies, task_ids, tasks):
        assert outputs(task)["stored-study-instance-uid"] == study.uid
        ct_series = str(pydicom.dcmread(study.files[0], stop_before_pixels=True).SeriesInstanceUID)
        mine = [r for r in results if str(r.StudyInstanceUID) == study.uid]
        assert sorted(str(r.Modality) for r in mine) == ["SEG", "SR"]
        for r in mine:   # each result carries its own patient and points at its own images
            assert str(r.PatientID) == study.patient_id and str(r.PatientName) == study.patient_name
        seg = next(r for r in mine if r.Modality == "SEG")
        assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == ct_series
        assert fhir_subjects(demo, study) == {"DiagnosticReport": 1, "Observation": 3}
    assert_nothing_identifying_at_provider(demo)


def test_consent_denied_sends_nothing(demo):
    before = len(provider_files(demo))
    study = demo.add_study(seed=4102, consent=False)
    task = demo.wait(demo.submit(study), timeout=300)
    assert task["status"] == "failed"
    assert outputs(task)["error"].startswith("consent: ")
    assert "no consent" in outputs(task)["error"].lower() or "consent" in outputs(task)["error"]
    assert len(provider_files(demo)) == before   # nothing sent at all


def test_ai_service_down_ends_with_a_clear_error(demo):
    demo.stop_ai_service()
    try:
        study = demo.add_study(seed=4103)
        task = demo.wait(demo.submit(study), timeout=600)
        assert task["status"] == "failed"
        error = outputs(task)["error"]
        assert error.startswith("infer: "), error
        assert_nothing_identifying_at_provider(demo)
    finally:
        demo.start_ai_service()


def test_provider_dsf_unreachable_ends_with_a_clear_error(demo):
    bed = demo.state.bed
    bed.stop_server("ai-fhir")
    try:
        study = demo.add_study(seed=4104)
        task = demo.wait(demo.submit(study), timeout=600)
        assert task["status"] == "failed"
        error = outputs(task)["error"]
        assert "executeOmiInference" in error and "ai.omi.test" in error, error
        assert_nothing_identifying_at_provider(demo)
    finally:
        bed.start_server("ai-fhir")


def _stored_instances(demo) -> int:
    """Images at the provider (the results it stores beside them, SEG and SR, not counted)."""
    index = demo.provider_store / "index.sqlite"
    if not index.exists():
        return 0
    with sqlite3.connect(index, timeout=5) as db:
        return db.execute("SELECT COUNT(*) FROM instances WHERE modality = 'CT'").fetchone()[0]


def test_worker_killed_mid_send_does_not_duplicate_the_study(demo):
    study = demo.add_study(seed=4105)
    demo.stop_process("dic-worker")
    demo.start_workers(name="dic-worker-a")
    before = _stored_instances(demo)
    task_id = demo.submit(study)
    end = time.monotonic() + 300
    while time.monotonic() < end and _stored_instances(demo) == before:
        time.sleep(0.005)
    demo.procs["dic-worker-a"].send_signal(signal.SIGKILL)   # some instances are at the provider
    at_kill = _stored_instances(demo) - before
    demo.stop_process("dic-worker-a")
    assert 0 < at_kill < demo.slices, f"not killed in the middle of the send ({at_kill} of {demo.slices} there)"
    demo.start_workers(name="dic-worker")
    task = demo.wait(task_id, timeout=600)
    assert task["status"] == "completed", outputs(task)
    # exactly one copy of each instance at the provider: index rows and files agree, study by study
    with sqlite3.connect(demo.provider_store / "index.sqlite") as db:
        rows = dict(db.execute("SELECT study_uid, COUNT(DISTINCT sop_uid) FROM instances GROUP BY study_uid").fetchall())
    for study_uid, instances in rows.items():
        assert len(list((demo.provider_store / "files" / study_uid).rglob("*.dcm"))) == instances
    assert _stored_instances(demo) - before == demo.slices
    # the retry sent only what was missing
    sent = [e for e in AuditTrail(demo.folder / "sites" / "dic-audit.sqlite").events(demo.business_key(task_id))
            if e.action == "sent"]
    assert len(sent) == 1, sent
    assert sent[0].details["already_there"] >= at_kill
    assert sent[0].details["sent_now"] + sent[0].details["already_there"] == demo.slices


def test_cohort_by_query_completes_each_study_once(demo, tmp_path):
    """`omi submit --query`: QIDO-RS at the site's own gateway (the legacy PACS behind it) picks the
    studies; every one runs through every step and completes once; run again, nothing is submitted."""
    import csv
    import json
    import subprocess
    import sys

    from omi_dsf.client.requests import request_tasks
    from omi_dsf.demo import PROVIDER
    from omi_dsf.dsf.tasks import input_value

    studies = [demo.add_study(seed=4120 + n, patient={"id": f"QRY{4120 + n}"}) for n in range(3)]
    demo.add_study(seed=4130)            # in the PACS too, but not what the query asks for
    before = _stored_instances(demo)
    earlier = {t["id"] for t in request_tasks(demo.dsf, 1000)}

    def started() -> dict[str, int]:   # start Tasks per study since the test began
        uids = [input_value(t, "study-instance-uid") for t in request_tasks(demo.dsf, 1000) if t["id"] not in earlier]
        return {st.uid: uids.count(st.uid) for st in studies}

    record = tmp_path / "query.record.csv"
    cmd = [sys.executable, "-m", "omi_dsf", "submit", "--query", "ModalitiesInStudy=CT&PatientID=QRY*",
           "--record", str(record), "--service", "lung-seg", "--provider", PROVIDER,
           "--site", str(demo.sites["dic"]), "--parallel", "2", "--interval", "0.5", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout)
    assert (s["studies"], s["completed"], s["failed"], s["pending"]) == (3, 3, 0, 0), s
    with record.open() as f:
        rows = {row["study_uid"]: row for row in csv.DictReader(f)}
    assert set(rows) == {st.uid for st in studies}
    for st in studies:
        row = rows[st.uid]
        assert row["status"] == "completed" and row["attempts"] == "1" and row["patient"] == st.patient_id
        assert row["stored_study_uid"] == st.uid and row["result_location"].startswith(demo.provider_gw)
    assert "QRY41" not in r.stdout + r.stderr                 # no patient identifiers in the output

    # once each: one start Task per study, its images once at the provider, one SEG and one SR back
    assert started() == {st.uid: 1 for st in studies}
    assert _stored_instances(demo) - before == 3 * demo.slices
    results = _pacs_results(demo)
    for st in studies:
        assert sorted(str(x.Modality) for x in results if str(x.StudyInstanceUID) == st.uid) == ["SEG", "SR"]

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)   # resumes: all finished
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["completed"] == 3
    assert started() == {st.uid: 1 for st in studies}
    assert_nothing_identifying_at_provider(demo)
