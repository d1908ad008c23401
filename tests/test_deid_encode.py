"""Our Part 10 encoder writes exactly the bytes pydicom writes, for every kind of input we see."""

from __future__ import annotations

import copy
import io

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from omi_dsf.deid.leakcheck import PIXEL_TAGS
from omi_dsf.deid.pipeline import StudyPseudonymizer, encode_part10
from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider
from omi_dsf.deid.store import SiteStore
from omi_dsf.testkit import synthetic
from omi_dsf.testkit.phantom import write_ct_study

KEY = b"encode-test-key-0123456789"


def pydicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    copy.deepcopy(ds).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def variants(tmp_path):
    """Files as they come from PACS: explicit VR, implicit VR, encapsulated, nested sequences."""
    phantom = write_ct_study(tmp_path / "ct", slices=1, rows=32, cols=32, seed=4)[0]
    yield "explicit", phantom
    ds = synthetic.ct_instance()
    ds["PixelData"].VR = "OW"
    ds.save_as(tmp_path / "nested.dcm", enforce_file_format=True)
    yield "nested-sequences-private", tmp_path / "nested.dcm"
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(tmp_path / "implicit.dcm", enforce_file_format=True)
    yield "implicit", tmp_path / "implicit.dcm"
    enc = pydicom.dcmread(phantom)
    enc.file_meta.TransferSyntaxUID = RLELossless
    enc.PixelData = encapsulate([b"\x01\x02" * 11, b"\x03\x04" * 5])
    enc["PixelData"].VR = "OB"
    enc.NumberOfFrames = 2
    enc.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    yield "encapsulated", tmp_path / "rle.dcm"


def test_encoder_matches_pydicom_before_and_after_deid(tmp_path, monkeypatch):
    from omi_dsf.deid import encode

    def no_fallback(*_):
        raise AssertionError("files read from disk must take the fast path")
    monkeypatch.setattr(encode, "_pydicom_bytes", no_fallback)
    seen = 0
    for label, path in variants(tmp_path):
        ds = pydicom.dcmread(path)
        data, end = encode_part10(ds)
        assert data == pydicom_bytes(pydicom.dcmread(path)), f"{label}: as read"
        store = SiteStore()
        sp = StudyPseudonymizer(key=KEY, domain="omi", provider=EmbeddedProvider(KEY, store), store=store,
                                options=["retain-modified-dates", "clean-descriptors", "retain-safe-private"])
        out = sp.process_encoded(path, label)
        assert out.data == pydicom_bytes(out.dataset), f"{label}: de-identified"
        back = pydicom.dcmread(io.BytesIO(out.data))
        assert back.PixelData == pydicom.dcmread(path).PixelData
        # everything before `end` is header, everything after is pixel data
        assert data[end:end + 4] == b"\xe0\x7f\x10\x00"
        seen += 1
    assert seen == 4


def test_in_memory_datasets_take_pydicom_path():
    ds = synthetic.ct_instance()  # never read from a file: no original encoding
    data, end = encode_part10(ds)
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.PatientID == ds.PatientID and back.PixelData == ds.PixelData
    assert data[end:end + 4] == b"\xe0\x7f\x10\x00"
    assert set(PIXEL_TAGS) >= {0x7FE00010}


@pytest.mark.parametrize("length", [0, 1, 0xFFFF + 2])
def test_odd_lengths_and_long_values(tmp_path, length):
    ds = pydicom.dcmread(write_ct_study(tmp_path / "c", slices=1, rows=16, cols=16)[0])
    ds.ImageComments = "x" * length   # UT-like LT beyond 64 KiB goes through pydicom's UN rule
    ds.save_as(tmp_path / "odd.dcm", enforce_file_format=True)
    read = pydicom.dcmread(tmp_path / "odd.dcm")
    assert encode_part10(read)[0] == pydicom_bytes(pydicom.dcmread(tmp_path / "odd.dcm"))


def test_file_meta_written_as_read_unless_pydicom_would_change_it(tmp_path, monkeypatch):
    """A complete file meta is written by us, byte for byte as pydicom writes it; one missing an
    element pydicom's writer adds (or fills in, or refuses without) goes through pydicom."""
    from omi_dsf.deid import encode

    path = write_ct_study(tmp_path / "c", slices=1, rows=16, cols=16, seed=2)[0]
    calls = []
    real = encode.write_file_meta_info
    monkeypatch.setattr(encode, "write_file_meta_info", lambda *a, **k: calls.append(1) or real(*a, **k))
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"   # decoded next to undecoded
    assert encode_part10(ds)[0] == pydicom_bytes(ds) and calls == []
    for keyword, value in [("ImplementationVersionName", None), ("FileMetaInformationVersion", b""),
                           ("ImplementationClassUID", None), ("FileMetaInformationGroupLength", None)]:
        ds = pydicom.dcmread(path)
        if value is None:
            del ds.file_meta[keyword]
        else:
            setattr(ds.file_meta, keyword, value)
        calls.clear()
        assert encode_part10(ds)[0] == pydicom_bytes(ds), keyword
        assert calls == ([] if keyword == "FileMetaInformationGroupLength" else [1]), keyword
    ds = pydicom.dcmread(path)
    del ds.file_meta.MediaStorageSOPClassUID
    with pytest.raises(AttributeError, match="Media Storage SOP Class UID"):
        encode_part10(ds)
