"""De-identification per PS3.15 Table E.1-1: actions, options, nesting, UIDs, dates, records."""

from __future__ import annotations

import copy

import pytest
from pydicom.dataset import Dataset

from omi_dsf.deid import profile

from omi_dsf.deid.deidentify import Deidentifier, date_shift_days, uid_for
from omi_dsf.deid.identity import Identity
from omi_dsf.deid.pipeline import StudyPseudonymizer
from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider
from omi_dsf.deid.store import SiteStore
from omi_dsf.testkit import synthetic

KEY = b"test-key-0123456789abcdef"
ALL_OPTIONS = tuple(profile.OPTION_NAMES)


def run(instances, options=(), domain="omi", store=None, key=KEY):
    store = store or SiteStore()
    sp = StudyPseudonymizer(key=key, domain=domain, provider=EmbeddedProvider(key, store),
                            store=store, options=options)
    out = [sp.process_one(copy.deepcopy(ds), f"i{n}") for n, ds in enumerate(instances)]
    return out, sp


# -- the table ------------------------------------------------------------------------------
def test_table_has_every_row_of_e11_with_valid_actions():
    rules = profile.rules()
    assert len(rules) >= 600  # Table E.1-1 (2024e) lists 621 attributes
    allowed = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
    assert {r.basic for r in rules} <= allowed
    assert {v for r in rules for v in r.options.values()} <= {"K", "C"}
    by_kw = {r.keyword: r for r in rules}
    assert by_kw["PatientName"].basic == "Z"
    assert by_kw["PatientID"].basic == "Z/D"
    assert by_kw["SOPInstanceUID"].basic == "U"
    assert by_kw["InstitutionName"].basic == "X/Z/D"
    assert by_kw["SourceImageSequence"].basic == "X/Z/U*"
    assert by_kw["StudyDescription"].options == {"clean_desc": "C"}
    assert by_kw["PatientAge"].options == {"rtn_pat_chars": "K"}
    assert any(r.tag == "gggg,eeee" and r.options == {"rtn_safe_priv": "C"} for r in rules)


@pytest.mark.parametrize("basic,tag,expected", [
    ("Z/D", None, "Z"), ("X/Z", None, "X"), ("X/D", None, "X"), ("X/Z/D", None, "X"),
    ("X/Z/U*", None, "U"), ("Z/D", 0x00080023, "D"), ("X/Z/D", 0x00181000, "D"),
])
def test_combined_actions_resolve_to_one(basic, tag, expected):
    rule = profile.Rule("0000,0000", "", "", basic, {})
    assert profile.resolve(rule, frozenset(), tag) == expected


def test_option_overrides_and_conflict_prefers_clean():
    rule = profile.Rule("0018,1200", "", "", "X", {"rtn_long_modif_dates": "C", "rtn_dev_id": "K"})
    assert profile.resolve(rule, frozenset(), None) == "X"
    assert profile.resolve(rule, frozenset({"rtn_dev_id"}), None) == "K"
    assert profile.resolve(rule, frozenset({"rtn_dev_id", "rtn_long_modif_dates"}), None) == "C"


def test_unknown_option_is_rejected_by_name():
    with pytest.raises(profile.UnknownOptionError, match="retain-everything"):
        profile.parse_options(["retain-everything"])


@pytest.mark.parametrize("from_file", [False, True], ids=["decoded", "undecoded-from-file"])
def test_every_table_attribute_gets_its_action(from_file, tmp_path):
    ds, vrs = synthetic.table_dataset()
    original = copy.deepcopy(ds)
    if from_file:  # elements read from a file stay raw: the fast path must give the same result
        import pydicom
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp_path / "t.dcm", enforce_file_format=True)
        ds = pydicom.dcmread(tmp_path / "t.dcm")
    exact, _ = profile.action_table(frozenset())
    identity = Identity()
    identity.add_dataset(original)
    Deidentifier(KEY, "omi").deidentify(ds, "PSN-X", identity)
    checked = 0
    for tag, vr in vrs.items():
        action = exact[tag]
        before = original[tag].value
        if action == "X":
            assert tag not in ds, f"{tag:08X} should be removed"
        elif action == "Z":
            assert tag in ds and not ds[tag].value, f"{tag:08X} should be empty"
        elif action == "D":
            assert tag in ds
            if vr not in ("SQ", "UI"):
                assert ds[tag].value != before, f"{tag:08X} should get a dummy"
        elif action == "U":
            assert tag in ds
            if vr == "UI":
                assert ds[tag].value == uid_for(KEY, "omi", before)
            elif vr == "SQ":  # X/Z/U*: references kept, UIDs inside replaced
                inner = ds[tag].value[0]
                assert inner.ReferencedSOPInstanceUID != before[0].ReferencedSOPInstanceUID
                assert "PatientName" not in inner or not inner.PatientName
        checked += 1
    assert checked > 450  # nearly every row of the table is exercised


