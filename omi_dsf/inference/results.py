"""Result objects of a lung segmentation: DICOM SEG, DICOM SR (TID 1500) and FHIR R4.

Results join the source study as new series. Their UIDs derive from the source series and
the algorithm (name, version), so running the same step again yields the same objects
(idempotent STOW) instead of a second copy. Each object names the algorithm and its
version: SEG in the Segment Algorithm Identification, SR in TID 4019 Algorithm
Identification, FHIR in a Device referenced by the Observations and by a Provenance.

FHIR follows the MII imaging module (modul-bildgebung) where it applies: DiagnosticReport
"Radiologischer Befund" (category LOINC 18748-4, v2-0074 RAD, SNOMED 4201000179104;
imagingStudy 1..*) and Observation "Radiologische Messung" (category SNOMED 122869004,
UCUM valueQuantity, method with a SNOMED coding, series/SOP instance UID extensions).
fhir.resources offers R4B classes, whose JSON for these resources is valid R4.
"""

from __future__ import annotations

import datetime as dt
import importlib
import struct
import uuid
from dataclasses import dataclass
from io import BytesIO
from typing import Sequence

import highdicom as hd
import numpy as np
from fhir.resources.R4B.bundle import Bundle as FhirBundle
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from omi_dsf.inference import lungseg

# The FHIR model classes build their validators when first imported (0.25 s in all): load the ones
# a result bundle needs with this module (at worker start), not inside the first return step.
for _model in ("codeableconcept", "coding", "device", "diagnosticreport", "extension", "identifier", "meta",
               "observation", "provenance", "quantity", "reference"):
    importlib.import_module(f"fhir.resources.R4B.{_model}")

MANUFACTURER = "OMI on DSF"
_NS = uuid.uuid5(uuid.NAMESPACE_URL, "urn:omi-dsf:inference-results")

MII = "https://www.medizininformatik-initiative.de/fhir/ext/modul-bildgebung/StructureDefinition/"
SCT, LOINC, UCUM = "http://snomed.info/sct", "http://loinc.org", "http://unitsofmeasure.org"

# (segment number, label, SNOMED CT code, meaning) -- segment numbers equal the model's labels
SEGMENTS = [
    (lungseg.RIGHT, "Right lung", "3341006", "Right lung"),
    (lungseg.LEFT, "Left lung", "44029006", "Left lung"),
]


@dataclass(frozen=True)
class Algorithm:
    name: str
    version: str


@dataclass(frozen=True)
class ResultUids:
    seg_series: str
    seg_instance: str
    sr_series: str
    sr_instance: str


def result_uids(source_series_uid: str, algorithm: Algorithm) -> ResultUids:
    def uid(kind: str) -> str:
        name = f"{source_series_uid}|{algorithm.name}|{algorithm.version}|{kind}"
        return str(UID(f"2.25.{uuid.uuid5(_NS, name).int}"))

    return ResultUids(uid("seg-series"), uid("seg"), uid("sr-series"), uid("sr"))


def _algorithm_sequence(algorithm: Algorithm) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(name=algorithm.name, family=codes.cid7162.ArtificialIntelligence,
                                              version=algorithm.version)


def build_segmentation(source: Sequence[Dataset], labels: np.ndarray, algorithm: Algorithm,
                       uids: ResultUids) -> hd.seg.Segmentation:
    """A binary DICOM SEG of both lungs; `labels` (z-y-x) lines up with `source` (same slice order)."""
    return prepare_segmentation(source, algorithm, uids).fill(labels)[0]


def _segmentation(source: Sequence[Dataset], labels: np.ndarray, algorithm: Algorithm,
                  uids: ResultUids) -> hd.seg.Segmentation:
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.Organ,
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm_sequence(algorithm),
            tracking_uid=str(UID(f"2.25.{uuid.uuid5(_NS, uids.seg_instance + '|' + str(number)).int}")),
            tracking_id=label,
        )
        for number, label, code, meaning in SEGMENTS
    ]
    return hd.seg.Segmentation(
        source_images=list(source),
        pixel_array=labels.astype(np.uint8, copy=False),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.seg_series,
        series_number=9001,
        sop_instance_uid=uids.seg_instance,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=f"{algorithm.name}-{algorithm.version}",
        content_description=f"Lungs by {algorithm.name} {algorithm.version}",
        content_label="LUNGS",
        series_description=f"AI lung segmentation ({algorithm.name} {algorithm.version})",
        omit_empty_frames=False,  # every (slice, segment) has a frame: the layout does not depend on the mask
    )


