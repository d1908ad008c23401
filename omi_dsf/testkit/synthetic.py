"""Synthetic datasets with realistic fake identities, for tests and the benchmark.

Nothing here is patient data: names, IDs and dates are invented. The datasets put identifying
values where real ones hide: nested sequences, private tags (also as undecoded UN bytes) and
free text.
"""

from __future__ import annotations

import datetime as dt
import uuid

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

from omi_dsf.deid import profile

PATIENT = {
    "name": "Schneider^Annegret^Maria",
    "id": "KH4711-0815",
    "birth_date": "19580214",
    "accession": "ACC20250317001",
    "institution": "Klinikum Beispielstadt",
}


def uid(*parts: object) -> str:
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'omi-synthetic|' + '|'.join(map(str, parts))).int}"


def ct_instance(index: int = 0, patient: dict | None = None, study: str = "s1",
                rows: int = 16, cols: int = 16) -> Dataset:
    """A small CT image with identity in all the awkward places."""
    pat = {**PATIENT, **(patient or {})}
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid(pat["id"], study, "sop", index)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.SourceApplicationEntityTitle = "PACS_BEISPIEL"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid(pat["id"], study)
    ds.SeriesInstanceUID = uid(pat["id"], study, "series")
    ds.FrameOfReferenceUID = uid(pat["id"], study, "frame")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250317"
    ds.StudyTime = "101500"
    ds.AcquisitionDateTime = "20250317101502.123456"
    ds.AccessionNumber = pat["accession"]
    ds.Modality = "CT"
    ds.InstitutionName = pat["institution"]
    ds.ReferringPhysicianName = "Weber^Jonas^^Dr. med."
    ds.StationName = "CTBSP01"
    ds.StudyDescription = f"CT Thorax {pat['name'].split('^')[0]}"
    ds.SeriesDescription = "Thorax Weichteil"
    ds.PatientName = pat["name"]
    ds.PatientID = pat["id"]
    ds.PatientBirthDate = pat["birth_date"]
    ds.PatientSex = "F"
    ds.PatientAge = "067Y"
    ds.PatientWeight = "71"
    ds.StudyID = "S7781"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImageComments = f"Pat. {pat['name'].replace('^', ' ')} geb. 14.02.1958, Fall {pat['id']}"
    ds.DeviceSerialNumber = "SN-99812"
    ds.BurnedInAnnotation = "NO"
    # nested: a reference and a request with identity inside
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = uid(pat["id"], study, "sop", index + 1)
    ds.ReferencedImageSequence = Sequence([ref])
    req = Dataset()
    req.RequestingPhysician = "Becker^Petra"
    req.AccessionNumber = pat["accession"]
    req.RequestedProcedureDescription = "Thorax"
    req.StudyInstanceUID = ds.StudyInstanceUID
    inner = Dataset()
    inner.PatientName = pat["name"]                 # two levels down
    inner.ReferencedSOPInstanceUID = uid(pat["id"], study, "sop", 99)
    req.ReferencedStudySequence = Sequence([inner])
    ds.RequestAttributesSequence = Sequence([req])
    # private: a readable LO copy of the ID, and an undecoded UN blob holding the name
    block = ds.private_block(0x0009, "ACME 1.1", create=True)
    block.add_new(0x01, "LO", pat["id"])
    block.add_new(0x02, "UN", f"pat={pat['name']}".encode("latin-1"))
    safe = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    safe.add_new(0x23, "DS", "39.375")             # Table Speed: on the safe list
    safe.add_new(0x10, "LO", pat["name"])          # same creator, not on the safe list
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(rows * cols * 2)
    return ds


