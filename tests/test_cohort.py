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