# Explicit VR little endian header of Pixel Data (7FE0,0010) OB, before its 4-byte length
_PIXEL_DATA_HEADER = b"\xe0\x7f\x10\x00OB\x00\x00"


FILL_FRAMES = 8   # frames masked and packed at a time (8 frames of 512x512: a 2 MB mask)


@dataclass
class PreparedSegmentation:
    """A SEG made before the mask is known, to be filled in once it is.

    With every frame kept, all a SEG holds except its Pixel Data follows from the source images:
    per-frame functional groups, references, positions. That part (most of the cost: highdicom's
    construction and pydicom's encoding of 400 per-frame items for 200 slices) can run while the
    model does; `fill` then packs the mask into the frames in the SEG's own frame order and appends
    it to the already encoded header, so the result is stored without encoding it again."""

    seg: hd.seg.Segmentation
    frame_slices: np.ndarray     # per frame: index of its source image in `source`
    frame_segments: np.ndarray   # per frame: segment number
    head: bytes                  # Part 10 bytes up to the Pixel Data value
    slices: int                  # number of source images

    def fill(self, labels: np.ndarray) -> tuple[hd.seg.Segmentation, bytes]:
        """The SEG with `labels` as its mask, and its Part 10 bytes."""
        rows, cols = int(self.seg.Rows), int(self.seg.Columns)
        if labels.ndim != 3 or labels.shape[0] != self.slices:
            raise ValueError(f"{labels.shape[0] if labels.ndim else 0} label slices for {self.slices} source images")
        if labels.shape[1:] != (rows, cols):
            raise ValueError(f"label slices of {labels.shape[1]}x{labels.shape[2]} for images of {rows}x{cols}")
        # DICOM bit packing (PS3.5 8.1.1): frames back to back, first pixel in the lowest bit, even length
        frames = len(self.frame_slices)
        if (rows * cols) % 8:   # frames of part bytes: the bits run on from frame to frame, packed at once
            masks = np.empty((frames, rows, cols), bool)
            for i, (k, number) in enumerate(zip(self.frame_slices, self.frame_segments)):
                np.equal(labels[k], number, out=masks[i])
            packed = np.packbits(masks, axis=None, bitorder="little").tobytes()
        else:   # whole bytes per frame: a few frames at a time through one small mask, not one of the whole volume
            frame_bytes = rows * cols // 8
            out = np.empty(frames * frame_bytes, np.uint8)
            masks = np.empty((max(1, min(FILL_FRAMES, frames)), rows, cols), bool)
            for start in range(0, frames, len(masks)):
                chunk = masks[:min(len(masks), frames - start)]
                for j in range(len(chunk)):
                    np.equal(labels[self.frame_slices[start + j]], self.frame_segments[start + j], out=chunk[j])
                out[start * frame_bytes:(start + len(chunk)) * frame_bytes] = np.packbits(chunk, axis=None,
                                                                                          bitorder="little")
            packed = out.tobytes()
        if len(packed) % 2:
            packed += b"\x00"
        self.seg.PixelData = packed
        return self.seg, self.head + packed


@dataclass
class _UnpreparedSegmentation:
    """The fallback when a SEG's frames cannot be told from its header: made whole from the mask."""

    source: Sequence[Dataset]
    algorithm: Algorithm
    uids: ResultUids

    def fill(self, labels: np.ndarray) -> tuple[hd.seg.Segmentation, bytes]:
        if labels.shape[0] != len(self.source):
            raise ValueError(f"{labels.shape[0]} label slices for {len(self.source)} source images")
        seg = _segmentation(self.source, labels, self.algorithm, self.uids)
        return seg, to_part10(seg)


