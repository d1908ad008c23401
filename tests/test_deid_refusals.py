"""Refusals a reader can act on from the line alone (file, instance, attribute, rule, value kind,
never the value); leak-check matching on the boundaries DICOM values have, without false alarms
on coded values and values the same for every patient; files without a Part 10 header."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from omi_dsf.cli import main
from omi_dsf.deid.deidentify import uid_for
from omi_dsf.deid.identity import Identity
from omi_dsf.deid.leakcheck import RULE_CODE, RULE_TEXT, LeakError, find_hits
from omi_dsf.deid.pipeline import DeidError, StudyPseudonymizer, read_instance
from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider
from omi_dsf.deid.store import SiteStore
from omi_dsf.testkit import synthetic

KEY = b"refusal-test-key-0123456789"
P = synthetic.PATIENT


def pipeline(**kw):
    store = SiteStore()
    return StudyPseudonymizer(key=KEY, domain="omi", provider=EmbeddedProvider(KEY, store), store=store, **kw)


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def headerless(ds: Dataset, implicit: bool = False, little: bool = True) -> bytes:
    """The dataset alone: no preamble, no DICM, no file meta."""
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = implicit, little
    write_dataset(buf, ds)
    return buf.getvalue()


# -- refusal messages ---------------------------------------------------------------------------
def test_leak_refusal_names_file_instance_attribute_rule_and_kind(tmp_path):
    """A kept attribute (Manufacturer) holding the patient's ID: the line says where and why."""
    ds = synthetic.ct_instance(0)
    ds.Manufacturer = f"Scanner {P['id']}"
    sp = pipeline()
    with pytest.raises(LeakError) as err:
        sp.process_encoded(part10(ds), "in/sub/IM0001.dcm")
    msg = str(err.value)
    pseudo_sop = uid_for(KEY, "omi", str(ds.SOPInstanceUID))
    assert msg == (f"in/sub/IM0001.dcm (SOPInstanceUID {pseudo_sop}): identifying value in Manufacturer"
                   " (0008,0070): PatientID (rule: patient's value as a token in a value that is the same"
                   " for every patient)")
    for secret in (P["id"], str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)):
        assert secret not in msg


def test_burned_in_refusal_names_the_rule(tmp_path):
    ds = synthetic.ct_instance(0)
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(LeakError, match=r"^x\.dcm \(SOPInstanceUID 2\.25\.\d+\): BurnedInAnnotation \(0028,0301\)"
                                        r" is YES; no pixel recipe covers Manufacturer '', model '', SOP class CT"
                                        r" Image Storage, 16 rows x 16 columns \(rule: burned-in text"):
        pipeline().process_encoded(part10(ds), "x.dcm")


