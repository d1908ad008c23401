"""Which attribute belongs to which query level, and what QIDO-RS returns by default (PS3.18 §10.6.3)."""

from __future__ import annotations

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.tag import Tag

STUDY, SERIES, INSTANCE = "study", "series", "instance"
LEVELS = (STUDY, SERIES, INSTANCE)
QR_LEVEL = {STUDY: "STUDY", SERIES: "SERIES", INSTANCE: "IMAGE"}
UID_KEYWORD = {STUDY: "StudyInstanceUID", SERIES: "SeriesInstanceUID", INSTANCE: "SOPInstanceUID"}

# Attributes a Study Root C-FIND knows at each level (patient attributes live at study level).
_STUDY_ATTRS = [
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
    "StudyID", "StudyDescription", "ModalitiesInStudy", "SOPClassesInStudy",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "OtherPatientIDs", "PatientAge", "PatientSize", "PatientWeight",
    "NumberOfPatientRelatedStudies", "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription",
    "InstanceAvailability", "TimezoneOffsetFromUTC",
]
_SERIES_ATTRS = [
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
    "BodyPartExamined", "Laterality", "ProtocolName", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "RequestAttributesSequence", "NumberOfSeriesRelatedInstances",
    "Manufacturer", "InstitutionName", "StationName", "OperatorsName", "PerformingPhysicianName",
    "FrameOfReferenceUID",
]
_INSTANCE_ATTRS = [
    "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
    "NumberOfFrames", "ImageType", "AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime",
    "AcquisitionNumber", "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation",
    "SliceThickness", "PhotometricInterpretation", "SamplesPerPixel", "ContentLabel",
    "ContentDescription", "ObservationDateTime", "ConceptNameCodeSequence", "CompletionFlag",
    "VerificationFlag", "ReferencedSOPSequence",
]


def _tags(keywords: list[str]) -> list[int]:
    return [int(tag_for_keyword(k)) for k in keywords]


LEVEL_ATTRIBUTES: dict[str, list[int]] = {
    STUDY: _tags(_STUDY_ATTRS), SERIES: _tags(_SERIES_ATTRS), INSTANCE: _tags(_INSTANCE_ATTRS),
}
_LEVEL_OF: dict[int, str] = {t: lvl for lvl in LEVELS for t in LEVEL_ATTRIBUTES[lvl]}

# Attributes valid at every level (not part of any level's C-FIND identifier).
RETRIEVE_URL = 0x00081190
TIMEZONE = 0x00080201
INSTANCE_AVAILABILITY = 0x00080056
GLOBAL_TAGS = {RETRIEVE_URL, TIMEZONE, INSTANCE_AVAILABILITY, 0x00080005}  # + SpecificCharacterSet

# PS3.18 Tables 10.6.3-3/-4/-5: the attributes returned without includefield.
DEFAULT_RETURN: dict[str, list[int]] = {
    STUDY: _tags(["StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability",
                  "ModalitiesInStudy", "ReferringPhysicianName", "TimezoneOffsetFromUTC",
                  "RetrieveURL", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                  "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
                  "NumberOfStudyRelatedInstances"]),
    SERIES: _tags(["Modality", "TimezoneOffsetFromUTC", "SeriesDescription", "RetrieveURL",
                   "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
                   "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                   "RequestAttributesSequence"]),
    INSTANCE: _tags(["SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "TimezoneOffsetFromUTC",
                     "RetrieveURL", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
                     "NumberOfFrames"]),
}

# Attributes the gateway computes when a PACS leaves them out.
MODALITIES_IN_STUDY = 0x00080061
N_STUDY_SERIES = 0x00201206
N_STUDY_INSTANCES = 0x00201208
N_SERIES_INSTANCES = 0x00201209
COMPUTED = {STUDY: {MODALITIES_IN_STUDY, N_STUDY_SERIES, N_STUDY_INSTANCES}, SERIES: {N_SERIES_INSTANCES}}

STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS_UID = 0x0020000D, 0x0020000E, 0x00080018, 0x00080016
MODALITY = 0x00080060
UID_TAG = {STUDY: STUDY_UID, SERIES: SERIES_UID, INSTANCE: SOP_UID}


def level_of(tag: int, default: str) -> str:
    """The query level an attribute belongs to (``default`` for attributes we do not list)."""
    return _LEVEL_OF.get(int(tag), default)


_HEX = set("0123456789abcdefABCDEF")


def parse_tag(text: str) -> int | None:
    """A tag from a keyword (``PatientName``) or 8 hex digits (``00100010``); None if neither."""
    text = text.strip()
    if len(text) == 8 and set(text) <= _HEX:   # int(…, 16) alone would take "-0000001" or "0x100010"
        return int(text, 16)
    tag = tag_for_keyword(text)
    return int(tag) if tag is not None else None


def vr_of(tag: int) -> str:
    """The dictionary VR (the first of "US or SS" and the like); "UN" for tags it does not know."""
    try:
        return dictionary_VR(Tag(tag)).split(" or ")[0]
    except (KeyError, ValueError, OverflowError):
        return "UN"


def name_of(tag: int) -> str:
    return keyword_for_tag(Tag(tag)) or f"{tag:08X}"
