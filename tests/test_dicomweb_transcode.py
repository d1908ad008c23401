"""Unit tests: transfer syntax conversion (omi_dsf.dicomweb.transcode) on pydicom's test files."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGLosslessSV1, JPEGLSLossless, RLELossless)

from omi_dsf.dicomweb import transcode
from omi_dsf.dicomweb.errors import NotAcceptable


def _data(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def _read(data: bytes):
    return pydicom.dcmread(BytesIO(data))


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_gdcm.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "MR_small_implicit.dcm"])
@pytest.mark.parametrize("target", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEGLSLossless,
                                    JPEG2000Lossless])
def test_lossless_sources_convert_without_changing_a_pixel(name, target):
    data = _data(name)
    out, ts = transcode.convert(data, [target])
    assert ts == target
    ds = _read(out)
    assert ds.file_meta.TransferSyntaxUID == target
    assert np.array_equal(ds.pixel_array, _read(data).pixel_array)


def test_a_lossy_source_is_decompressed_and_a_lossy_target_never_made():
    data = _data("SC_rgb_jpeg_lossy_gdcm.dcm")
    out, ts = transcode.convert(data, [ExplicitVRLittleEndian])
    ds = _read(out)
    assert ts == ExplicitVRLittleEndian and ds.PhotometricInterpretation == "RGB"
    assert np.array_equal(ds.pixel_array, _read(data).pixel_array)
    # as stored when the client names the stored lossy syntax; 406 for a lossy target it is not in
    assert transcode.convert(data, [JPEGBaseline8Bit]) == (data, JPEGBaseline8Bit)
    with pytest.raises(NotAcceptable, match="never to lossy"):
        transcode.convert(_data("CT_small.dcm"), [JPEGBaseline8Bit])
    with pytest.raises(NotAcceptable):   # pydicom has no JPEG Lossless encoder
        transcode.convert(_data("CT_small.dcm"), [JPEGLosslessSV1])


def test_the_first_acceptable_syntax_wins_and_star_means_as_stored():
    data = _data("MR_small_RLE.dcm")
    assert transcode.convert(data, ["*", ExplicitVRLittleEndian]) == (data, RLELossless)
    assert transcode.convert(data, [JPEGLosslessSV1, ExplicitVRLittleEndian])[1] == ExplicitVRLittleEndian
    assert transcode.convert(data, [JPEGLosslessSV1, "*"]) == (data, RLELossless)


def test_an_instance_without_pixels_goes_uncompressed():
    out, ts = transcode.convert(_data("test-SR.dcm"), [JPEG2000Lossless])
    assert ts == ExplicitVRLittleEndian and _read(out).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_native_frames_of_a_compressed_multiframe():
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    frames = transcode.native_frames(ds, [2, 1])
    arr = ds.pixel_array
    assert frames == [arr[1].tobytes(), arr[0].tobytes()]


def test_the_spliced_path_equals_pydicoms_decompress(tmp_path):
    """Monochrome lossless instances are decompressed by splicing the stored bytes; the result
    is the instance pydicom's own decompress gives, element for element."""
    from omi_dsf.testkit.conformance import jpeg_lossless
    from omi_dsf.testkit.phantom import write_ct_study
    files = jpeg_lossless(write_ct_study(tmp_path / "ct", slices=2, seed=3, rows=64, cols=64), tmp_path / "jl")
    for data in [f.read_bytes() for f in files] + [_data("MR_small_RLE.dcm"), _data("MR_small_jp2klossless.dcm")]:
        out, ts = transcode.convert(data, [ExplicitVRLittleEndian])
        assert transcode._native_splice(data, str(_read(data).file_meta.TransferSyntaxUID)) == out
        reference = _read(data)
        reference.decompress(generate_instance_uid=False)
        got = _read(out)
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(got.pixel_array, reference.pixel_array)
        assert [e.tag for e in got] == [e.tag for e in reference]
        assert all(got[e.tag].value == e.value for e in reference if e.tag != 0x7FE00010)


def test_the_worker_pool_converts_in_order_and_survives_a_dead_worker():
    import os
    import signal
    from concurrent.futures.process import BrokenProcessPool

    pool = transcode.Pool(2)
    try:
        datas = [_data(n) for n in ("MR_small_RLE.dcm", "SC_rgb_rle.dcm", "CT_small.dcm")]
        outcomes = [transcode.Pool.result(f.result(timeout=60))
                    for f in [pool.submit(d, [ExplicitVRLittleEndian]) for d in datas]]
        assert [_read(o).SOPInstanceUID for o, _ in outcomes] == [_read(d).SOPInstanceUID for d in datas]
        refused = pool.submit(datas[2], [JPEGBaseline8Bit]).result(timeout=60)
        with pytest.raises(NotAcceptable, match="never to lossy"):
            transcode.Pool.result(refused)
        for pid in list(pool._executor._processes):   # workers killed: a request after that works
            os.kill(pid, signal.SIGKILL)
        outcome = None
        for _ in range(2):   # the one in flight when the pool notices may fail; the next may not
            try:
                outcome = pool.submit(datas[0], [ExplicitVRLittleEndian]).result(timeout=60)
                break
            except BrokenProcessPool:
                continue
        assert outcome is not None and transcode.Pool.result(outcome)[1] == ExplicitVRLittleEndian
    finally:
        pool.close()


def test_jpeg_lossless_to_uncompressed_is_converted_in_threads(tmp_path):
    """JPEG Lossless asked for uncompressed goes to the pool's threads (libjpeg-turbo releases the
    interpreter lock): the same bytes as the worker processes make, and no process is started;
    other conversions still go to the processes."""
    from omi_dsf.testkit.conformance import jpeg_lossless
    from omi_dsf.testkit.phantom import write_ct_study
    files = jpeg_lossless(write_ct_study(tmp_path / "ct", slices=3, seed=4, rows=64, cols=64), tmp_path / "jl")
    datas = [f.read_bytes() for f in files]
    pool = transcode.Pool(2)
    try:
        outcomes = [transcode.Pool.result(f.result(timeout=60))
                    for f in [pool.submit(d, [ExplicitVRLittleEndian]) for d in datas]]
        assert pool._executor is None and pool._threads is not None
        assert outcomes == [transcode.convert(d, [ExplicitVRLittleEndian]) for d in datas]
        rle = transcode.Pool.result(pool.submit(datas[0], [RLELossless]).result(timeout=60))
        assert rle[1] == RLELossless and pool._executor is not None
    finally:
        pool.close()
