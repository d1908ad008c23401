"""A synthetic chest CT study with known ground truth, written as real DICOM files.

The phantom stands in for patient images everywhere in the project (tests, benchmarks,
the test bed). Its identity is fake, but it is *treated* as patient data: headers carry
every element a real scanner would write (names, IDs, dates, institution, device, a
private block), so that de-identification and the "nothing identifying leaves the site"
checks have something real to find. Never log those values.

Geometry is defined in fractions of the matrix so that small matrices (128×128 for fast
tests) hold the same anatomy as 512×512. Everything derives from `seed`: the same seed
gives the same UIDs and the same bytes; another seed gives another patient and study.
"""

from __future__ import annotations

import datetime as dt
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, UID

# Labels of the ground-truth volume.
AIR, BODY, LUNG, BONE, TRACHEA, VESSEL = 0, 1, 2, 3, 4, 5
HU = {AIR: -1000, BODY: 40, LUNG: -850, BONE: 700, TRACHEA: -1000, VESSEL: 40}

PRIVATE_CREATOR = "OMI-DSF PHANTOM"
PRIVATE_GROUP = 0x0009

_PATIENTS = [
    ("Mustermann^Max", "M"),
    ("Musterfrau^Erika", "F"),
    ("Beispiel^Hans", "M"),
    ("Müller^Jürgen", "M"),
    ("Schmidt^Anna", "F"),
    ("Weber^Klaus", "M"),
    ("Fischer^Sabine", "F"),
    ("Wagner^Petra", "F"),
]


@dataclass(frozen=True)
class Anatomy:
    """Jittered shape parameters of one phantom, in fractions of the matrix size."""

    body_a: float       # body ellipse semi-axis left-right (fraction of cols)
    body_b: float       # body ellipse semi-axis anterior-posterior (fraction of rows)
    lung_dx: float      # lung centre offset from midline
    lung_a: float
    lung_b: float
    spine_r: float
    vessels: tuple[tuple[float, float, float], ...]  # (x, y, radius) in fractions, per lung side


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:omi-dsf:phantom")


def _uid(seed: int, *parts: object) -> UID:
    # A name-based UUID (ISO/IEC 9834-8) as a 2.25 UID: deterministic and globally unique.
    # (pydicom's generate_uid ignores entropy_srcs when prefix=None and truncates otherwise.)
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(map(str, (seed, *parts)))).int}")


def anatomy(seed: int) -> Anatomy:
    rng = np.random.default_rng([seed, 1])
    j = lambda v, f=0.06: float(v * (1 + rng.uniform(-f, f)))  # noqa: E731
    vessels = tuple((float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5)), float(rng.uniform(0.04, 0.08)))
                    for _ in range(4))
    return Anatomy(body_a=j(0.42), body_b=j(0.30), lung_dx=j(0.17), lung_a=j(0.115), lung_b=j(0.19),
                   spine_r=j(0.045), vessels=vessels)