def prepare_segmentation(source: Sequence[Dataset], algorithm: Algorithm,
                         uids: ResultUids) -> PreparedSegmentation | _UnpreparedSegmentation:
    """Everything of the lung SEG for `source` except the mask; see `PreparedSegmentation`."""
    rows, cols = int(source[0].Rows), int(source[0].Columns)
    seg = _segmentation(source, np.zeros((len(source), rows, cols), np.uint8), algorithm, uids)
    index = {str(ds.SOPInstanceUID): k for k, ds in enumerate(source)}
    frames = seg.PerFrameFunctionalGroupsSequence
    try:  # highdicom names each frame's source image when the SEG keeps the source geometry
        slices = np.array([index[str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
                           for f in frames], np.intp)
        numbers = np.array([int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for f in frames],
                           np.uint8)
    except (AttributeError, KeyError, IndexError):
        return _UnpreparedSegmentation(source, algorithm, uids)
    size = (len(frames) * rows * cols + 7) // 8
    size += size % 2
    seg.PixelData = bytes(size)  # a placeholder of the final length
    blob = to_part10(seg)
    head = blob[:len(blob) - size]
    if not head.endswith(_PIXEL_DATA_HEADER + struct.pack("<I", size)):
        return _UnpreparedSegmentation(source, algorithm, uids)  # Pixel Data not last: encode at the end
    return PreparedSegmentation(seg, slices, numbers, head, len(source))


def to_part10(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def build_measurement_report(source: Sequence[Dataset], seg: hd.seg.Segmentation, volumes_ml: tuple[float, float],
                             algorithm: Algorithm, uids: ResultUids) -> hd.sr.Comprehensive3DSR:
    """TID 1500 Measurement Report: one volumetric ROI group per lung with its volume in ml.

    Each group references its segment in the SEG and, by TID 1411's "Source series for
    segmentation", the CT series; the SEG itself references every source image (and the SR's
    evidence lists them all). Listing the images again per segment (as
    `ReferencedSegment.from_segmentation` does) made 400 content items for a 200-slice study
    and most of the SR's build time."""
    algo = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)
    series = hd.sr.SourceSeriesForSegmentation(str(source[0].SeriesInstanceUID))
    groups = []
    for (number, label, code, meaning), volume in zip(SEGMENTS, volumes_ml):
        site = hd.sr.CodedConcept(code, "SCT", meaning)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=str(UID(f"2.25.{uuid.uuid5(_NS, uids.sr_instance + '|' + str(number)).int}")),
                identifier=label),
            referenced_segment=hd.sr.ReferencedSegment(seg.SOPClassUID, seg.SOPInstanceUID, number,
                                                       source_series=series),
            finding_type=codes.SCT.Lung,
            finding_sites=[hd.sr.FindingSite(site)],
            algorithm_id=algo,
            measurements=[_volume_measurement(volume, algo)],
        ))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=str(UID(f"2.25.{uuid.uuid5(_NS, algorithm.name + '|' + algorithm.version).int}")),
                    name=algorithm.name, manufacturer_name=MANUFACTURER, model_name=algorithm.version))),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*source, seg],
        content=report,
        series_instance_uid=uids.sr_series,
        series_number=9002,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"AI lung volumes ({algorithm.name} {algorithm.version})",
    )


def _volume_measurement(volume_ml: float, algo: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=codes.SCT.Volume,
        value=round(float(volume_ml), 1),
        unit=hd.sr.CodedConcept("ml", "UCUM", "milliliter"),
        algorithm_id=algo,
    )


@dataclass
class PreparedReport:
    """The SR made before the volumes are known, to be filled in once they are.

    All of the SR but its two volumes follows from the source images and the SEG's header: the
    infer step makes it while the model runs (highdicom's construction: the evidence of every
    source image and the content tree); `fill` then puts each lung's volume into its measurement
    as highdicom encodes a measurement, and encodes the SR."""

    sr: hd.sr.Comprehensive3DSR
    numbers: list[Dataset]       # per lung, in SEGMENTS' order: the SR's NUM content item of its volume
    algorithm: Algorithm

    def fill(self, volumes_ml: tuple[float, float]) -> tuple[hd.sr.Comprehensive3DSR, bytes]:
        """The SR with `volumes_ml` (right, left) and its Part 10 bytes."""
        if len(volumes_ml) != len(self.numbers):
            raise ValueError(f"{len(volumes_ml)} volumes for {len(self.numbers)} lungs")
        algo = hd.sr.AlgorithmIdentification(name=self.algorithm.name, version=self.algorithm.version)
        for item, volume in zip(self.numbers, volumes_ml):
            item.MeasuredValueSequence = _volume_measurement(volume, algo)[0].MeasuredValueSequence
        return self.sr, to_part10(self.sr)


