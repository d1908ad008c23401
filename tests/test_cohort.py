"""The cohort file, the cohort record and its summary, without a DSF (the run against the DSF test
bed is in test_client_dsf.py)."""

from __future__ import annotations

import os
import stat

import pytest

from omi_dsf.client.cohort import Record, read_cohort_csv, retry_failed, summary, summary_text
from omi_dsf.dicomweb.query import is_uid
from omi_dsf.errors import UserError


def test_cohort_csv_with_and_without_header(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("StudyInstanceUID,PatientID\n1.2.3,P1\n\n# a comment\n 1.2.4 , P2 \n")
    assert read_cohort_csv(f, is_uid) == [("1.2.3", "P1"), ("1.2.4", "P2")]
    f.write_text("1.2.3,P1\n")
    assert read_cohort_csv(f, is_uid) == [("1.2.3", "P1")]


@pytest.mark.parametrize("text, message", [
    ("1.2.3,P1\n1.2.03,P2\n", "line 2: '1.2.03' is not a valid DICOM UID"),
    ("1.2.3,P1\n1.2.4\n", "line 2: needs two columns"),
    ("1.2.3,P1\n1.2.3,P2\n", "line 2: study 1.2.3 is listed twice"),
    ("uid,patient\n", "no studies"),
    ("1.2.3,P\x1b[2J\n", "line 1: the patient identifier is not a printable value"),
])
def test_bad_cohort_rows_are_named(tmp_path, text, message):
    f = tmp_path / "c.csv"
    f.write_text(text)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_cohort_csv(f, is_uid)


def test_missing_cohort_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="No such file"):
        read_cohort_csv(tmp_path / "none.csv", is_uid)


def test_record_round_trip_resume_and_retry(tmp_path):
    rec = Record(tmp_path / "r.csv")
    assert rec.add([("1.2.3", "P1"), ("1.2.4", "P2"), ("1.2.5", "P3")]) == 3
    rec.save()
    assert stat.S_IMODE(os.stat(rec.path).st_mode) == 0o600        # it names patients
    rec.update("1.2.3", status="completed", step="", result_location="infer-x")
    rec.update("1.2.4", status="failed", step="pseudonymize", error="denied\nfor a reason")
    again = Record(rec.path).load()
    assert again.add([("1.2.3", "P1"), ("1.2.6", "P4")]) == 1      # known studies stay as they are
    assert again.rows["1.2.3"]["status"] == "completed" and again.rows["1.2.3"]["result_location"] == "infer-x"
    s = summary(again)
    assert (s["studies"], s["completed"], s["failed"], s["pending"]) == (4, 1, 1, 2)
    assert s["failed_by_reason"] == {"pseudonymize: denied for a reason": 1}
    assert "1 failed" in summary_text(s) and "pseudonymize: denied for a reason" in summary_text(s)
    again.update("1.2.5", status="refused", step="consent", error="no consent")
    assert retry_failed(again) == 1                                # refused by consent is not retried
    assert [r["study_uid"] for r in again.with_status("pending")] == ["1.2.4", "1.2.6"]


def test_not_a_record_is_refused(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="is not a cohort record"):
        Record(tmp_path / "x.csv").load()


def test_one_run_per_record(tmp_path):
    a, b = Record(tmp_path / "r.csv"), Record(tmp_path / "r.csv")
    assert a.lock()
    assert not b.lock()                                            # a second run is refused
    a.unlock()
    assert b.lock()
    b.unlock()


def test_submit_needs_one_source(tmp_path, capsys):
    from omi_dsf.cli import main

    site = tmp_path / "site.yaml"
    site.write_text("site: dic.test\n")
    assert main(["submit", "--service", "s", "--site", str(site)]) == 2
    assert "give one of --study (with --patient), --cohort FILE or --query QUERY" in capsys.readouterr().err
    assert main(["submit", "--cohort", "a.csv", "--query", "PatientID=1", "--service", "s", "--site", str(site)]) == 2
    assert "not --cohort and --query" in capsys.readouterr().err
    assert main(["submit", "--query", "PatientID=1", "--service", "s", "--site", str(site)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_query_finds_the_studies_at_the_gateway(tmp_path):
    """--query's studies from the real gateway app (embedded store, in process), page by page."""
    from pathlib import Path

    import pydicom
    from starlette.testclient import TestClient

    from omi_dsf.client.cohort import query_studies
    from omi_dsf.dicomweb.app import create_app as gateway_app
    from omi_dsf.dicomweb.config import parse_config as gateway_config
    from omi_dsf.dicomweb_client import DicomwebClient
    from omi_dsf.testkit.phantom import write_ct_study

    cfg = gateway_config({"auth": {"anonymous": True},
                          "backends": {"PACS": {"type": "store", "path": str(tmp_path / "store")}}})
    expected = set()
    with TestClient(gateway_app(cfg), base_url="http://gw.test") as gw:
        for seed in range(3):
            files = write_ct_study(tmp_path / f"study{seed}", slices=1, seed=seed, rows=16, cols=16)
            body = b"".join(b"--B\r\nContent-Type: application/dicom\r\n\r\n" + Path(f).read_bytes() + b"\r\n"
                            for f in files) + b"--B--\r\n"
            assert gw.post("/studies", content=body, headers={
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=B'}).status_code == 200
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            expected.add((ds.StudyInstanceUID, str(ds.PatientID)))
        client = DicomwebClient(http=gw, url="http://gw.test")
        asked: list[str] = []
        gw.event_hooks["request"] = [lambda request: asked.append(str(request.url))]
        assert set(query_studies(client, "ModalitiesInStudy=CT", is_uid, page=2)) == expected
        # the two keys it reads, not the defaults a DIMSE gateway computes per study
        assert asked and all("includedefaults=false" in url for url in asked)
        one = sorted(expected)[0]
        assert query_studies(client, f"PatientID={one[1]}", is_uid) == [one]
        with pytest.raises(UserError, match="found no studies"):
            query_studies(client, "PatientID=nobody-here", is_uid)
        with pytest.raises(UserError, match="limit are set by omi"):
            query_studies(client, "limit=5", is_uid)
        with pytest.raises(UserError, match="includedefaults are set by omi"):
            query_studies(client, "includedefaults=true", is_uid)
        with pytest.raises(UserError, match="is not of the form key=value"):
            query_studies(client, "ModalitiesInStudy", is_uid)
