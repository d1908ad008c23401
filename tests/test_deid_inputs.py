"""Bad input gets a clear error naming the file; the input is never touched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pydicom
import pytest

from omi_dsf.cli import main
from omi_dsf.deid.pipeline import DeidError, StudyPseudonymizer, read_instance
from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider
from omi_dsf.deid.store import SiteStore
from omi_dsf.testkit import synthetic
from omi_dsf.testkit.phantom import write_ct_study

KEY = b"input-test-key-0123456789"


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def study(tmp_path):
    write_ct_study(tmp_path / "in", slices=3, rows=32, cols=32, seed=3)
    key = tmp_path / "key"
    key.write_text("a-site-key-that-is-long-enough\n")
    return tmp_path, key


def deid(tmp, key, *extra, out="out"):
    return main(["deid", str(tmp / "in"), str(tmp / out), "--domain", "omi", "--key-file", str(key),
                 "--store", str(tmp / "site.sqlite"), *extra])


def test_cli_deidentifies_and_leaves_input_untouched(study, capsys):
    tmp, key = study
    before = digest(tmp / "in")
    assert deid(tmp, key, "--option", "retain-modified-dates") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["instances"] == 3 and summary["pseudonym"].startswith("PSN-")
    assert len(list((tmp / "out").glob("*.dcm"))) == 3
    assert digest(tmp / "in") == before


def test_non_dicom_file(study, capsys):
    tmp, key = study
    (tmp / "in" / "notes.txt").write_text("not an image")
    before = digest(tmp / "in")
    assert deid(tmp, key) == 2
    assert "notes.txt: not a DICOM file" in capsys.readouterr().err
    assert digest(tmp / "in") == before
    assert list((tmp / "out").glob("*.dcm")) == []  # nothing half-done left behind


def test_truncated_file(study, capsys):
    tmp, key = study
    victim = sorted((tmp / "in").glob("*.dcm"))[1]
    victim.write_bytes(victim.read_bytes()[:-700])
    assert deid(tmp, key) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "truncated" in err


def test_missing_patient_id():
    ds = synthetic.ct_instance()
    del ds.PatientID
    store = SiteStore()
    sp = StudyPseudonymizer(key=KEY, domain="omi", provider=EmbeddedProvider(KEY, store), store=store)
    with pytest.raises(DeidError, match=r"^x\.dcm \(SOPInstanceUID 2\.25\.\d+\): missing PatientID \(0010,0020\) \(rule: "):
        sp.process_one(ds, "x.dcm")


def test_two_patients_in_one_study_refused():
    store = SiteStore()
    sp = StudyPseudonymizer(key=KEY, domain="omi", provider=EmbeddedProvider(KEY, store), store=store)
    sp.process_one(synthetic.ct_instance(), "a")
    with pytest.raises(DeidError, match=r"PatientID \(0010,0020\) differs from the study's first instance \(rule: one patient per study\)"):
        sp.process_one(synthetic.ct_instance(patient={"id": "SOMEONE-ELSE"}), "b")


def test_unknown_option(study, capsys):
    tmp, key = study
    with pytest.raises(SystemExit) as exc:
        deid(tmp, key, "--option", "retain-everything")
    assert exc.value.code == 2
    assert "retain-everything" in capsys.readouterr().err


def test_key_missing_or_short(study, capsys, monkeypatch):
    tmp, _ = study
    monkeypatch.delenv("OMI_DEID_KEY", raising=False)
    monkeypatch.delenv("OMI_DEID_KEY_FILE", raising=False)
    short = tmp / "short"
    short.write_text("tiny")
    assert deid(tmp, short) == 2
    assert "at least 16" in capsys.readouterr().err
    assert main(["deid", str(tmp / "in"), str(tmp / "o2"), "--domain", "omi"]) == 2
    assert "no key" in capsys.readouterr().err


def test_key_from_environment(study, monkeypatch, capsys):
    tmp, _ = study
    monkeypatch.setenv("OMI_DEID_KEY", "environment-key-0123456789")
    assert main(["deid", str(tmp / "in"), str(tmp / "o3"), "--domain", "omi",
                 "--store", str(tmp / "s.sqlite")]) == 0


def test_output_must_differ_from_input(study, capsys):
    tmp, key = study
    assert main(["deid", str(tmp / "in"), str(tmp / "in"), "--domain", "omi", "--key-file", str(key)]) == 2
    assert "never modified" in capsys.readouterr().err


def test_read_instance_reports_missing_file(tmp_path):
    with pytest.raises(DeidError, match="no such file"):
        read_instance(tmp_path / "nope.dcm", "nope.dcm")


def test_cli_round_trip_reidentifies(study, capsys):
    tmp, key = study
    assert deid(tmp, key) == 0
    capsys.readouterr()
    assert main(["deid", str(tmp / "out"), str(tmp / "back"), "--domain", "omi", "--key-file", str(key),
                 "--store", str(tmp / "site.sqlite"), "--reidentify"]) == 0
    originals = {d.SOPInstanceUID: d for d in map(pydicom.dcmread, (tmp / "in").iterdir())}
    back = [pydicom.dcmread(p) for p in (tmp / "back").iterdir()]
    assert len(back) == 3
    for ds in back:
        o = originals[ds.SOPInstanceUID]
        assert (ds.PatientID, ds.PatientName, ds.StudyInstanceUID, ds.SeriesInstanceUID) == \
            (o.PatientID, o.PatientName, o.StudyInstanceUID, o.SeriesInstanceUID)
    # another domain cannot re-identify: clear error, exit 2
    assert main(["deid", str(tmp / "out"), str(tmp / "back2"), "--domain", "elsewhere", "--key-file",
                 str(key), "--store", str(tmp / "site.sqlite"), "--reidentify"]) == 2
    assert "not a pseudonym of domain 'elsewhere'" in capsys.readouterr().err
