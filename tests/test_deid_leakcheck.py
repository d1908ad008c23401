"""The leak check: any identifying value anywhere stops the object, naming the attribute only."""

from __future__ import annotations

import copy

import pytest
from pydicom.dataset import Dataset

from omi_dsf.deid.encode import encode_part10 as encode
from omi_dsf.deid.leakcheck import PIXEL_TAGS, LeakError, check_outgoing, find_leaks
from omi_dsf.deid.pipeline import StudyPseudonymizer
from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider
from omi_dsf.deid.store import SiteStore
from omi_dsf.testkit import synthetic

KEY = b"leak-test-key-0123456789"
P = synthetic.PATIENT


@pytest.fixture
def clean():
    """A de-identified instance and the identity of its original."""
    store = SiteStore()
    sp = StudyPseudonymizer(key=KEY, domain="omi", provider=EmbeddedProvider(KEY, store), store=store)
    out = sp.process_one(synthetic.ct_instance(), "ct")
    return out, sp.identity


def test_clean_object_passes(clean):
    out, identity = clean
    check_outgoing(out, identity)
    assert find_leaks(out, identity) == []


@pytest.mark.parametrize("plant,where", [
    (lambda ds: setattr(ds, "SeriesDescription", f"Thorax {P['name'].split('^')[0].upper()}"), "SeriesDescription (0008,103E)"),
    (lambda ds: setattr(ds, "ImageComments", f"ID {P['id']}"), "ImageComments (0020,4000)"),
    (lambda ds: setattr(ds, "ImageComments", "born 1958-02-14"), "ImageComments"),
    (lambda ds: setattr(ds, "PatientComments", P["accession"]), "PatientComments"),
    (lambda ds: setattr(ds, "AcquisitionDate", P["birth_date"]), "AcquisitionDate"),
    (lambda ds: setattr(ds, "InstitutionName", P["institution"]), "InstitutionName"),
    (lambda ds: setattr(ds, "StudyComments", "Annegret"), "StudyComments"),
], ids=["name-in-description", "id-in-comment", "iso-birth-date", "accession", "birth-date-DA",
        "institution", "given-name"])
@pytest.mark.parametrize("encoded", [False, True], ids=["elements", "bytes-first"])
def test_planted_values_are_found(clean, plant, where, encoded):
    out, identity = clean
    plant(out)
    data = skip = None
    if encoded:  # the send path: one search over the encoded bytes, then the element walk
        data, start, end = encode(out, PIXEL_TAGS)
        skip = (start, end)
    with pytest.raises(LeakError) as err:
        check_outgoing(out, identity, data, skip)
    assert where in str(err.value)
    for secret in (P["name"], P["id"], P["birth_date"], "Annegret", P["accession"]):
        assert secret not in str(err.value)  # the message names the tag, never the value


def test_original_uid_anywhere_is_found(clean):
    out, identity = clean
    original_study = next(iter(identity.uids - {out.StudyInstanceUID}))
    item = Dataset()
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = original_study
    item.ReferencedSOPSequence = [inner]
    out.ReferencedSeriesSequence = [item]
    hits = find_leaks(out, identity)
    assert hits == ["ReferencedSeriesSequence (0008,1115)[0].ReferencedSOPSequence (0008,1199)[0]."
                    "ReferencedSOPInstanceUID (0008,1155)"]


def test_uid_inside_free_text_is_found(clean):
    out, identity = clean
    original = sorted(identity.uids)[0]
    out.ImageComments = f"see {original} for priors"
    assert any("ImageComments" in h for h in find_leaks(out, identity))


def test_private_tags_and_undecoded_bytes_are_checked(clean):
    out, identity = clean
    block = out.private_block(0x0011, "SOMEVENDOR", create=True)
    block.add_new(0x01, "UN", b"\x00\x01" + P["id"].encode() + b"\x00")
    hits = find_leaks(out, identity)
    assert len(hits) == 1 and "(0011,1001)" in hits[0]


def test_file_meta_is_checked(clean):
    out, identity = clean
    out.file_meta.MediaStorageSOPInstanceUID = sorted(identity.uids)[0]
    assert any("MediaStorageSOPInstanceUID" in h for h in find_leaks(out, identity))