# -- one study ------------------------------------------------------------------------------
def test_basic_profile_removes_identity_everywhere():
    (out,), sp = run([synthetic.ct_instance()])
    assert out.PatientName == sp.result.pseudonym == out.PatientID
    assert out.PatientBirthDate == "" and out.AccessionNumber == "" and out.StudyDate == ""
    assert out.ReferringPhysicianName == ""  # Z: kept empty
    for gone in ("InstitutionName", "ImageComments", "StudyDescription",
                 "PatientAge", "PatientWeight", "StationName", "AcquisitionDateTime",
                 "RequestAttributesSequence"):
        assert gone not in out, gone
    assert "SourceApplicationEntityTitle" not in out.file_meta
    assert not any(t.group & 1 for t in out.keys()), "private tags must be gone"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID


def test_nested_sequences_are_walked():
    ds = synthetic.ct_instance()
    ds.RequestAttributesSequence = None
    item = Dataset()
    item.PatientName = synthetic.PATIENT["name"]
    item.ReferencedSOPInstanceUID = synthetic.uid("nested")
    deeper = Dataset()
    deeper.AccessionNumber = synthetic.PATIENT["accession"]
    deeper.InstitutionName = synthetic.PATIENT["institution"]
    item.ReferencedStudySequence = [deeper]
    ds.ReferencedImageSequence = [item]
    del ds.RequestAttributesSequence
    (out,), _ = run([ds])
    inner = out.ReferencedImageSequence[0]
    assert not inner.get("PatientName")
    assert inner.ReferencedSOPInstanceUID == uid_for(KEY, "omi", synthetic.uid("nested"))
    # Referenced Study Sequence is X/Z: removed, and with it the accession number inside
    assert "ReferencedStudySequence" not in inner


def test_record_keeping_attributes():
    (basic,), _ = run([synthetic.ct_instance()])
    assert basic.PatientIdentityRemoved == "YES"
    assert basic.LongitudinalTemporalInformationModified == "REMOVED"
    assert [c.CodeValue for c in basic.DeidentificationMethodCodeSequence] == ["113100"]
    assert all(c.CodingSchemeDesignator == "DCM" for c in basic.DeidentificationMethodCodeSequence)
    (full,), _ = run([synthetic.ct_instance()], options=ALL_OPTIONS)
    codes = sorted(c.CodeValue for c in full.DeidentificationMethodCodeSequence)
    assert codes == ["113100", "113105", "113107", "113108", "113109", "113111"]
    assert full.LongitudinalTemporalInformationModified == "MODIFIED"
    assert len(full.DeidentificationMethod) == 6


