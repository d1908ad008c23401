"""From study instances to a checked CT volume: good input passes, bad input says what is wrong."""

from __future__ import annotations

import copy
from io import BytesIO

import numpy as np
import pydicom
import pytest

from omi_dsf.inference.volume import PIXEL_DATA, VolumeError, build_volume, pick_series, read_instance
from omi_dsf.testkit import phantom


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    paths = phantom.write_ct_study(tmp_path_factory.mktemp("ct"), slices=6, rows=32, cols=32, seed=3)
    return [pydicom.dcmread(p) for p in paths]


def fresh(series):
    return [copy.deepcopy(ds) for ds in series]


def test_volume_is_sorted_cranial_first_in_hounsfield_units(series):
    shuffled = fresh(series)[::-1]
    vol = build_volume(shuffled)
    assert [int(ds.InstanceNumber) for ds in vol.datasets] == [1, 2, 3, 4, 5, 6]
    assert vol.spacing_mm == pytest.approx((2.5, 0.7, 0.7))
    assert vol.hu.dtype == np.int16 and vol.hu.shape == (6, 32, 32)
    assert np.array_equal(vol.hu, phantom.phantom_hu(6, 3, 32, 32))


def test_missing_slice_is_named(series):
    dss = fresh(series)
    del dss[3]
    with pytest.raises(VolumeError, match=r"unevenly spaced: 5.00 mm between instances 3 and 5, 2.50 mm "
                                          r"elsewhere; about 1 slice\(s\) missing"):
        build_volume(dss)


def test_uneven_spacing_and_duplicates_are_named(series):
    dss = fresh(series)
    dss[2].ImagePositionPatient = [dss[2].ImagePositionPatient[0], dss[2].ImagePositionPatient[1], "-4.0"]
    with pytest.raises(VolumeError, match="unevenly spaced"):
        build_volume(dss)
    dss = fresh(series)
    dss[2].ImagePositionPatient = dss[1].ImagePositionPatient
    with pytest.raises(VolumeError, match="same position"):
        build_volume(dss)


def test_slice_limits(series):
    with pytest.raises(VolumeError, match="6 slices, more than the model's limit of 5"):
        build_volume(fresh(series), max_slices=5)
    with pytest.raises(VolumeError, match="at least 10"):
        build_volume(fresh(series), min_slices=10)


def test_wrong_modality_orientation_and_size(series):
    dss = fresh(series)
    dss[4].Modality = "MR"
    with pytest.raises(VolumeError, match="instance 5 has modality MR, the model needs CT"):
        build_volume(dss)
    dss = fresh(series)
    dss[0].ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    with pytest.raises(VolumeError, match="instance 1 is not an axial slice"):
        build_volume(dss)
    dss = fresh(series)
    del dss[1].PixelSpacing
    with pytest.raises(VolumeError, match="instance 2 lacks PixelSpacing"):
        build_volume(dss)


def test_pick_series(series):
    mr = fresh(series)[:2]
    for ds in mr:
        ds.Modality, ds.SeriesInstanceUID = "MR", "1.2.3"
    assert pick_series(mr + fresh(series))[0].SeriesInstanceUID == series[0].SeriesInstanceUID
    with pytest.raises(VolumeError, match="no CT series \\(modalities found: MR\\)"):
        pick_series(mr)
    with pytest.raises(VolumeError, match="series 1.2.3 has modality MR"):
        pick_series(mr, series_uid="1.2.3")
    with pytest.raises(VolumeError, match="no instances"):
        pick_series([])


def _general_path(ds):
    """HU as pydicom decodes them, in floats: what the integer shortcut must equal."""
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


@pytest.mark.parametrize("signed, bits_stored, junk_high_bits", [(False, 12, True), (False, 16, False),
                                                                 (True, 12, True), (True, 16, False)])
def test_integer_shortcut_equals_pydicom_decoding(series, signed, bits_stored, junk_high_bits):
    dss = fresh(series)
    rng = np.random.default_rng(bits_stored)
    for ds in dss:
        # unsigned: bits 12-14 set now and then, which pydicom masks off (bit 15 would leave int16 anyway)
        raw = rng.integers(0, 1 << (16 if signed else 15), (32, 32)).astype(np.uint16)
        if not junk_high_bits and not signed:
            raw >>= 3
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = int(signed), bits_stored, bits_stored - 1
        ds.RescaleIntercept = 0 if signed else -1024
        ds.PixelData = raw.tobytes()
    vol = build_volume(dss)
    assert np.array_equal(vol.hu, np.stack([_general_path(ds) for ds in vol.datasets]))


def test_rescale_slope_and_out_of_range_values_take_the_general_path(series):
    dss = fresh(series)
    dss[0].RescaleSlope = 0.5
    dss[1].RescaleIntercept = 40000  # unsigned 12-bit + 40000 leaves int16: clipped, as before
    vol = build_volume(dss)
    for k, ds in enumerate(vol.datasets):
        assert np.array_equal(vol.hu[k], _general_path(ds)), k
    assert vol.hu[[int(ds.InstanceNumber) for ds in vol.datasets].index(2)].max() == 32767


