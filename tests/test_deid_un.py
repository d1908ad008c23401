"""Elements stored as UN (PS3.5 6.2.2) are de-identified, leak-checked and re-identified like any
other: a known SQ tag as UN is read as an implicit VR little endian sequence (also in a big endian
file), an unknown one when it parses as a sequence; what is no sequence is removed unless a rule
keeps it, and the leak check treats it as a value that may identify."""

from __future__ import annotations

import io
import struct
from contextlib import contextmanager

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian

from omi_dsf.deid.deidentify import uid_for
from omi_dsf.deid.identity import Identity
from omi_dsf.testkit import synthetic
from omi_dsf.deid.leakcheck import (RULE_BYTES, RULE_OPAQUE, LeakError, encoded_hits,
                                    find_hits)
from omi_dsf.deid.pipeline import StudyPseudonymizer
from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider
from omi_dsf.deid.reidentify import Reidentifier
from omi_dsf.deid.store import SiteStore
from omi_dsf.deid.un import parse_sequence

KEY = b"un-test-key-0123456789abcdef"
P = synthetic.PATIENT
RT_PLAN_SEQ = 0x300C0002           # ReferencedRTPlanSequence


def implicit_items(*items: Dataset, undefined: bool = False) -> bytes:
    """Items encoded as PS3.5 6.2.2 says a UN sequence is: implicit VR little endian."""
    out = b""
    for item in items:
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, True
        write_dataset(buf, item)
        body = buf.getvalue()
        if undefined:
            out += b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + body + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
        else:
            out += b"\xfe\xff\x00\xe0" + struct.pack("<I", len(body)) + body
    return out


def identity_item(other_sop: str) -> Dataset:
    """What a converter that did not know the tag leaves: the patient and another instance's UID."""
    item = Dataset()
    item.PatientName = P["name"]
    item.PatientID = P["id"]
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"
    item.ReferencedSOPInstanceUID = other_sop
    return item


def pipeline(store=None, **kw):
    store = store or SiteStore()
    return StudyPseudonymizer(key=KEY, domain="omi", provider=EmbeddedProvider(KEY, store), store=store, **kw)


def assert_no_identity_bytes(data: bytes, *values: str) -> None:
    for v in values:
        assert v.encode() not in data, "an identifying value is still in the written bytes"


def un(tag: int, value: bytes, undefined: bool = False) -> RawDataElement:
    """An element as a converter that did not know its VR writes it: UN."""
    return RawDataElement(Tag(tag), "UN", 0xFFFFFFFF if undefined else len(value), value, 0, False, True)


def study_with_un(tag: int, value: bytes, *, undefined: bool = False, n: int = 3) -> list[Dataset]:
    out = []
    for i in range(n):
        ds = synthetic.ct_instance(i)
        ds[tag] = un(tag, value, undefined)
        out.append(ds)
    return out


@contextmanager
def un_stays_un():
    """pydicom turns UN into the dictionary's VR when it writes; a test file must keep UN."""
    before = pydicom.config.replace_un_with_known_vr
    pydicom.config.replace_un_with_known_vr = False
    try:
        yield
    finally:
        pydicom.config.replace_un_with_known_vr = before