def test_uids_consistent_within_and_across_studies_of_a_domain():
    a = [synthetic.ct_instance(i, study="s1") for i in range(3)]
    b = [synthetic.ct_instance(i, study="s2") for i in range(2)]
    store = SiteStore()
    out_a, _ = run(a, store=store)
    out_b, _ = run(b, store=store)
    assert len({d.StudyInstanceUID for d in out_a}) == 1
    assert len({d.SeriesInstanceUID for d in out_a}) == 1
    assert out_a[0].StudyInstanceUID != out_b[0].StudyInstanceUID
    # instance 0 references instance 1: the reference follows the remapping
    assert out_a[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == out_a[1].SOPInstanceUID
    # same original, same domain, another run: same replacement
    again, _ = run(a[:1], store=SiteStore())
    assert again[0].SOPInstanceUID == out_a[0].SOPInstanceUID
    other, _ = run(a[:1], domain="other-domain")
    assert other[0].SOPInstanceUID != out_a[0].SOPInstanceUID
    assert all(d.SOPInstanceUID.startswith("2.25.") and len(d.SOPInstanceUID) <= 64 for d in out_a)


def test_modified_dates_one_shift_per_patient():
    p1 = [synthetic.ct_instance(i) for i in range(2)]
    p2 = [synthetic.ct_instance(0, patient={"id": "OTHER-1", "name": "Meyer^Tom"})]
    out1, sp1 = run(p1, options=["retain-modified-dates"])
    out2, sp2 = run(p2, options=["retain-modified-dates"])
    shift1 = date_shift_days(KEY, "omi", sp1.result.pseudonym)
    shift2 = date_shift_days(KEY, "omi", sp2.result.pseudonym)
    assert 365 <= shift1 <= 3650 and shift1 != shift2
    import datetime as dt
    expected = (dt.date(2025, 3, 17) - dt.timedelta(days=shift1)).strftime("%Y%m%d")
    assert {d.StudyDate for d in out1} == {d.ContentDate for d in out1} == {expected}
    assert out1[0].AcquisitionDateTime == expected + "101502.123456"
    assert out1[0].StudyTime == "101500"  # whole days: the time of day stays
    assert out1[0].PatientBirthDate == ""  # birth date is Z even with this option


def test_retain_patient_characteristics_and_device_identity():
    (out,), _ = run([synthetic.ct_instance()],
                    options=["retain-patient-characteristics", "retain-device-identity"])
    assert out.PatientSex == "F" and out.PatientAge == "067Y" and out.PatientWeight == "71"
    assert out.DeviceSerialNumber == "SN-99812" and out.StationName == "CTBSP01"
    (basic,), _ = run([synthetic.ct_instance()])
    assert basic.PatientSex == "" and "PatientAge" not in basic and "StationName" not in basic
    assert basic.DeviceSerialNumber == "ANONYMIZED"  # X/Z/D, Type 1 in SEG: dummy


def test_clean_descriptors_scrubs_identity_from_free_text():
    (out,), _ = run([synthetic.ct_instance()], options=["clean-descriptors"])
    assert out.SeriesDescription == "Thorax Weichteil"          # nothing to clean: kept
    assert out.StudyDescription == "CT Thorax"                   # family name cut out
    text = out.ImageComments
    assert "Schneider" not in text and "14.02.1958" not in text and "KH4711-0815" not in text
    assert "Pat." in text and "Fall" in text


def test_retain_safe_private_keeps_only_the_safe_list():
    (out,), _ = run([synthetic.ct_instance()], options=["retain-safe-private"])
    block = out.private_block(0x0019, "GEMS_ACQU_01")
    assert block[0x23].value == "39.375"
    with pytest.raises(KeyError):
        block[0x10]
    assert not any(t.group == 0x0009 for t in out.keys())


def test_overlay_and_curve_groups_removed():
    ds = synthetic.ct_instance()
    ds.add_new(0x60003000, "OW", b"\x00" * 8)
    ds.add_new(0x60000022, "LO", "Overlay: Schneider")
    ds.add_new(0x50000010, "US", 1)
    (out,), _ = run([ds])
    assert not any(t.group in (0x6000, 0x5000) for t in out.keys())


def test_group_lengths_and_encrypted_attributes_removed():
    ds = synthetic.ct_instance()
    ds.add_new(0x00080000, "UL", 1234)
    ds.add_new(0x04000500, "SQ", [Dataset()])
    (out,), _ = run([ds])
    assert 0x00080000 not in out and 0x04000500 not in out


def test_implicit_vr_input_is_walked_into_sequences(tmp_path):
    """Implicit VR files carry no VR: sequences are found through the dictionary."""
    import pydicom
    from pydicom.uid import ImplicitVRLittleEndian
    ds = synthetic.ct_instance()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds["PixelData"].VR = "OW"
    item = Dataset()
    item.ReferencedSOPInstanceUID = synthetic.uid("implicit")
    ds.ReferencedSeriesSequence = [item]     # not in the table: walked, UID inside remapped
    ds.save_as(tmp_path / "i.dcm", enforce_file_format=True)
    (out,), _ = run([pydicom.dcmread(tmp_path / "i.dcm")])
    assert out.ReferencedSeriesSequence[0].ReferencedSOPInstanceUID == uid_for(KEY, "omi", synthetic.uid("implicit"))
    assert out.PatientIdentityRemoved == "YES" and out.StudyDate == ""
