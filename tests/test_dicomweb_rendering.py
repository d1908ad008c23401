"""Unit tests: rendered images through the DICOM pipeline (omi_dsf.dicomweb.rendering) on
pydicom's test files: palette colour, YBR, monochrome with rescale and window."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, pixel_array

from omi_dsf.dicomweb.rendering import render

OPTS = {"quality": 95, "viewport": None, "window": None}


def _png(name: str, frame: int = 1, **opts) -> np.ndarray:
    ds = pydicom.dcmread(get_testdata_file(name))
    return np.asarray(Image.open(BytesIO(render(ds, frame, "image/png", {**OPTS, **opts}))))


def test_palette_colour_is_rendered_in_its_colours():
    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    img = _png("examples_palette.dcm")
    expected = (apply_color_lut(pixel_array(ds), ds) >> 8).astype(np.uint8)   # 16-bit palette entries
    assert img.shape == expected.shape and img.ndim == 3
    assert np.abs(img.astype(int) - expected).max() <= 1
    assert not (img[..., 0] == img[..., 1]).all()   # not grey


@pytest.mark.parametrize("name", ["SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "examples_ybr_color.dcm", "SC_rgb_rle.dcm"])
def test_ybr_and_rgb_are_rendered_as_rgb(name):
    ds = pydicom.dcmread(get_testdata_file(name))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    img = _png(name, frame=frames)
    expected = pixel_array(ds, index=frames - 1 if frames > 1 else None)   # pydicom's RGB
    assert img.shape == expected.shape
    assert np.abs(img.astype(int) - expected.astype(int)).max() <= 1


def test_monochrome_through_rescale_and_window():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = pixel_array(ds).astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    img = _png("CT_small.dcm", window=(40.0, 400.0)).astype(int)
    expected = (np.clip((hu - (40 - 200)) / 400, 0, 1) * 255).astype(int)
    assert img.shape == hu.shape and np.abs(img - expected).max() <= 1
    assert (_png("CT_small.dcm", window=(4000.0, 10.0)) == 0).all()   # everything below the window


def test_monochrome_through_a_voi_lut_and_monochrome1_inverted():
    """Without a window asked for, a VOI LUT Sequence maps the Modality LUT's output (PS3.4 N.2);
    MONOCHROME1 comes out inverted."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 8]          # 256 entries from modality value 0, 8 bits
    lut.add_new(0x00283006, "US", list(range(256)))   # LUTData
    ds.VOILUTSequence = Sequence([lut])
    hu = pixel_array(ds).astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip(hu, 0, 255).astype(int)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    again = pydicom.dcmread(BytesIO(buf.getvalue()))
    img = np.asarray(Image.open(BytesIO(render(again, 1, "image/png", OPTS)))).astype(int)
    assert np.abs(img - expected).max() <= 1 and len(np.unique(expected)) > 10
    again.PhotometricInterpretation = "MONOCHROME1"
    inverted = np.asarray(Image.open(BytesIO(render(again, 1, "image/png", OPTS)))).astype(int)
    assert np.abs(inverted - (255 - expected)).max() <= 1