@pytest.mark.parametrize("signed, bits_stored, intercept, low, high", [
    (False, 16, -32768, 30000, 65535),   # unsigned above int16, brought back by the intercept
    (False, 16, -1024, 0, 40000),        # unsigned above int16 after the intercept: clipped
    (True, 16, -1024, -32768, 1000),     # below int16 after the intercept: clipped
    (True, 16, 1024, -100, 32767),       # above: clipped
    (True, 16, -1024, -20000, 20000),    # the bits allow leaving int16, these values do not
    (False, 15, 16384, 0, 32767),        # 15 stored bits + intercept reach past int16
])
def test_values_near_the_int16_limits_equal_pydicom_decoding(series, signed, bits_stored, intercept, low, high):
    dss = fresh(series)
    rng = np.random.default_rng(abs(intercept))
    for ds in dss:
        raw = rng.integers(low, high, (32, 32), endpoint=True).astype(np.int16 if signed else np.uint16)
        raw[0, :2] = low, high
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = int(signed), bits_stored, bits_stored - 1
        ds.RescaleIntercept = intercept
        ds.PixelData = raw.tobytes()
    vol = build_volume(dss)
    assert np.array_equal(vol.hu, np.stack([_general_path(ds) for ds in vol.datasets]))


def _part10(ds, syntax=pydicom.uid.ExplicitVRLittleEndian) -> bytes:
    """`ds` as the Part 10 bytes a WADO-RS part carries, in `syntax`."""
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = syntax
    buf = BytesIO()
    ds.save_as(buf, implicit_vr=syntax == pydicom.uid.ImplicitVRLittleEndian, little_endian=True,
               enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("syntax", [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
@pytest.mark.parametrize("signed, bits_stored", [(False, 12), (False, 16), (True, 12), (True, 16)])
def test_pixels_read_from_the_part10_bytes_equal_pydicoms(series, syntax, signed, bits_stored):
    """An instance read from its bytes (`read_instance`, as WADO-RS parts are) keeps its Pixel Data there:
    the volume takes uncompressed int16/uint16 samples from those bytes, without loading the value into
    the dataset, and gets what pydicom's pixel_array gives; the dataset still answers PixelData."""
    rng = np.random.default_rng(bits_stored + signed)
    parts = []
    for ds in fresh(series):
        raw = rng.integers(0, 1 << (16 if signed else 15), (32, 32)).astype(np.uint16)   # junk above BitsStored
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = int(signed), bits_stored, bits_stored - 1
        ds.RescaleIntercept = 0 if signed else -1024
        ds.PixelData = raw.tobytes()
        parts.append(_part10(ds, syntax))
    read = [read_instance(part, defer_bytes=1024) for part in parts]   # (32x32 slices: 2 KB)
    vol = build_volume(read[::-1])
    assert all(ds.get_item(PIXEL_DATA, keep_deferred=True).value is None for ds in read)   # never copied in
    whole = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(BytesIO(part)) for part in parts)}
    assert np.array_equal(vol.hu, np.stack([_general_path(whole[str(ds.SOPInstanceUID)]) for ds in vol.datasets]))
    assert read[0].PixelData == whole[str(read[0].SOPInstanceUID)].PixelData
    assert read[0].file_meta.TransferSyntaxUID == syntax


def test_compressed_or_rescaled_instances_read_from_bytes_take_the_general_path(series):
    """A compressed transfer syntax (RLE Lossless here) and a rescale slope are decoded by pydicom, from
    the same bytes, as for a dataset read whole; a slice too short for its size still fails by name."""
    parts = []
    for k, ds in enumerate(fresh(series)):
        if k == 1:
            ds.RescaleSlope = 0.5
        if k in (2, 4):
            ds.compress(pydicom.uid.RLELossless, encoding_plugin="pydicom")
        parts.append(_part10(ds, ds.file_meta.TransferSyntaxUID))
    vol = build_volume([read_instance(part, 1024) for part in parts])
    expected = {str(ds.SOPInstanceUID): _general_path(ds) for ds in (pydicom.dcmread(BytesIO(p)) for p in parts)}
    assert np.array_equal(vol.hu, np.stack([expected[str(ds.SOPInstanceUID)] for ds in vol.datasets]))
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in vol.datasets} == {pydicom.uid.RLELossless,
                                                                            pydicom.uid.ExplicitVRLittleEndian}

    short = fresh(series)
    short[3].PixelData = short[3].PixelData[:100]
    with pytest.raises(VolumeError, match="instance 4: pixel data cannot be decoded"):
        build_volume([read_instance(_part10(ds), 1024) for ds in short])
