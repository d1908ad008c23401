"""The pseudonymize step handler: folder in, de-identified folder out, errors as StepError."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from omi_dsf.deid import instance_io

from omi_dsf.config import ConfigError
from omi_dsf.steps.api import StepContext, StepError
from omi_dsf.steps.pseudonymize import pseudonymize
from omi_dsf.testkit import synthetic
from omi_dsf.testkit.phantom import write_ct_study


@pytest.fixture
def site(tmp_path):
    paths = write_ct_study(tmp_path / "staging", slices=4, rows=32, cols=32, seed=5)
    first = pydicom.dcmread(paths[0])
    study_dir = tmp_path / "pacs" / first.StudyInstanceUID
    study_dir.mkdir(parents=True)
    for p in paths:
        p.rename(study_dir / p.name)
    key = tmp_path / "site.key"
    key.write_text("pseudonymize-step-key-0123456789")
    cfg = {"pseudonymization": {
        "domain": "omi-test", "key_file": str(key), "store": str(tmp_path / "site.sqlite"),
        "options": ["retain-modified-dates", "retain-patient-characteristics"],
        "source": {"kind": "folder", "path": str(tmp_path / "pacs" / "{study_uid}")},
        "sink": {"kind": "folder", "path": str(tmp_path / "outbox" / "{business_key}")},
    }}
    return tmp_path, cfg, first


def burned_in(site, index: int):
    """Make the study's instance `index` (0-based) declare burned-in text; (its path, dataset)."""
    tmp, _, first = site
    victim = sorted((tmp / "pacs" / first.StudyInstanceUID).iterdir())[index]
    ds = pydicom.dcmread(victim)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(victim)
    return victim, ds


def ctx(cfg, key="bk-1"):
    return StepContext(topic="pseudonymize", business_key=key, site=cfg)


def test_pseudonymize_step_writes_deidentified_study(site):
    tmp, cfg, first = site
    out = pseudonymize({"study-instance-uid": first.StudyInstanceUID,
                        "patient-identifier": first.PatientID}, ctx(cfg))
    assert out["instance-count"] == 4 and out["byte-count"] > 4 * 2048
    assert out["pseudonym"].startswith("PSN-")
    files = sorted(Path(out["pseudonymized-study-location"]).glob("*.dcm"))
    assert len(files) == 4
    ds = pydicom.dcmread(files[0])
    assert ds.StudyInstanceUID == out["pseudonymized-study-instance-uid"] != first.StudyInstanceUID
    assert ds.PatientID == out["pseudonym"] and ds.PatientIdentityRemoved == "YES"
    assert str(first.PatientName) not in files[0].read_bytes().decode("latin-1")
    # a retry of the same work item gives the same result (idempotent outputs)
    again = pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx(cfg))
    assert again == out
    # as the worker runtime calls it: only the work item's output items are answered
    wanted = ("pseudonym", "pseudonymized-study-instance-uid", "instance-count")
    runtime_ctx = StepContext(topic="pseudonymize", business_key="bk-1", site=cfg, outputs=wanted)
    assert pseudonymize({"study-instance-uid": first.StudyInstanceUID}, runtime_ctx) == \
        {k: out[k] for k in wanted}


def test_wrong_patient_is_refused_and_nothing_left(site):
    tmp, cfg, first = site
    with pytest.raises(StepError, match=r"PatientID \(0010,0020\) does not match the requested patient"):
        pseudonymize({"study-instance-uid": first.StudyInstanceUID, "patient-identifier": "SOMEONE"},
                     ctx(cfg, "bk-2"))
    assert list((tmp / "outbox" / "bk-2").glob("*")) == []


def test_unknown_study_and_missing_inputs(site):
    tmp, cfg, first = site
    with pytest.raises(StepError, match="study was not found in the configured source") as err:
        pseudonymize({"study-instance-uid": "1.2.3.4"}, ctx(cfg))
    assert "1.2.3.4" not in str(err.value) and str(tmp) not in str(err.value)
    with pytest.raises(StepError, match="study-instance-uid is missing"):
        pseudonymize({}, ctx(cfg))
    bad = {"pseudonymization": {**cfg["pseudonymization"], "options": ["retain-all"]}}
    with pytest.raises(ConfigError, match="pseudonymization.options: unknown de-identification option 'retain-all'"):
        ctx(bad)   # refused with the settings, before any step runs
    nodomain = {"pseudonymization": {k: v for k, v in cfg["pseudonymization"].items() if k != "domain"}}
    with pytest.raises(ConfigError, match="pseudonymization.domain: required"):
        ctx(nodomain)
    with pytest.raises(StepError, match="steps.pseudonymization is missing"):
        pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx({}))


