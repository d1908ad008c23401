"""From the instances of a study to one checked CT volume a model can take.

The checks run before anything is sent to a model, so bad input fails with a message that
names what is wrong (modality, series, instance number, gap in mm) -- never patient data.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from io import BytesIO
from typing import Sequence

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
_AXIAL = AXIAL.tolist()


class VolumeError(ValueError):
    """The study cannot become the volume the model needs; the message says why."""


PIXEL_DATA = 0x7FE00010
# A value longer than this stays in the instance's bytes when read (`read_instance`): the Pixel Data of an
# uncompressed slice (512 KB for 512x512 int16) is read from there as a view, not copied into the dataset
DEFER_BYTES = 64 * 1024


def read_instance(part10: bytes, defer_bytes: int = DEFER_BYTES) -> Dataset:
    """One instance from its Part 10 bytes (a WADO-RS part) as a dataset whose long values (its Pixel
    Data) are left in `part10` until asked for: `ds.PixelData` then reads them as pydicom does, and
    `build_volume` takes uncompressed pixels straight from there (`_pixel_view`) without a copy.
    The rest is parsed as `dcmread` parses it."""
    return dcmread(BytesIO(part10), defer_size=defer_bytes)


@dataclass
class CtVolume:
    hu: np.ndarray                          # int16, (slices, rows, cols), cranial first as sorted
    spacing_mm: tuple[float, float, float]  # between slices, rows, cols
    datasets: list[Dataset]                 # the source instances in the order of `hu`

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)


def pick_series(datasets: Sequence[Dataset], modality: str = "CT", series_uid: str | None = None) -> list[Dataset]:
    """The instances of the series to run on: `series_uid`, else the largest series of `modality`."""
    if not datasets:
        raise VolumeError("the study has no instances")
    series: dict[str, list[Dataset]] = defaultdict(list)
    for ds in datasets:
        series[str(ds.get("SeriesInstanceUID", ""))].append(ds)
    if series_uid is not None:
        if series_uid not in series:
            raise VolumeError(f"series {series_uid} is not in the study ({len(series)} series found)")
        chosen = series[series_uid]
        found = {str(ds.get("Modality", "")) for ds in chosen}
        if found != {modality}:
            raise VolumeError(f"series {series_uid} has modality {'/'.join(sorted(found)) or 'none'}, "
                              f"the model needs {modality}")
        return chosen
    matching = [s for s in series.values() if all(ds.get("Modality") == modality for ds in s)]
    if not matching:
        found = sorted({str(ds.get("Modality", "none")) for ds in datasets})
        raise VolumeError(f"the study has no {modality} series (modalities found: {', '.join(found)}); "
                          f"the model needs {modality}")
    return max(matching, key=len)


def build_volume(datasets: Sequence[Dataset], min_slices: int = 1, max_slices: int | None = None,
                 spacing_tolerance_mm: float = 0.01) -> CtVolume:
    """Sort one axial series along the slice normal and check it is a complete, evenly spaced volume."""
    n = len(datasets)
    if n < min_slices:
        raise VolumeError(f"series has {n} slices, the model needs at least {min_slices}")
    if max_slices is not None and n > max_slices:
        raise VolumeError(f"series has {n} slices, more than the model's limit of {max_slices}")
    first = datasets[0]
    first_size = first_spacing = None
    for ds in datasets:
        label = f"instance {ds.get('InstanceNumber', '?')}"
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "PixelData"):
            if keyword not in ds:
                raise VolumeError(f"{label} lacks {keyword}")
        if ds.get("Modality") != "CT":
            raise VolumeError(f"{label} has modality {ds.get('Modality', 'none')}, the model needs CT")
        if first_size is None:
            first_size, first_spacing = (first.Rows, first.Columns), [float(v) for v in first.PixelSpacing]
        if (ds.Rows, ds.Columns) != first_size:
            raise VolumeError(f"{label} is {ds.Rows}x{ds.Columns}, others are {first.Rows}x{first.Columns}")
        # (the same values, as they mostly are, pass without numpy's comparison)
        spacing = [float(v) for v in ds.PixelSpacing]
        if spacing != first_spacing and not np.allclose(spacing, first_spacing, atol=1e-4):
            raise VolumeError(f"{label} has pixel spacing {list(ds.PixelSpacing)}, others {list(first.PixelSpacing)}")
        orientation = [float(v) for v in ds.ImageOrientationPatient]
        if orientation != _AXIAL and not np.allclose(orientation, AXIAL, atol=1e-3):
            raise VolumeError(f"{label} is not an axial slice in standard orientation (ImageOrientationPatient "
                              f"{np.array(orientation).round(3).tolist()}, expected 1\\0\\0\\0\\1\\0)")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise VolumeError(f"{label} is not a grayscale image")
    # normal of 1\0\0\0\1\0 is +z; sort cranial (highest z) first as the model expects
    ordered = sorted(datasets, key=lambda ds: -float(ds.ImagePositionPatient[2]))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in ordered])
    if n >= 2:
        gaps = -np.diff(z)
        if np.any(gaps < spacing_tolerance_mm):
            i = int(np.argmin(gaps))
            raise VolumeError(f"instances {ordered[i].get('InstanceNumber', '?')} and "
                              f"{ordered[i + 1].get('InstanceNumber', '?')} lie at the same position (z={z[i]:g} mm)")
        step = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - step) > max(spacing_tolerance_mm, 0.01 * step))
        if bad.size:
            i = int(bad[0])
            missing = round(gaps[i] / step) - 1
            hint = f"; about {missing} slice(s) missing" if missing >= 1 else ""
            a, b = (ordered[j].get("InstanceNumber", "?") for j in (i, i + 1))
            raise VolumeError(f"slices are unevenly spaced: {gaps[i]:.2f} mm between instances {a} and {b}, "
                              f"{step:.2f} mm elsewhere{hint}")
    else:
        step = float(first.get("SliceThickness", 0) or 0) or 1.0
    hu = np.empty((n, int(first.Rows), int(first.Columns)), np.int16)
    for k, ds in enumerate(ordered):
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if _native_hu(ds, slope, intercept, hu[k]):
            continue
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # undecodable transfer syntax, truncated data
            raise VolumeError(f"instance {ds.get('InstanceNumber', '?')}: pixel data cannot be decoded "
                              f"({type(exc).__name__})") from None
        hu[k] = np.clip(np.rint(pixels.astype(np.float32) * slope + intercept), -32768, 32767)
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    return CtVolume(hu=hu, spacing_mm=(step, row_mm, col_mm), datasets=list(ordered))


_NATIVE_LE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


def _native_hu(ds: Dataset, slope: float, intercept: float, out: np.ndarray) -> bool:
    """HU of one slice straight from uncompressed 16-bit data, in integers: the common CT case
    (slope 1, whole-number intercept) without pydicom's decoder or a float copy per slice. Same
    values as the general path: stored bits masked or sign-extended as pydicom does. False when
    the slice needs the general path."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if (ts not in _NATIVE_LE or slope != 1 or not intercept.is_integer() or int(ds.get("BitsAllocated", 0)) != 16
            or int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("PixelRepresentation", 0)) not in (0, 1)):
        return False
    rows, cols = out.shape
    data = _pixel_view(ds)
    if len(data) < rows * cols * 2:
        return False
    signed = int(ds.PixelRepresentation) == 1
    raw = np.frombuffer(data, "<i2" if signed else "<u2", count=rows * cols).reshape(rows, cols)
    bits = int(ds.get("BitsStored", 16) or 16)
    bits = bits if 0 < bits < 16 else 16
    offset = int(intercept)
    # the stored bits into `out` itself (no array in between): masked, or sign-extended from the top stored bit
    samples = out if signed else out.view(np.uint16)
    if bits == 16:
        np.copyto(samples, raw)
    elif signed:
        np.left_shift(raw, 16 - bits, out=out)
        np.right_shift(out, 16 - bits, out=out)
    else:
        np.bitwise_and(raw, np.uint16((1 << bits) - 1), out=samples)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if low + offset < -32768 or high + offset > 32767 or high > 32767:
        # values the stored bits allow would leave int16: look at the ones there are
        low, high = int(samples.min()), int(samples.max())
        if low + offset < -32768 or high + offset > 32767 or high > 32767:
            return False  # rare: let the general path clip
    if offset:
        np.add(out, np.int16(offset), out=out)
    return True


def _pixel_view(ds: Dataset) -> bytes | memoryview:
    """A slice's Pixel Data value: where it was left in the Part 10 bytes the slice was read from
    (`read_instance`), a view of them (no copy) once the element header in front of it is checked;
    else `ds.PixelData`."""
    elem = ds.get_item(PIXEL_DATA, keep_deferred=True)
    buffer = getattr(ds, "buffer", None)
    if (isinstance(elem, RawDataElement) and elem.value is None and isinstance(buffer, BytesIO)
            and elem.length != 0xFFFFFFFF):
        whole = buffer.getvalue()   # the bytes it was made from, not a copy, while nobody wrote to it
        start, end = elem.value_tell, elem.value_tell + elem.length
        head = start - (8 if elem.is_implicit_VR else 12)
        if head >= 0 and end <= len(whole) and whole[head:head + 4] == b"\xe0\x7f\x10\x00":
            return memoryview(whole)[start:end]
    return ds.PixelData