def _part10(ds: Dataset, path=None) -> bytes:
    buf = io.BytesIO()
    with un_stays_un():
        ds.save_as(path or buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("undefined", [False, True], ids=["defined-length", "undefined-length"])
def test_known_sequence_stored_as_un_is_deidentified(undefined):
    other_sop = synthetic.uid(P["id"], "s1", "sop", 2)
    value = implicit_items(identity_item(other_sop))
    sp = pipeline()
    outs = [sp.process_encoded(_part10(ds), f"f{i}.dcm")
            for i, ds in enumerate(study_with_un(RT_PLAN_SEQ, value, undefined=undefined))]
    for out in outs:
        assert_no_identity_bytes(out.data, P["id"], "Schneider", other_sop)
        back = pydicom.dcmread(io.BytesIO(out.data))
        assert back.get_item(RT_PLAN_SEQ).VR == "SQ"  # written as the sequence it is
        item = back[RT_PLAN_SEQ].value[0]
        # the reference still points at the other instance, now by its pseudonymized UID
        assert item.ReferencedSOPInstanceUID == uid_for(KEY, "omi", other_sop)
        assert str(item.PatientName) == "" and item.get("PatientID", "") == ""


def test_pydicom_rtdose_files_leave_without_their_plan_uid():
    """pydicom's own RT Dose files carry ReferencedRTPlanSequence as UN (defined length)."""
    plan_uid = "1.2.123.456.78.9.0123.4567.89012345678901"
    for name in ("rtdose_rle.dcm", "rtdose_rle_1frame.dcm"):
        path = get_testdata_file(name)
        assert pydicom.dcmread(path).get_item(RT_PLAN_SEQ).VR == "UN"
        out = pipeline().process_encoded(path, name)
        assert_no_identity_bytes(out.data, plan_uid)
        back = pydicom.dcmread(io.BytesIO(out.data))
        assert back.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == uid_for(KEY, "omi", plan_uid)


def test_nested_un_sequences_are_walked():
    other_sop = synthetic.uid(P["id"], "s1", "sop", 7)
    inner = implicit_items(identity_item(other_sop))
    outer_item = Dataset()
    outer_item[0x300C0020] = un(0x300C0020, inner)   # ReferencedFractionGroupSequence as UN
    with un_stays_un():
        outer = implicit_items(outer_item)     # a UN sequence whose item holds another one
    ds = study_with_un(RT_PLAN_SEQ, outer, n=1)[0]
    ds.ReferencedImageSequence[0][RT_PLAN_SEQ] = un(RT_PLAN_SEQ, outer)   # and one inside an SQ item
    out = pipeline().process_encoded(_part10(ds), "nested.dcm")
    assert_no_identity_bytes(out.data, P["id"], "Schneider", other_sop)
    back = pydicom.dcmread(io.BytesIO(out.data))
    for holder in (back, back.ReferencedImageSequence[0]):
        deep = holder[RT_PLAN_SEQ].value[0][0x300C0020].value[0]
        assert deep.ReferencedSOPInstanceUID == uid_for(KEY, "omi", other_sop)


def test_big_endian_file_reads_the_un_sequence_as_little_endian(tmp_path):
    other_sop = synthetic.uid(P["id"], "s1", "sop", 9)
    ds = study_with_un(RT_PLAN_SEQ, implicit_items(identity_item(other_sop)), n=1)[0]
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    del ds.PixelData  # keep the big endian file simple: no 16-bit samples to swap
    for kw in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
               "SamplesPerPixel", "PhotometricInterpretation"):
        if kw in ds:
            delattr(ds, kw)
    path = tmp_path / "be.dcm"
    _part10(ds, path)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    out = pipeline().process_encoded(path, "be.dcm")
    assert_no_identity_bytes(out.data, P["id"], "Schneider", other_sop)
    back = pydicom.dcmread(io.BytesIO(out.data))
    assert back[RT_PLAN_SEQ].value[0].ReferencedSOPInstanceUID == uid_for(KEY, "omi", other_sop)


def test_unknown_un_that_is_no_sequence_is_removed_and_one_that_is_is_walked():
    other_sop = synthetic.uid(P["id"], "s1", "sop", 4)
    opaque = 0x00F80010               # a public (even) group no dictionary has
    as_seq = 0x00F80020
    ds = synthetic.ct_instance(0)
    ds[opaque] = un(opaque, b"\x01\x02" + P["id"].encode() + b"\x00\x00")
    ds[as_seq] = un(as_seq, implicit_items(identity_item(other_sop)))
    out = pipeline().process_encoded(_part10(ds), "unknown.dcm")
    back = pydicom.dcmread(io.BytesIO(out.data))
    assert opaque not in back                       # may identify, no rule keeps it
    assert back[as_seq].value[0].ReferencedSOPInstanceUID == uid_for(KEY, "omi", other_sop)
    assert_no_identity_bytes(out.data, P["id"], other_sop)