def phantom_labels(slices: int = 20, seed: int = 0, rows: int = 512, cols: int = 512) -> np.ndarray:
    """The ground-truth label volume (slices, rows, cols), uint8, slice 0 = first instance (most cranial)."""
    a = anatomy(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    u = (x - (cols - 1) / 2) / cols   # left-right, fraction of width
    v = (y - (rows - 1) / 2) / rows   # anterior(-) to posterior(+), fraction of height
    vol = np.zeros((slices, rows, cols), np.uint8)
    body = (u / a.body_a) ** 2 + (v / a.body_b) ** 2 <= 1
    # ribs: a thin elliptic shell just inside the skin, interrupted into segments
    shell = ((u / (a.body_a * 0.93)) ** 2 + (v / (a.body_b * 0.90)) ** 2 <= 1) & \
            ((u / (a.body_a * 0.87)) ** 2 + (v / (a.body_b * 0.82)) ** 2 > 1)
    angle = np.arctan2(v, u)
    ribs = shell & (np.cos(angle * 14) > 0.2)
    spine = (u ** 2 + (v - a.body_b * 0.62) ** 2) <= a.spine_r ** 2
    sternum = (np.abs(u) <= 0.02) & (np.abs(v + a.body_b * 0.86) <= 0.025)
    for k in range(slices):
        # lungs taper towards apex (k=0) and base (k=slices-1)
        t = (k + 0.5) / slices
        scale = 0.55 + 0.45 * np.sin(np.pi * t)
        sl = vol[k]
        sl[body] = BODY
        sl[ribs | spine | sternum] = BONE
        for side in (-1, 1):
            cu, cv = side * a.lung_dx, -0.01
            la, lb = a.lung_a * scale, a.lung_b * scale
            lung = ((u - cu) / la) ** 2 + ((v - cv) / lb) ** 2 <= 1
            sl[lung] = LUNG
            for vx, vy, vr in a.vessels:
                px, py = cu + side * vx * la, cv + vy * lb
                r = vr * min(la, lb)
                sl[lung & (((u - px) ** 2 + (v - py) ** 2) <= r ** 2)] = VESSEL
        if k < max(1, slices // 3):
            # trachea: air inside the body, separate from both lungs
            sl[(u ** 2 + (v + a.body_b * 0.45) ** 2) <= 0.025 ** 2] = TRACHEA
    return vol


def known_lung_mask(slices: int = 20, seed: int = 0, rows: int = 512, cols: int = 512) -> np.ndarray:
    """Ground truth for lung segmentation: both lungs including the vessels inside them (bool, z-y-x)."""
    labels = phantom_labels(slices, seed, rows, cols)
    lung = labels == LUNG
    vessel = labels == VESSEL
    return lung | vessel


def phantom_hu(slices: int = 20, seed: int = 0, rows: int = 512, cols: int = 512) -> np.ndarray:
    """The phantom in Hounsfield units with deterministic scanner noise (int16, z-y-x)."""
    labels = phantom_labels(slices, seed, rows, cols)
    lut = np.zeros(max(HU) + 1, np.float32)
    for label, hu in HU.items():
        lut[label] = hu
    rng = np.random.default_rng([seed, 2])
    noise = rng.normal(0.0, 12.0, labels.shape).astype(np.float32)
    return np.clip(np.rint(lut[labels] + noise), -1024, 3071).astype(np.int16)


def default_patient(seed: int) -> dict:
    rng = np.random.default_rng([seed, 3])
    name, sex = _PATIENTS[seed % len(_PATIENTS)]
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 60)))
    return {
        "name": name,
        "id": f"PAT{100000 + (seed * 7919) % 900000:06d}",
        "birth_date": birth.strftime("%Y%m%d"),
        "sex": sex,
    }


def _study_datetime(seed: int) -> dt.datetime:
    rng = np.random.default_rng([seed, 4])
    return dt.datetime(2024, 1, 2, 7, 30) + dt.timedelta(days=int(rng.integers(0, 700)),
                                                         minutes=int(rng.integers(0, 600)))