def _dummy_value(vr: str, tag: int):
    if vr == "SQ":
        item = Dataset()
        item.PatientName = PATIENT["name"]
        item.ReferencedSOPInstanceUID = uid("table", tag)
        return Sequence([item])
    return {
        "PN": PATIENT["name"], "LO": f"ORIG {PATIENT['id']}", "SH": "ORIG7", "LT": f"ORIG {PATIENT['name']}",
        "ST": "ORIG text", "UT": "ORIG text", "UC": "ORIG", "UR": "http://orig.example/x",
        "CS": "ORIG", "AE": "ORIGAE", "AS": "067Y", "DA": "20250317", "TM": "101500",
        "DT": "20250317101500", "UI": uid("table", tag), "IS": "7", "DS": "7.5",
        "US": 7, "SS": 7, "UL": 7, "SL": 7, "FL": 7.0, "FD": 7.0, "OB": b"ORIG", "OW": b"ORIG",
        "UN": b"ORIG", "AT": 0x00100010, "SV": 7, "UV": 7, "OD": b"ORIG0000", "OF": b"ORIG",
        "OL": b"ORIG", "OV": b"ORIG0000",
    }[vr]


def table_dataset() -> tuple[Dataset, dict[int, str]]:
    """One element for every exact tag of Table E.1-1 that pydicom's dictionary knows.

    Returns the dataset and {tag: VR}. Group 0x0000/0x0002/0x0004 tags are left out (command,
    file meta and DICOMDIR elements do not live in a dataset body).
    """
    ds = Dataset()
    vrs: dict[int, str] = {}
    exact, _ = profile.action_table(frozenset())
    for tag in exact:
        if tag >> 16 in (0x0000, 0x0002, 0x0004):
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        vr = vr.split(" or ")[0]
        if not keyword_for_tag(tag):
            continue
        ds.add_new(tag, vr, _dummy_value(vr, tag))
        vrs[tag] = vr
    ds.PatientID = PATIENT["id"]
    ds.StudyInstanceUID = uid("table", "study")
    ds.SOPInstanceUID = uid("table", "sop")
    vrs.pop(0x00100020, None)   # PatientID and PatientName become the pseudonym
    vrs.pop(0x00100010, None)
    vrs.pop(0x0020000D, None)
    vrs.pop(0x00080018, None)
    return ds, vrs


def returned_seg(source: list[Dataset]) -> Dataset:
    """A SEG-like result as an AI service would return it for de-identified `source` images."""
    first = source[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.SOPInstanceUID = uid("ai", "seg", "sop")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = uid("ai", "seg", "series")     # new: made by the AI service
    ds.StudyInstanceUID = first.StudyInstanceUID
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PatientID = first.PatientID
    ds.PatientName = first.PatientName
    ds.PatientIdentityRemoved = "YES"
    ds.Modality = "SEG"
    ds.ContentDate = dt.date.today().strftime("%Y%m%d")
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ReferencedInstanceSequence = Sequence()
    for s in source:
        item = Dataset()
        item.ReferencedSOPClassUID = s.SOPClassUID
        item.ReferencedSOPInstanceUID = s.SOPInstanceUID
        series.ReferencedInstanceSequence.append(item)
    ds.ReferencedSeriesSequence = Sequence([series])
    frames = []
    for s in source:
        src = Dataset()
        src.ReferencedSOPClassUID = s.SOPClassUID
        src.ReferencedSOPInstanceUID = s.SOPInstanceUID
        deriv = Dataset()
        deriv.SourceImageSequence = Sequence([src])
        frame = Dataset()
        frame.DerivationImageSequence = Sequence([deriv])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    evidence = Dataset()
    evidence.StudyInstanceUID = first.StudyInstanceUID
    ev_series = Dataset()
    ev_series.SeriesInstanceUID = first.SeriesInstanceUID
    ev_sop = Dataset()
    ev_sop.ReferencedSOPClassUID = first.SOPClassUID
    ev_sop.ReferencedSOPInstanceUID = first.SOPInstanceUID
    ev_series.ReferencedSOPSequence = Sequence([ev_sop])
    evidence.ReferencedSeriesSequence = Sequence([ev_series])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    return ds