def test_leak_stops_the_step_and_removes_partial_output(site, monkeypatch):
    tmp, cfg, first = site
    # the third instance declares burned-in text, which no pixel recipe covers
    victim, ds = burned_in(site, 2)
    with pytest.raises(StepError, match=r"BurnedInAnnotation \(0028,0301\)"):
        pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx(cfg, "bk-3"))
    assert list((tmp / "outbox" / "bk-3").glob("*.dcm")) == []
    # an attribute the profile keeps (Manufacturer) carrying the patient's name
    ds.BurnedInAnnotation = "NO"
    ds.Manufacturer = f"Scanner of {str(first.PatientName).split('^')[0]}"
    ds.save_as(victim)
    with pytest.raises(StepError, match=r"identifying value in Manufacturer \(0008,0070\): name part of PatientName \(rule: ") as err:
        pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx(cfg, "bk-4"))
    assert str(first.PatientName).split("^")[0] not in str(err.value)
    assert list((tmp / "outbox" / "bk-4").glob("*.dcm")) == []


def test_source_and_sink_are_pluggable(site):
    tmp, cfg, first = site
    received = []

    class MemorySink:
        def write(self, ds, data):
            assert data[128:132] == b"DICM"
            received.append(ds)
            return len(data)

        def close(self):
            return "memory:"

        def abort(self):
            received.clear()

    instance_io.register_source("memory", lambda c, p: [("m0", synthetic.ct_instance(0)),
                                                       ("m1", synthetic.ct_instance(1))])
    instance_io.register_sink("memory", lambda c, p: MemorySink())
    mem = {"pseudonymization": {**cfg["pseudonymization"], "source": {"kind": "memory"},
                                "sink": {"kind": "memory"}}}
    out = pseudonymize({"study-instance-uid": synthetic.ct_instance(0).StudyInstanceUID}, ctx(mem))
    assert out["pseudonymized-study-location"] == "memory:" and len(received) == 2
    with pytest.raises(ConfigError, match="pseudonymization.source.kind: unknown kind 'pigeon'"):
        ctx({"pseudonymization": {**mem["pseudonymization"], "source": {"kind": "pigeon"}}})


def test_pixel_data_pass_through_unchanged(site, tmp_path):
    """Native and encapsulated pixel data leave exactly as they came in."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    from omi_dsf.deid.pipeline import StudyPseudonymizer
    from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider
    from omi_dsf.deid.store import SiteStore

    tmp, cfg, first = site
    native = next((tmp / "pacs" / first.StudyInstanceUID).iterdir())
    enc = pydicom.dcmread(native)
    enc.file_meta.TransferSyntaxUID = RLELossless
    enc.PixelData = encapsulate([b"\x01\x02\x03\x04" * 7, b"\x05\x06" * 9])
    enc["PixelData"].VR = "OB"
    enc.NumberOfFrames = 2
    enc.SOPInstanceUID = enc.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    enc.save_as(tmp_path / "enc.dcm", enforce_file_format=True)
    store = SiteStore()
    sp = StudyPseudonymizer(key=b"k" * 20, domain="omi", provider=EmbeddedProvider(b"k" * 20, store),
                            store=store)
    for path in (native, tmp_path / "enc.dcm"):
        out = sp.process_encoded(path, path.name)
        back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(out.data))
        assert back.PixelData == pydicom.dcmread(path).PixelData
        assert back.PatientID == sp.result.pseudonym


def test_empty_study_folder_is_a_step_error(site):
    tmp, cfg, first = site
    (tmp / "pacs" / "1.2.3.empty").mkdir()
    with pytest.raises(StepError, match="no instances of the study"):
        pseudonymize({"study-instance-uid": "1.2.3.empty"}, ctx(cfg, "bk-empty"))


def test_step_errors_name_the_instance_not_the_file(site):
    tmp, cfg, first = site
    study_dir = tmp / "pacs" / first.StudyInstanceUID
    (study_dir / "zz_Mustermann_Max.txt").write_text("not an image")
    with pytest.raises(StepError, match=r"instance 5: not a DICOM file") as err:
        pseudonymize({"study-instance-uid": first.StudyInstanceUID}, ctx(cfg, "bk-5"))
    assert "Mustermann" not in str(err.value)
    assert list((tmp / "outbox" / "bk-5").glob("*.dcm")) == []