def write_ct_study(out_dir: Path, slices: int = 20, seed: int = 0, rows: int = 512, cols: int = 512,
                   spacing: tuple[float, float] = (0.7, 0.7), slice_thickness: float = 2.5,
                   patient: dict | None = None) -> list[Path]:
    """Write one axial chest CT series, one file per slice, most cranial first; return the paths.

    `patient` may override any of the keys "name", "id", "birth_date" (YYYYMMDD), "sex".
    File names carry the seed so that several studies can share one directory.
    """
    if slices < 1 or rows < 16 or cols < 16:
        raise ValueError(f"phantom needs slices >= 1 and rows, cols >= 16 (got {slices}, {rows}, {cols})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pat = {**default_patient(seed), **(patient or {})}
    when = _study_datetime(seed)
    birth = dt.datetime.strptime(pat["birth_date"], "%Y%m%d").date()
    age = when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day))
    study_uid, series_uid, frame_uid = _uid(seed, "study"), _uid(seed, "series"), _uid(seed, "frame")
    hu = phantom_hu(slices, seed, rows, cols)
    stored = (hu.astype(np.int32) + 1024).astype(np.uint16)  # unsigned storage, intercept -1024
    row_mm, col_mm = float(spacing[0]), float(spacing[1])
    x0 = -(cols - 1) / 2 * col_mm
    y0 = -(rows - 1) / 2 * row_mm
    paths = []
    for k in range(slices):
        sop_uid = _uid(seed, "instance", k)
        acq = when + dt.timedelta(seconds=2 + k // 4)
        z = -float(k) * slice_thickness + 0.0  # + 0.0 turns -0.0 into 0.0

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "OMI_DSF_PHANTOM"

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceCreationDate = when.strftime("%Y%m%d")
        ds.InstanceCreationTime = acq.strftime("%H%M%S")
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
        ds.StudyTime = when.strftime("%H%M%S")
        ds.SeriesTime = (when + dt.timedelta(seconds=1)).strftime("%H%M%S")
        ds.AcquisitionTime = ds.ContentTime = acq.strftime("%H%M%S.%f")[:13]
        ds.AccessionNumber = f"ACC{when:%Y}{(seed * 104729) % 1000000:06d}"
        ds.Modality = "CT"
        ds.Manufacturer = "OMI Phantom Works"
        ds.InstitutionName = "Universitätsklinikum Musterstadt"
        ds.InstitutionAddress = "Musterstraße 1, 12345 Musterstadt"
        ds.ReferringPhysicianName = "Hausarzt^Heinz^^Dr. med."
        ds.StationName = "CT-MUSTER-01"
        ds.StudyDescription = "CT Thorax nativ"
        ds.SeriesDescription = "Thorax 2.5mm Weichteil"
        ds.InstitutionalDepartmentName = "Radiologie"
        ds.PerformingPhysicianName = "Radiologin^Rita"
        ds.OperatorsName = "MTRA^Martin"
        ds.ManufacturerModelName = "Phantom CT 64"
        ds.PatientName = pat["name"]
        ds.PatientID = pat["id"]
        ds.IssuerOfPatientID = "UKMUSTER"
        ds.PatientBirthDate = pat["birth_date"]
        ds.PatientSex = pat["sex"]
        ds.PatientAge = f"{max(age, 0):03d}Y"
        ds.PatientSize = "1.78" if pat["sex"] == "M" else "1.66"
        ds.PatientWeight = "82" if pat["sex"] == "M" else "64"
        ds.PatientAddress = "Musterweg 5, 12345 Musterstadt"
        ds.AdditionalPatientHistory = "V.a. Pneumonie"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{slice_thickness:g}"
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.DeviceSerialNumber = f"SN{(seed * 31 + 4711) % 100000:05d}"
        ds.SoftwareVersions = "phantom-1.0"
        ds.ProtocolName = "Thorax Standard"
        ds.ReconstructionDiameter = f"{cols * col_mm:.1f}"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "160"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = "200"
        ds.Exposure = "100"
        ds.FilterType = "BODY"
        ds.ConvolutionKernel = "B30f"
        ds.PatientPosition = "HFS"
        ds.RequestingPhysician = "Station^Stefan^^Dr. med."
        ds.RequestedProcedureDescription = "CT Thorax"
        ds.PerformedProcedureStepStartDate = when.strftime("%Y%m%d")
        ds.PerformedProcedureStepStartTime = when.strftime("%H%M%S")
        ds.PerformedProcedureStepID = f"PPS{(seed * 7) % 100000:05d}"
        ds.PerformedProcedureStepDescription = "CT Thorax nativ"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = f"{1000 + seed % 9000}"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [f"{row_mm:g}", f"{col_mm:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = ["40", "-600"]
        ds.WindowWidth = ["400", "1500"]
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "LO", "phantom chest v1")
        block.add_new(0x02, "LO", pat["id"])          # scanners do copy identity into private tags
        block.add_new(0x03, "DS", f"{slice_thickness:g}")
        block.add_new(0x04, "UL", seed)
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()

        path = out_dir / f"ct-seed{seed}-{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def cached_ct_study(cache: Path, slices: int, seed: int, rows: int) -> list[Path]:
    """`write_ct_study` once per (slices, seed, rows) into `cache` (benchmarks reuse it): a study
    interrupted while written is written again."""
    folder = Path(cache) / f"ct-{slices}x{rows}-seed{seed}"
    done = folder / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        write_ct_study(folder, slices=slices, seed=seed, rows=rows, cols=rows)
        done.write_text("ok")
    return sorted(folder.glob("*.dcm"))


def lung_volume_ml(mask: np.ndarray, spacing: tuple[float, float], slice_thickness: float) -> float:
    """Volume of a boolean z-y-x mask in millilitres."""
    return float(mask.sum()) * spacing[0] * spacing[1] * slice_thickness / 1000.0