@pytest.mark.parametrize("attribute,value", [
    ("StudyID", "1000"),           # in "1.2.840.10008…", the transfer syntax of the file meta
    ("StudyID", "840"),
    ("AccessionNumber", "100"),    # in "ISO_IR 100"
], ids=["study-id-in-transfer-syntax", "study-id-840", "accession-in-character-set"])
def test_short_ids_inside_the_standards_own_values_are_no_leak(attribute, value):
    """A site's short StudyID or accession that happens to occur inside a value the standard fixes
    (a transfer syntax UID, a character set) is not a leak: the instance leaves."""
    store = SiteStore()
    sp = StudyPseudonymizer(key=KEY, domain="omi", provider=EmbeddedProvider(KEY, store), store=store)
    ds = synthetic.ct_instance()
    ds.SpecificCharacterSet = "ISO_IR 100"
    setattr(ds, attribute, value)
    out = sp.process_encoded(ds, "ct")           # the send path: encoded, checked on its bytes
    assert value in sp.identity.texts            # it was searched for
    assert out.data[128:132] == b"DICM"


def test_name_parts_do_not_match_inside_other_words(clean):
    out, identity = clean
    out.SeriesDescription = "Schneidermann protocol"  # contains the family name, not the name
    assert find_leaks(out, identity) == []


def test_burned_in_annotation(clean):
    out, identity = clean
    out.BurnedInAnnotation = "YES"
    with pytest.raises(LeakError, match=r"BurnedInAnnotation \(0028,0301\) is YES"):
        check_outgoing(out, identity)
    us = copy.deepcopy(out)
    del us.BurnedInAnnotation
    us.Modality = "US"
    with pytest.raises(LeakError, match="absent for modality US"):
        check_outgoing(us, identity)
    ct = copy.deepcopy(out)
    del ct.BurnedInAnnotation
    check_outgoing(ct, identity)  # CT without the flag: no burned-in text expected


def test_not_deidentified_object_is_refused(clean):
    out, identity = clean
    out.PatientIdentityRemoved = "NO"
    with pytest.raises(LeakError, match="PatientIdentityRemoved"):
        check_outgoing(out, identity)


def test_undecoded_sequences_from_file_are_searched(clean, tmp_path):
    """Read back from disk, sequences stay undecoded; a value deep inside is still found."""
    import pydicom
    out, identity = clean
    inner = Dataset()
    inner.PatientName = "Schneider^Annegret"
    item = Dataset()
    item.ReferencedStudySequence = [inner]
    out.ReferencedSeriesSequence = [item]
    out.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "x.dcm")
    assert isinstance(back.get_item(0x00081115).value, bytes)  # still raw
    assert find_leaks(back, identity) == [
        "ReferencedSeriesSequence (0008,1115)[0].ReferencedStudySequence (0008,1110)[0].PatientName (0010,0010)"]
    del out.ReferencedSeriesSequence
    out.save_as(tmp_path / "y.dcm", enforce_file_format=True)
    assert find_leaks(pydicom.dcmread(tmp_path / "y.dcm"), identity) == []


def test_utf8_dataset_is_searched_in_its_character_set(tmp_path):
    import pydicom
    store = SiteStore()
    sp = StudyPseudonymizer(key=KEY, domain="omi", provider=EmbeddedProvider(KEY, store), store=store)
    ds = synthetic.ct_instance(patient={"name": "Müller^Jürgen"})
    ds.SpecificCharacterSet = "ISO_IR 192"
    out = sp.process_one(ds, "u")
    out.ContentDescription = "Befund Jürgen Müller"  # kept by the profile: a leak
    out.save_as(tmp_path / "u.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "u.dcm")
    assert find_leaks(back, sp.identity) == ["ContentDescription (0070,0081)"]


def test_bytes_first_search_sees_uids_glued_to_tag_bytes(clean):
    """An even-length UID is followed directly by the next tag, whose bytes can be digits."""
    out, identity = clean
    original = sorted(identity.uids)[0]
    assert identity.may_occur_in("\x00" + original + "24\x00\x10")
    assert not identity.may_occur_in("\x00" + "1.2.840.10008.5.1.4.1.1.2" + "\x00")
    out.add_new(0x00321033, "LO", "x")  # group 0x0032: its low byte is the digit "2"
    out.ReferencedSOPInstanceUID = original
    data, start, end = encode(out, PIXEL_TAGS)
    with pytest.raises(LeakError, match="ReferencedSOPInstanceUID"):
        check_outgoing(out, identity, data, (start, end))


def test_other_patient_ids_count_as_identity():
    ds = synthetic.ct_instance()
    other = Dataset()
    other.PatientID = "KIS-998877"
    other.IssuerOfPatientID = "KIS"
    ds.OtherPatientIDsSequence = [other]
    store = SiteStore()
    sp = StudyPseudonymizer(key=KEY, domain="omi", provider=EmbeddedProvider(KEY, store), store=store)
    out = sp.process_one(ds, "o")
    assert "OtherPatientIDsSequence" not in out
    out.ImageComments = "Fall KIS-998877"
    assert find_leaks(out, sp.identity) == ["ImageComments (0020,4000)"]