def test_cli_refusal_line_names_the_file(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        ds = synthetic.ct_instance(i)
        if i == 1:
            ds.ImageComments = "ok"
            ds.SeriesDescription = f"Thorax {P['name'].split('^')[0].upper()}_{P['name'].split('^')[1]}"
        ds.save_as(src / f"IM{i}.dcm", enforce_file_format=True)
    key = tmp_path / "k"
    key.write_text("cli-refusal-key-0123456789")
    args = ["deid", str(src), str(tmp_path / "out"), "--domain", "omi", "--key-file", str(key),
            "--store", str(tmp_path / "s.sqlite"), "--option", "clean-descriptors"]
    # clean-descriptors cleans SeriesDescription: the name glued with "_" is a token and goes
    assert main(args) == 0
    out = [pydicom.dcmread(p) for p in sorted((tmp_path / "out").glob("*.dcm"))]
    assert len(out) == 3 and all("SCHNEIDER" not in str(d.get("SeriesDescription", "")).upper() for d in out)
    capsys.readouterr()
    # without the option SeriesDescription is removed; ImageComments would be too: plant in a kept one
    ds = pydicom.dcmread(src / "IM1.dcm")
    ds.Manufacturer = f"{P['name'].split('^')[0]}_scanner"
    ds.save_as(src / "IM1.dcm")
    assert main(args[:-2] + ["--store", str(tmp_path / "s2.sqlite")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"IM1\.dcm \(SOPInstanceUID 2\.25\.\d+\): identifying value in Manufacturer \(0008,0070\):"
                     r" name part of PatientName \(rule: ", err), err
    assert "Schneider" not in err


# -- matching -------------------------------------------------------------------------------------
@pytest.fixture
def identity():
    ds = Dataset()
    ds.PatientName = "Perfusion^Anna^Maria"
    ds.PatientID = "PAT12345"
    ds.InstitutionName = "Here"
    ds.PatientBirthDate = "19580214"
    ident = Identity()
    ident.add_dataset(ds)
    return ident


def _hits(identity, **attrs):
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return [(h.path, h.kind, h.rule) for h in find_hits(ds, identity)]


@pytest.mark.parametrize("attrs", [
    {"Manufacturer": "Put your name here"},              # the false positive
    {"ImageType": ["DERIVED", "PERFUSION"]},               # CS: a code, not the name part
    {"SeriesDescription": "Annapolis protocol"},           # a name part inside a word
    {"SeriesDescription": "PAT123456"},                    # an ID inside a longer number
    {"StudyDescription": "Mariahilf"},
], ids=["manufacturer-vs-institution", "cs-vs-name-part", "inside-a-word", "inside-a-number", "prefix"])
def test_no_false_positives(identity, attrs):
    assert _hits(identity, **attrs) == []


@pytest.mark.parametrize("attrs,kind,rule", [
    ({"SeriesDescription": "PERFUSION_ANNA"}, "name part of PatientName", RULE_TEXT),
    ({"SeriesDescription": "CT-Perfusion2"}, "name part of PatientName", RULE_TEXT),
    ({"StudyComments": "id:PAT12345/2"}, "PatientID", RULE_TEXT),
    ({"ConversionType": "PAT12345"}, "PatientID", RULE_CODE),         # an ID in a CS is a leak
    ({"Manufacturer": "Perfusion^Anna"}, "name part of PatientName", None),  # a person in a device value
    ({"StudyComments": "from Here"}, "InstitutionName", RULE_TEXT),
    ({"ImageComments": "geb. 14.02.1958"}, "PatientBirthDate", RULE_TEXT),
], ids=["underscore", "hyphen-digit", "slash-digit", "id-in-CS", "name-in-manufacturer",
        "institution-in-text", "birth-date-german"])
def test_real_hits_on_dicom_boundaries(identity, attrs, kind, rule):
    hits = _hits(identity, **attrs)
    assert len(hits) == 1 and hits[0][1] == kind
    if rule:
        assert hits[0][2] == rule


# -- files without a Part 10 header ---------------------------------------------------------------
@pytest.mark.parametrize("implicit,little", [(True, True), (False, True), (False, False)],
                         ids=["implicit-LE", "explicit-LE", "explicit-BE"])
def test_headerless_dataset_is_read_and_written_with_a_header(implicit, little):
    ds = synthetic.ct_instance(0)
    if not little:
        del ds.PixelData   # 16-bit samples would need swapping; the header is what matters
    data = headerless(ds, implicit, little)
    assert not data[128:132] == b"DICM"
    out = pipeline().process_encoded(data, "bare.dcm")
    assert out.data[128:132] == b"DICM"
    back = pydicom.dcmread(io.BytesIO(out.data))
    assert back.PatientIdentityRemoved == "YES"
    assert back.file_meta.TransferSyntaxUID.is_implicit_VR == implicit
    assert back.file_meta.TransferSyntaxUID.is_little_endian == little
    assert back.SOPInstanceUID == uid_for(KEY, "omi", str(ds.SOPInstanceUID))


def test_pydicom_headerless_test_file_is_read():
    ds = read_instance(get_testdata_file("rtstruct.dcm"), "rtstruct.dcm")  # implicit VR, no meta
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_what_is_no_dataset_stays_refused(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("Befund: unauffaellig\n" * 20)
    with pytest.raises(DeidError, match=r"^notes\.dcm: not a DICOM file: no Part 10 header \(DICM\), and the"
                                        r" content does not read as a dataset"):
        read_instance(text, "notes.dcm")


def test_headerless_encapsulated_pixels_are_refused_naming_why():
    ds = synthetic.ct_instance(0)
    body = headerless(ds)
    # replace the native pixel data by an encapsulated (undefined length) element
    start = body.index(b"\xe0\x7f\x10\x00")
    enc = (b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
           + b"\xfe\xff\x00\xe0\x04\x00\x00\x00abcd" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    with pytest.raises(DeidError, match=r"PixelData \(7FE0,0010\) is encapsulated"):
        read_instance(body[:start] + enc, "enc.dcm")


def test_refusal_carries_no_original_uid_even_before_deidentification(tmp_path):
    ds = synthetic.ct_instance(0)
    del ds.StudyInstanceUID
    with pytest.raises(DeidError) as err:
        pipeline().process_encoded(part10(ds), "x.dcm")
    assert str(ds.SOPInstanceUID) not in str(err.value)
    assert "StudyInstanceUID (0020,000D)" in str(err.value)
    assert Path("x.dcm").name in str(err.value)


def test_code_extension_charset_passes_when_the_walk_explains_every_find():
    """ISO 2022: the byte search cannot decode; a find the element walk explains (a name part
    inside a longer word) must not be reported as unexplained bytes."""
    ds = synthetic.ct_instance(0)
    ds.SpecificCharacterSet = ["ISO 2022 IR 13", "ISO 2022 IR 87"]
    ds.Manufacturer = "Schneidermann Devices"      # contains the family name, not the name
    out = pipeline().process_encoded(part10(ds), "jp.dcm")
    assert b"Schneidermann" in out.data
