"""From study instances to a checked CT volume: good input passes, bad input says what is wrong."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest

from omi_dsf.inference.volume import VolumeError, build_volume, pick_series
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