def test_parse_sequence_rejects_what_only_starts_like_an_item():
    assert parse_sequence(b"\xfe\xff\x00\xe0\x04\x00\x00\x00abcd") is None
    assert parse_sequence(b"\xfe\xff\x00\xe0\x20\x00\x00\x00\x10\x00\x10\x00\x08\x00\x00\x00Doe^John") is None
    assert parse_sequence(b"plain bytes") is None
    seq = parse_sequence(b"\xfe\xff\x00\xe0\x10\x00\x00\x00\x10\x00\x10\x00\x08\x00\x00\x00Doe^John")
    assert str(seq[0].PatientName) == "Doe^John"


def _identity_and_out():
    sp = pipeline()
    out = sp.process_encoded(_part10(synthetic.ct_instance(0)), "x.dcm")
    return sp.identity, pydicom.dcmread(io.BytesIO(out.data))


@pytest.mark.parametrize("tag,label", [
    (RT_PLAN_SEQ, "ReferencedRTPlanSequence (300C,0002)"),
    (0x00111010, "private (0011,1010)"),
    (0x00F80020, "unknown (00F8,0020)"),
], ids=["known-SQ-tag", "private", "unknown-public"])
def test_leak_check_finds_values_inside_un_sequences(tag, label):
    identity, out = _identity_and_out()
    original_uid = sorted(identity.uids)[0]
    out[tag] = un(tag, implicit_items(identity_item(original_uid)))
    data = _part10(out)
    expected = [(f"{label}[0].ReferencedSOPInstanceUID (0008,1155)", "original UID"),
                (f"{label}[0].PatientName (0010,0010)", "PatientName"),
                (f"{label}[0].PatientID (0010,0020)", "PatientID")]
    assert [(h.path, h.kind) for h in encoded_hits(data, identity, "latin-1")] == expected
    assert [(h.path, h.kind) for h in find_hits(pydicom.dcmread(io.BytesIO(data)), identity)] == expected


def test_leak_check_treats_opaque_un_as_a_value_that_may_identify():
    identity, out = _identity_and_out()
    # the ID glued between letters: no token boundary, found all the same in a value nobody can read
    out[0x00F80010] = un(0x00F80010, b"xx" + P["id"].encode() + b"yy")
    hits = encoded_hits(_part10(out), identity, "latin-1")
    assert [(h.path, h.rule, h.kind) for h in hits] == [("unknown (00F8,0010)", RULE_OPAQUE, "PatientID")]


def test_bytes_no_element_explains_refuse_the_instance():
    identity, out = _identity_and_out()
    out.preamble = b"\x00" * 100 + P["id"].encode() + b"\x00" * (28 - len(P["id"]))
    data = _part10(out)
    assert P["id"].encode() in data[:128]
    hits = encoded_hits(data, identity, "latin-1")
    assert [(h.rule, h.kind) for h in hits] == [(RULE_BYTES, "PatientID")]
    assert "before the first element" in hits[0].path
    with pytest.raises(LeakError):
        raise LeakError(hits=hits)


def test_reidentification_maps_uids_inside_un_sequences_back():
    store = SiteStore()
    sp = pipeline(store)
    original = synthetic.ct_instance(0)
    sp.process_encoded(_part10(original), "x.dcm")
    pseudo_ref = uid_for(KEY, "omi", str(original.SOPInstanceUID))
    result = synthetic.ct_instance(0)
    result.PatientID = sp.result.pseudonym
    result.StudyInstanceUID = sp.result.pseudo_study_uid
    ref = Dataset()
    ref.ReferencedSOPClassUID = original.SOPClassUID
    ref.ReferencedSOPInstanceUID = pseudo_ref
    result[0x00081115] = un(0x00081115, implicit_items(ref))  # ReferencedSeriesSequence
    back = Reidentifier(store, EmbeddedProvider(KEY, store), "omi").reidentify(
        pydicom.dcmread(io.BytesIO(_part10(result))))
    assert back.ReferencedSeriesSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID


def test_identity_reads_other_patient_ids_stored_as_un():
    ds = synthetic.ct_instance(0)
    other = Dataset()
    other.PatientID = "KIS-998877"
    ds[0x00101002] = un(0x00101002, implicit_items(other))   # OtherPatientIDsSequence
    identity = Identity()
    identity.add_dataset(pydicom.dcmread(io.BytesIO(_part10(ds))))
    assert identity.text_kind("Fall KIS-998877") == "OtherPatientIDsSequence PatientID"
