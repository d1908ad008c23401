"""Data for the gateway's conformance tests and benchmarks: a multi-SOP-class third-party set
(pydicom's own test files, which ship with pydicom, so no download) and JPEG Lossless copies of a
study made by dcmtk's ``dcmcjpeg`` (pydicom has no JPEG Lossless encoder)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from .legacy_pacs import dcmtk_tool

# One file per SOP class or encoding of interest. Re-encodings of another file (same SOP Instance
# UID) get a new SOP Instance UID, so that every instance is unique.
THIRD_PARTY = [
    "CT_small.dcm",                    # CT, Explicit VR LE, rescale + window
    "MR_small.dcm",                    # MR
    "examples_palette.dcm",            # US, PALETTE COLOR
    "examples_ybr_color.dcm",          # US multi-frame, JPEG baseline, YBR_FULL_422
    "examples_rgb_color.dcm",          # US, RGB
    "SC_rgb_jpeg_gdcm.dcm",            # SC, JPEG Lossless, RGB
    "SC_rgb_rle.dcm",                  # SC, RLE Lossless
    "JPEG2000.dcm",                    # NM, JPEG 2000
    "MR_small_jpeg_ls_lossless.dcm",   # MR, JPEG-LS Lossless (MR_small re-encoded)
    "liver_1frame.dcm",                # SEG
    "rtdose.dcm",                      # RT Dose, 15 frames
    "rtplan.dcm",                      # RT Plan (no pixels)
    "test-SR.dcm",                     # Comprehensive SR
    "waveform_ecg.dcm",                # 12-lead ECG
]


def third_party_set(out_dir: Path) -> list[Path]:
    """Copies of :data:`THIRD_PARTY` in ``out_dir``, each SOP Instance UID once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    out = []
    for name in THIRD_PARTY:
        src = Path(get_testdata_file(name))
        sop = str(dcmread(src, stop_before_pixels=True).SOPInstanceUID)
        if sop in seen:
            ds = dcmread(src)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[name])
            ds.save_as(out_dir / name, enforce_file_format=True)
        else:
            shutil.copy(src, out_dir / name)
        seen.add(sop)
        out.append(out_dir / name)
    return out


def jpeg_lossless(files: list[Path], out_dir: Path) -> list[Path]:
    """``files`` re-encoded as JPEG Lossless, first-order prediction (1.2.840.10008.1.2.4.70) by
    dcmtk's dcmcjpeg, UIDs unchanged."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        target = out_dir / Path(f).name
        subprocess.run([dcmtk_tool("dcmcjpeg"), "--encode-lossless-sv1", str(f), str(target)], check=True,
                       capture_output=True, timeout=120)
        out.append(target)
    return out