def prepare_measurement_report(source: Sequence[Dataset], seg: hd.seg.Segmentation, algorithm: Algorithm,
                               uids: ResultUids) -> PreparedReport:
    """Everything of the lung SR (`build_measurement_report`) but the volumes; `seg` needs only its
    header (a prepared SEG's, before its mask is filled in)."""
    sr = build_measurement_report(source, seg, (0.0, 0.0), algorithm, uids)
    numbers: list[Dataset] = []

    def walk(items: Sequence[Dataset]) -> None:
        for item in items:
            if (item.get("ValueType") == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == codes.SCT.Volume.value
                    and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == "SCT"):
                numbers.append(item)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    if len(numbers) != len(SEGMENTS):
        raise ValueError(f"the lung SR holds {len(numbers)} volume measurements, not {len(SEGMENTS)}")
    return PreparedReport(sr, numbers, algorithm)


def read_measurement_report(sr: Dataset) -> tuple[Algorithm, tuple[float, float], ResultUids]:
    """Algorithm, (right, left) volumes in ml and result UIDs from a lung SR made by
    `build_measurement_report` -- e.g. after re-identification at the requester, to make FHIR there."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr, copy=False)
    volumes: dict[str, float] = {}
    algorithm = None
    seg_uid = seg_series = None
    for group in report.content.get_volumetric_roi_measurement_groups():
        children = group[0].ContentSequence
        texts = {i.ConceptNameCodeSequence[0].CodeValue: i.TextValue for i in children if i.ValueType == "TEXT"}
        if "111001" in texts:
            algorithm = Algorithm(texts["111001"], texts.get("111003", "unknown"))
        for measurement in group.get_measurements():
            if measurement.name.value == "118565006":
                volumes[group.finding_sites[0].value.value] = float(measurement.value)
        seg_uid = group.referenced_segment.referenced_sop_instance_uid
    right, left = (SEGMENTS[0][2], SEGMENTS[1][2])
    if algorithm is None or right not in volumes or left not in volumes:
        raise ValueError("SR is not a lung volume report: needs algorithm and right/left lung volumes")
    for evidence in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in evidence.ReferencedSeriesSequence:
            if any(r.ReferencedSOPInstanceUID == seg_uid for r in series.ReferencedSOPSequence):
                seg_series = str(series.SeriesInstanceUID)
    uids = ResultUids(seg_series=seg_series or "", seg_instance=str(seg_uid), sr_series=str(sr.SeriesInstanceUID),
                      sr_instance=str(sr.SOPInstanceUID))
    return algorithm, (volumes[right], volumes[left]), uids


def fhir_bundle_from_report(sr: Dataset, when: dt.datetime | None = None) -> dict:
    """The FHIR Bundle of `build_fhir_bundle`, made from the SR alone (patient and study from its header)."""
    algorithm, volumes, uids = read_measurement_report(sr)
    return build_fhir_bundle(sr, volumes, algorithm, uids, when)


def _urn(*parts: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NS, '|'.join(parts))}"


def build_fhir_bundle(source: Dataset, volumes_ml: tuple[float, float], algorithm: Algorithm, uids: ResultUids,
                      when: dt.datetime | None = None) -> dict:
    """A FHIR R4 collection Bundle: Device, three Observations (right, left, both lungs), DiagnosticReport,
    Provenance. Patient and ImagingStudy are referenced by identifier (DICOM Patient ID, Study UID):
    the requester maps them to its own resources after re-identification."""
    when = when or dt.datetime.now(dt.timezone.utc)
    issued = when.isoformat(timespec="seconds")
    study_uid = str(source.StudyInstanceUID)
    key = (uids.sr_instance,)
    device_url, report_url, provenance_url = _urn(*key, "device"), _urn(*key, "report"), _urn(*key, "provenance")
    subject = {"identifier": {"value": str(source.get("PatientID", ""))}, "type": "Patient"}
    issuer = source.get("IssuerOfPatientID")
    if issuer:
        subject["identifier"]["system"] = f"urn:omi-dsf:issuer:{issuer}"
    study_ref = {"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}}
    device_ref = {"reference": device_url, "display": f"{algorithm.name} {algorithm.version}"}
    right, left = (round(float(v), 1) for v in volumes_ml)

    device = {
        "resourceType": "Device",
        "deviceName": [{"name": algorithm.name, "type": "model-name"}],
        "version": [{"value": algorithm.version}],
        "manufacturer": MANUFACTURER,
        "type": {"text": "AI algorithm (Open Inference Protocol v2 model)"},
    }

    def observation(name: str, site: tuple[str, str], value: float) -> dict:
        return {
            "resourceType": "Observation",
            "meta": {"profile": [MII + "mii-pr-bildgebung-radiologische-messung"]},
            "extension": [
                {"url": MII + "mii-ex-bildgebung-series-uid", "valueId": uids.sr_series},
                {"url": MII + "mii-ex-bildgebung-sop-instanz-uid", "valueId": uids.sr_instance},
            ],
            "status": "final",
            "category": [{"coding": [{"system": SCT, "code": "122869004",
                                      "display": "Measurement procedure (procedure)"}]}],
            "code": {"coding": [{"system": SCT, "code": "118565006", "display": "Volume (property) (qualifier value)"}],
                     "text": f"{name} volume"},
            "subject": subject,
            "effectiveDateTime": issued,
            "issued": issued,
            "bodySite": {"coding": [{"system": SCT, "code": site[0], "display": site[1]}]},
            "method": {"coding": [{"system": SCT, "code": "272391002",
                                   "display": "Measurement technique (qualifier value)"}],
                       "text": f"automated segmentation by {algorithm.name} {algorithm.version}"},
            "device": device_ref,
            "derivedFrom": [study_ref],
            "valueQuantity": {"value": value, "unit": "mL", "system": UCUM, "code": "mL"},
        }

    observations = {
        _urn(*key, "right"): observation("Right lung", ("3341006", "Right lung structure"), right),
        _urn(*key, "left"): observation("Left lung", ("44029006", "Left lung structure"), left),
        _urn(*key, "both"): observation("Lungs", ("39607008", "Lung structure"), round(right + left, 1)),
    }
    report = {
        "resourceType": "DiagnosticReport",
        "meta": {"profile": [MII + "mii-pr-bildgebung-radiologischer-befund"]},
        "status": "final",
        "category": [{"coding": [
            {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"},
            {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"},
            {"system": SCT, "code": "4201000179104", "display": "Imaging report"},
        ]}],
        "code": {"coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}],
                 "text": "AI lung segmentation and volumetry"},
        "subject": subject,
        "effectiveDateTime": issued,
        "issued": issued,
        "result": [{"reference": url} for url in observations],
        "imagingStudy": [study_ref],
        "conclusion": (f"Automated lung volumetry by {algorithm.name} {algorithm.version}: right lung "
                       f"{right} mL, left lung {left} mL, total {round(right + left, 1)} mL. "
                       f"DICOM SEG {uids.seg_instance}, SR {uids.sr_instance}. Not reviewed by a physician."),
    }
    provenance = {
        "resourceType": "Provenance",
        "target": [{"reference": report_url}, *({"reference": url} for url in observations)],
        "recorded": issued,
        "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                        "code": "performer", "display": "Performer"}]},
                   "who": device_ref}],
        "entity": [{"role": "source", "what": study_ref}],
    }
    entries = [(device_url, device), *observations.items(), (report_url, report), (provenance_url, provenance)]
    bundle = {"resourceType": "Bundle", "type": "collection", "timestamp": issued,
              "entry": [{"fullUrl": url, "resource": res} for url, res in entries]}
    # Validate through the model classes: raises on any structural error.
    return FhirBundle.model_validate(bundle).model_dump(mode="json", exclude_none=True)
