"""The synthetic CT phantom: valid DICOM, deterministic per seed, distinct across seeds, true ground truth."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from helpers_cli import run_cli
from omi_dsf.testkit import phantom


def _write(tmp_path, name, **kw):
    kw = {"slices": 4, "rows": 64, "cols": 64, **kw}
    return phantom.write_ct_study(tmp_path / name, **kw)


def test_series_is_valid_ct_with_complete_headers(tmp_path):
    paths = _write(tmp_path, "a", slices=5)
    assert len(paths) == 5
    dss = [pydicom.dcmread(p) for p in paths]
    for k, ds in enumerate(dss):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT" and ds.BodyPartExamined == "CHEST"
        assert ds.InstanceNumber == k + 1
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(-2.5 * k)
        assert float(ds.SliceLocation) == pytest.approx(-2.5 * k)
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                   "StudyDate", "StudyTime", "InstitutionName", "ReferringPhysicianName", "StationName",
                   "DeviceSerialNumber", "OperatorsName", "StudyDescription", "SeriesDescription",
                   "FrameOfReferenceUID", "PixelSpacing", "WindowCenter", "KVP"):
            assert ds.get(kw) not in (None, ""), kw
        assert ds.private_block(phantom.PRIVATE_GROUP, phantom.PRIVATE_CREATOR)[0x02].value == ds.PatientID
    assert len({ds.SOPInstanceUID for ds in dss}) == 5
    assert len({(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) for ds in dss}) == 1
    assert str(dss[0].PatientName) == "Mustermann^Max"


def test_pixels_are_the_ground_truth_in_hounsfield_units(tmp_path):
    paths = _write(tmp_path, "a", slices=3)
    labels = phantom.phantom_labels(3, 0, 64, 64)
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        for label, expected in ((phantom.AIR, -1000), (phantom.BODY, 40), (phantom.LUNG, -850), (phantom.BONE, 700)):
            region = hu[labels[k] == label]
            assert region.size > 0, label
            assert abs(np.median(region) - expected) < 15, (label, np.median(region))


def test_same_seed_same_bytes_other_seed_other_patient(tmp_path):
    a, b, c = _write(tmp_path, "a"), _write(tmp_path, "b"), _write(tmp_path, "c", seed=1)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    da, dc = pydicom.dcmread(a[0]), pydicom.dcmread(c[0])
    assert da.StudyInstanceUID != dc.StudyInstanceUID and da.SOPInstanceUID != dc.SOPInstanceUID
    assert da.PatientID != dc.PatientID and da.PatientName != dc.PatientName
    # several studies can share a directory without overwriting each other
    both = _write(tmp_path, "shared") + _write(tmp_path, "shared", seed=5)
    assert len({p.name for p in both}) == 8


def test_patient_override(tmp_path):
    ds = pydicom.dcmread(_write(tmp_path, "a", slices=1, patient={"name": "Test^Tina", "sex": "F"})[0])
    assert str(ds.PatientName) == "Test^Tina" and ds.PatientSex == "F"


def test_lung_ground_truth_is_two_lungs_of_plausible_volume():
    from scipy import ndimage

    mask = phantom.known_lung_mask(slices=20, rows=128, cols=128)
    _, n = ndimage.label(mask)
    assert n == 2
    ml = phantom.lung_volume_ml(mask, (0.7 * 4, 0.7 * 4), 2.5)  # 128 matrix over the same field as 512
    assert 500 < ml < 6000


def test_bad_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="slices"):
        phantom.write_ct_study(tmp_path, slices=0)


def test_cli_writes_study(tmp_path):
    out = tmp_path / "cli"
    r = run_cli("sample-study", "--slices", "2", "--rows", "32", "--cols", "32", "--out", str(out), "--seed", "3")
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 2
    name = str(pydicom.dcmread(files[0]).PatientName)
    assert name not in r.stdout + r.stderr  # no patient data on the console


def test_cached_study_is_written_once_and_an_interrupted_one_again(tmp_path):
    first = phantom.cached_ct_study(tmp_path, slices=2, seed=3, rows=16)
    assert len(first) == 2
    stamp = first[0].stat().st_mtime_ns
    assert phantom.cached_ct_study(tmp_path, slices=2, seed=3, rows=16) == first
    assert first[0].stat().st_mtime_ns == stamp            # reused, not written again
    (first[0].parent / ".complete").unlink()                # as if interrupted while written
    first[1].unlink()
    assert len(phantom.cached_ct_study(tmp_path, slices=2, seed=3, rows=16)) == 2
