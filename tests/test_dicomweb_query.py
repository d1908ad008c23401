"""Unit tests: QIDO parameter parsing, attribute matching, multipart and media-type handling."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from omi_dsf.dicomweb.attributes import INSTANCE, SERIES, STUDY
from omi_dsf.dicomweb.errors import BadRequest, NotAcceptable, PayloadTooLarge
from omi_dsf.dicomweb.matching import matches
from omi_dsf.dicomweb.multipart import (MultipartReader, closing, parse_accept, parse_media_type, parse_multipart,
                                        part_head)
from omi_dsf.dicomweb.query import parse_qido
from omi_dsf.dicomweb.wado import choose_frame_media, choose_instance_media, parse_frame_list

PATIENT_NAME, PATIENT_ID, STUDY_DATE, STUDY_TIME = 0x00100010, 0x00100020, 0x00080020, 0x00080030
STUDY_UID, MODALITY, MODS = 0x0020000D, 0x00080060, 0x00080061


# -- parse_qido --------------------------------------------------------------------------------------

def test_parse_collects_keys_includefield_and_paging():
    q = parse_qido([("PatientName", "Doe*"), ("00100020", "P1"), ("includefield", "00081030,StudyDescription"),
                    ("includefield", "PatientAge"), ("limit", "10"), ("offset", "5"),
                    ("fuzzymatching", "true"), ("StudyDate", "")], STUDY)
    assert q.match == {PATIENT_NAME: "Doe*", PATIENT_ID: "P1"}
    assert {0x00081030, 0x00101010, STUDY_DATE} <= q.return_keys
    assert (q.limit, q.offset, q.fuzzy, q.include_all) == (10, 5, True, False)
    assert parse_qido([("includefield", "all")], SERIES).include_all
    assert q.include_defaults and not parse_qido([("includedefaults", "False")], SERIES).include_defaults


@pytest.mark.parametrize("params, named", [
    ([("limit", "-1")], "limit"),
    ([("limit", "ten")], "limit"),
    ([("offset", "x")], "offset"),
    ([("fuzzymatching", "maybe")], "fuzzymatching"),
    ([("StudyDate", "2024-01-01")], "StudyDate"),
    ([("StudyDate", "-")], "StudyDate"),
    ([("StudyTime", "25:00")], "StudyTime"),
    ([("StudyInstanceUID", "1.2.abc")], "StudyInstanceUID"),
    ([("NumberOfStudyRelatedInstances", "many")], "NumberOfStudyRelatedInstances"),
    ([("PatientID", "a"), ("00100020", "b")], "00100020"),
    ([("emptyvaluematching", "yes")], "emptyvaluematching"),
    ([("multiplevaluematching", "1")], "multiplevaluematching"),
    ([("includedefaults", "no")], "includedefaults: 'no'"),
    ([("StudyDate", "20240101,2024"), ("multiplevaluematching", "true")], "StudyDate"),
])
def test_parse_rejects_bad_parameters_naming_them(params, named):
    with pytest.raises(BadRequest) as err:
        parse_qido(params, STUDY)
    assert named in err.value.message


def test_unsupported_parameters_are_ignored_and_named():
    """PS3.18 8.3: the origin server ignores query parameters it does not support."""
    q = parse_qido([("PatientNam", "x"), ("includefield", "NotAnAttribute,PatientAge"),
                    ("ReferencedSeriesSequence.SeriesInstanceUID", "1.2"), ("SOPClassUID", "1.2.3"),
                    ("PixelData", "x"), ("_dc", "12345"), ("PatientID", "P1")], STUDY)
    assert q.match == {PATIENT_ID: "P1"}
    assert 0x00101010 in q.return_keys
    assert q.ignored == ["PatientNam", "includefield=NotAnAttribute", "ReferencedSeriesSequence.SeriesInstanceUID",
                         "SOPClassUID", "PixelData", "_dc"]


def test_modality_on_a_study_search_matches_modalities_in_study():
    q = parse_qido([("Modality", "CT")], STUDY)
    assert q.match == {MODS: "CT"} and not q.ignored
    assert matches(_study(mods=["CT", "SR"]), q.match) and not matches(_study(mods=["MR"]), q.match)


def test_empty_and_multiple_value_matching():
    q = parse_qido([("PatientName", "Doe*,Roe*"), ("StudyDate", "20240115\\20200101-20200131"),
                    ("multiplevaluematching", "true"), ("emptyvaluematching", "true")], STUDY)
    assert q.multiple and q.empty
    assert q.match == {PATIENT_NAME: "Doe*\\Roe*", STUDY_DATE: "20240115\\20200101-20200131"}
    kw = {"multiple": True}
    assert matches(_study(name="Roe^Jane", date="20200115"), q.match, **kw)
    assert not matches(_study(name="Poe^Jane", date="20200115"), q.match, **kw)
    assert not matches(_study(date="20210101"), q.match, **kw)
    no_name = _study()
    del no_name.PatientName
    assert not matches(no_name, q.match, **kw)
    assert matches(no_name, q.match, empty=True, **kw)
    empty_name = _study(name="")
    assert matches(empty_name, q.match, empty=True, **kw) and not matches(empty_name, q.match, **kw)
    # without multiplevaluematching a comma is part of the value
    plain = parse_qido([("PatientName", "Doe*,Roe*")], STUDY)
    assert plain.match == {PATIENT_NAME: "Doe*,Roe*"} and not matches(_study(name="Roe^Jane"), plain.match)


def test_parse_levels_and_url_scope():
    q = parse_qido([("Modality", "CT"), ("PatientID", "P1")], SERIES)
    assert q.match_at(STUDY) == {PATIENT_ID: "P1"} and q.match_at(SERIES) == {MODALITY: "CT"}
    with pytest.raises(BadRequest, match="fixed by the URL"):
        parse_qido([("PatientID", "P1")], SERIES, study_uid="1.2.3")
    q = parse_qido([("StudyInstanceUID", "1.2.3")], SERIES, study_uid="1.2.3")
    assert q.match == {}
    q = parse_qido([("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"), ("Modality", "CT")], INSTANCE)
    assert set(q.match_at(INSTANCE)) == {0x00080016}
    assert parse_qido([("limit", "0")], STUDY).limit is None


# -- matching ----------------------------------------------------------------------------------------

def _study(**kw) -> Dataset:
    ds = Dataset()
    ds.PatientName = kw.get("name", "Doe^John")
    ds.PatientID = kw.get("pid", "PAT001")
    ds.StudyDate = kw.get("date", "20240115")
    ds.StudyTime = kw.get("time", "103000")
    ds.StudyInstanceUID = kw.get("uid", "1.2.3.4")
    if "mods" in kw:
        ds.ModalitiesInStudy = kw["mods"]
    return ds


@pytest.mark.parametrize("keys, expected", [
    ({PATIENT_ID: "PAT001"}, True),
    ({PATIENT_ID: "PAT002"}, False),
    ({PATIENT_ID: "PAT*"}, True),
    ({PATIENT_ID: "PAT00?"}, True),
    ({PATIENT_ID: "PAT0?"}, False),
    ({PATIENT_NAME: "Doe*"}, True),
    ({PATIENT_NAME: "doe*"}, False),               # PN matching is case sensitive …
    ({PATIENT_NAME: "*John"}, True),
    ({STUDY_DATE: "20240115"}, True),
    ({STUDY_DATE: "20240101-20240131"}, True),
    ({STUDY_DATE: "20240116-"}, False),
    ({STUDY_DATE: "-20240115"}, True),
    ({STUDY_DATE: "20230101-20231231"}, False),
    ({STUDY_TIME: "1000-1100"}, True),
    ({STUDY_TIME: "1031-"}, False),
    ({STUDY_UID: "1.2.3.4"}, True),
    ({STUDY_UID: "9.9,1.2.3.4"}, True),
    ({STUDY_UID: "9.9\\8.8"}, False),
    ({PATIENT_ID: "PAT001", STUDY_DATE: "2023"}, False),
    ({PATIENT_ID: "P[A]T001"}, False),              # regex characters are literals
])
def test_matching_kinds(keys, expected):
    assert matches(_study(), keys) is expected


def test_fuzzy_matching_folds_case_of_person_names():
    assert matches(_study(), {PATIENT_NAME: "doe*"}, fuzzy=True)
    assert not matches(_study(), {PATIENT_ID: "pat001"}, fuzzy=True)


def test_multi_valued_and_missing_attributes():
    ds = _study(mods=["CT", "SR"])
    assert matches(ds, {MODS: "SR"}) and matches(ds, {MODS: "MR\\CT"}) and not matches(ds, {MODS: "MR"})
    bare = _study()
    assert not matches(bare, {MODS: "CT"})
    assert matches(bare, {MODS: "CT"}, missing_matches=True)


# -- multipart and media types -----------------------------------------------------------------------

def test_multipart_round_trip_and_binary_safety():
    payloads = [b"\r\n--not-the-boundary\r\n", bytes(range(256)) * 10, b""]
    body = b"".join(part_head("B0", "application/dicom") + p + b"\r\n" for p in payloads) + closing("B0")
    parts = parse_multipart(body, "B0")
    assert [p.body for p in parts] == payloads
    assert parts[0].content_type == "application/dicom"


def test_multipart_reader_gives_the_same_parts_however_the_body_arrives():
    payloads = [b"\r\n--B1 lookalike\r\n--B", bytes(range(256)) * 3, b"", b"x"]
    body = (b"preamble\r\n" + b"".join(part_head("B0", "application/dicom") + p + b"\r\n" for p in payloads)
            + closing("B0") + b"epilogue")
    for size in (1, 2, 3, 5, 7, 64, len(body)):
        reader, parts = MultipartReader("B0"), []
        for i in range(0, len(body), size):
            parts += reader.feed(body[i:i + size])
        reader.close()
        assert [p.body for p in parts] == payloads, size
        assert all(p.content_type == "application/dicom" for p in parts)


def test_multipart_reader_says_where_the_body_broke():
    for body, problem in ((b"--B0\r\nContent-Type: x\r\n\r\nno end", "closing boundary missing"),
                          (b"--B0\r\nContent-Type: x", "part headers not terminated"),
                          (b"nothing", "boundary not found")):
        reader = MultipartReader("B0")
        reader.feed(body)
        with pytest.raises(BadRequest, match=problem):
            reader.close()
    with pytest.raises(PayloadTooLarge, match=r"more than max_parts \(1\) parts"):   # a limit: 413
        MultipartReader("B0", max_parts=1).feed(part_head("B0", "x") + b"a\r\n" + part_head("B0", "x") + b"b\r\n--B0--")


@pytest.mark.parametrize("body", [b"no boundary here", b"--B0\r\nContent-Type: x\r\n\r\ndata never closed",
                                  b"--B0\r\nbad header line\r\n\r\nx\r\n--B0--"])
def test_multipart_malformed_is_400(body):
    with pytest.raises(BadRequest):
        parse_multipart(body, "B0")


def test_media_type_and_accept_parsing():
    mt = parse_media_type('multipart/related; type="application/dicom"; boundary="a;b"')
    assert mt.mime == "multipart/related" and mt.type_param == "application/dicom" and mt.params["boundary"] == "a;b"
    acc = parse_accept('image/png;q=0.5, multipart/related; type="application/dicom"; transfer-syntax=*, x/y;q=0')
    assert [a.mime for a in acc] == ["multipart/related", "image/png"]
    assert parse_accept(None)[0].mime == "*/*"


def test_instance_media_negotiation():
    assert choose_instance_media(parse_accept('multipart/related; type="application/dicom"')).as_stored
    assert choose_instance_media(parse_accept("*/*")).as_stored
    explicit = choose_instance_media(parse_accept(
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'))
    assert explicit.wanted == ["1.2.840.10008.1.2.1"] and not explicit.as_stored
    several = choose_instance_media(parse_accept(
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.70, '
        'multipart/related; type="application/dicom"; transfer-syntax=*;q=0.5'))
    assert several.wanted == ["1.2.840.10008.1.2.4.70", "*"]
    with pytest.raises(NotAcceptable):
        choose_instance_media(parse_accept("application/json"))


def test_frame_media_negotiation():
    native = "1.2.840.10008.1.2"
    # dicomweb-client's default for frames is */*; OHIF asks for octet-stream with transfer-syntax=*
    assert choose_frame_media(parse_accept("*/*"), native) == ("application/octet-stream", "1.2.840.10008.1.2.1",
                                                               False, False)
    assert choose_frame_media(parse_accept(
        'multipart/related; type="application/octet-stream"; transfer-syntax=*'), native)[2] is False
    assert choose_frame_media(parse_accept("application/octet-stream"), native)[2] is True
    jpeg = "1.2.840.10008.1.2.4.50"
    assert choose_frame_media(parse_accept('multipart/related; type="image/jpeg"'), jpeg)[0] == "image/jpeg"
    assert choose_frame_media(parse_accept(
        'multipart/related; type="application/octet-stream"; transfer-syntax=*'), jpeg)[0] == "application/octet-stream"
    # uncompressed octet-stream asked: the gateway decodes
    assert choose_frame_media(parse_accept('multipart/related; type="application/octet-stream"'), jpeg) == \
        ("application/octet-stream", "1.2.840.10008.1.2.1", False, True)
    with pytest.raises(NotAcceptable):   # a syntax it neither has nor makes for frames
        choose_frame_media(parse_accept('multipart/related; type="application/octet-stream"; '
                                        'transfer-syntax=1.2.840.10008.1.2.5'), jpeg)


def test_frame_list():
    assert parse_frame_list("1,3, 2") == [1, 3, 2]
    for bad in ("0", "x", "1,,2", "-1"):
        with pytest.raises(BadRequest, match="frames"):
            parse_frame_list(bad)


# -- DICOM JSON -------------------------------------------------------------------------------------

def _pydicom_testfiles():
    """Every DICOM test file pydicom has on this machine: its own and those of the pydicom-data package
    (hash-checked), what get_testdata_files("*.dcm") gives, without its attempt to download each
    pydicom-data file from GitHub again (offline: 79 failed requests, 10-15 s)."""
    from pydicom.data import data_manager as dm

    files = [str(f) for f in (Path(dm.DATA_ROOT) / "test_files").glob("*.dcm")]
    for lib, source in dm.external_data_sources().items():
        files += [f for f in source.get_paths("*.dcm", dm.DataTypes.DATASET)
                  if lib != "pydicom-data" or dm._check_data_hash(f)]
    return files


def test_dicom_json_from_raw_elements_is_what_pydicom_gives():
    # plain VRs are converted from the raw element directly; the answer must be exactly what
    # DataElement.to_json_dict gives for the same file (every test file pydicom ships, all VRs,
    # character sets, explicit and implicit VR)
    import warnings

    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from omi_dsf.dicomweb.dicomjson import to_json
    compared = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in _pydicom_testfiles():
            try:
                fresh, converted = dcmread(f, stop_before_pixels=True), dcmread(f, stop_before_pixels=True)
                for _ in converted:  # every element a DataElement: the to_json_dict path only
                    pass
            except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, NotImplementedError):
                continue
            assert to_json(fresh, "http://b") == to_json(converted, "http://b"), f
            compared += 1
    assert compared >= 20


def test_dicom_json_leaves_out_an_undecodable_value_only():
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from omi_dsf.dicomweb.dicomjson import to_json
    ds = Dataset()
    ds.PatientID = "P1"
    ds._dict[Tag(0x00280010)] = RawDataElement(Tag(0x00280010), "US", 3, b"\x01\x02\x03", 0, False, True)
    assert to_json(ds) == {"00100020": {"vr": "LO", "Value": ["P1"]}}
