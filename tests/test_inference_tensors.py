"""Open Inference Protocol v2 tensor encoding: JSON and the binary tensor data extension."""

from __future__ import annotations

import json

import numpy as np
import pytest

from omi_dsf.inference import tensors
from omi_dsf.inference.tensors import HEADER_LENGTH, TensorError

SAMPLES = {
    "i16": np.arange(-12, 12, dtype=np.int16).reshape(2, 3, 4),
    "u8": np.array([[0, 255]], dtype=np.uint8),
    "f32": np.array([1.5, -2.25, 3e-3], dtype=np.float32),
    "f64": np.array([np.pi]),
    "b": np.array([True, False, True]),
    "s": np.array([b"lung", "seg".encode()], dtype=object),
}


@pytest.mark.parametrize("binary", [False, True, ["i16", "s"]])
def test_round_trip_keeps_values_dtype_and_shape(binary):
    body, headers = tensors.encode({"id": "r1"}, "outputs", SAMPLES, binary=binary)
    message, out = tensors.decode(body, headers.get(HEADER_LENGTH), "outputs")
    assert message["id"] == "r1"
    for name, array in SAMPLES.items():
        assert out[name].dtype == array.dtype and out[name].shape == array.shape, name
        assert (out[name] == array).all(), name


def test_binary_layout_follows_the_extension():
    arr = np.array([[1, 2], [3, 4]], dtype=np.int16)
    body, headers = tensors.encode({}, "inputs", {"x": arr}, binary=True)
    n = int(headers[HEADER_LENGTH])
    head = json.loads(body[:n])
    assert head["inputs"][0] == {"name": "x", "datatype": "INT16", "shape": [2, 2],
                                 "parameters": {"binary_data_size": 8}}
    assert body[n:] == b"\x01\x00\x02\x00\x03\x00\x04\x00"  # row-major little-endian
    assert headers["Content-Type"] == "application/octet-stream"


def test_json_data_is_flat_row_major():
    body, headers = tensors.encode({}, "inputs", {"x": np.array([[1, 2], [3, 4]], np.int32)})
    assert HEADER_LENGTH not in headers
    assert json.loads(body)["inputs"][0]["data"] == [1, 2, 3, 4]


def test_nested_json_data_is_accepted():
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3.5, 4]]}]})
    _, out = tensors.decode(body.encode(), None, "inputs")
    assert out["x"].tolist() == [[1, 2], [3.5, 4]]


@pytest.mark.parametrize("entry, message", [
    ({"name": "x", "datatype": "INT16", "shape": [2, 2], "data": [1, 2, 3]}, "3 values do not fill shape"),
    ({"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}, "outside the range of INT8"),
    ({"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}, "INT32 data holds"),
    ({"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]}, "unknown datatype 'FLOAT'"),
    ({"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}, "shape must be a list of non-negative"),
    ({"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}, "BOOL data holds"),
])
def test_bad_json_tensors_name_the_problem(entry, message):
    with pytest.raises(TensorError, match=message) as info:
        tensors.decode(json.dumps({"inputs": [entry]}).encode(), None, "inputs")
    assert "'x'" in str(info.value)


def test_bad_binary_messages_name_the_problem():
    body, headers = tensors.encode({}, "inputs", {"x": np.zeros(4, np.int16)}, binary=True)
    n = int(headers[HEADER_LENGTH])
    with pytest.raises(TensorError, match="does not fit"):
        tensors.decode(body[:-1], n, "inputs")
    with pytest.raises(TensorError, match="belong to no tensor"):
        tensors.decode(body + b"\x00", n, "inputs")
    with pytest.raises(TensorError, match="outside the body"):
        tensors.decode(body, len(body) + 1, "inputs")
    with pytest.raises(TensorError, match="not an integer"):
        tensors.decode(body, "abc", "inputs")
    # declared size disagrees with shape × datatype
    head = json.dumps({"inputs": [{"name": "x", "datatype": "INT16", "shape": [3],
                                   "parameters": {"binary_data_size": 8}}]}).encode()
    with pytest.raises(TensorError, match="needs 6"):
        tensors.decode(head + bytes(8), len(head), "inputs")


def test_shape_wildcards():
    assert tensors.shape_matches((3, 4, 5), [-1, -1, -1])
    assert tensors.shape_matches((3,), [3])
    assert not tensors.shape_matches((3, 4), [-1, -1, -1])
    assert not tensors.shape_matches((2,), [3])


def test_parts_are_views_of_the_arrays_and_chunks_rebuild_the_body():
    hu = np.arange(3 * 5 * 7, dtype=np.int16).reshape(3, 5, 7)
    spacing = np.array([2.5, 0.7, 0.7], np.float32)
    parts, headers = tensors.encode_parts({"id": "x"}, "inputs", {"HU": hu, "SPACING_MM": spacing}, binary=True)
    assert np.shares_memory(np.frombuffer(parts[1], np.int16), hu)  # no copy of the volume
    body = b"".join(bytes(c) for c in tensors.chunks(parts, size=16))
    assert all(len(c) <= 16 for c in tensors.chunks(parts, size=16))
    assert int(headers["Content-Length"]) == len(body)
    assert (body, {k: v for k, v in headers.items()}) == tensors.encode({"id": "x"}, "inputs",
                                                                         {"HU": hu, "SPACING_MM": spacing}, True)
    _, out = tensors.decode(body, headers[HEADER_LENGTH], "inputs")
    assert np.array_equal(out["HU"], hu) and np.shares_memory(out["HU"], np.frombuffer(body, np.uint8))


@pytest.mark.parametrize("name", ["i16", "u8", "f32", "f64", "b"])
def test_packed_tensors_round_trip_without_a_copy(name):
    array = SAMPLES[name]
    raw, params = tensors.packed(array)
    assert tensors.is_packed("BYTES", params) and not tensors.is_packed("INT16", params)
    out = tensors.unpacked(name, raw, params)
    assert out.dtype == array.dtype and out.shape == array.shape and (out == array).all()
    assert np.shares_memory(out, np.frombuffer(raw, np.uint8))   # a view of the element


@pytest.mark.parametrize("params, element, message", [
    ({"packed_datatype": "INT16"}, b"\0\0", "without a numeric packed_datatype and a packed_shape"),
    ({"packed_datatype": "BYTES", "packed_shape": "1"}, b"\0\0", "without a numeric"),
    ({"packed_datatype": "INT17", "packed_shape": "1"}, b"\0\0", "unknown datatype"),
    ({"packed_datatype": "INT16", "packed_shape": "2,x"}, b"\0\0", "not a list of integers"),
    ({"packed_datatype": "INT16", "packed_shape": "-1"}, b"\0\0", "non-negative"),
    ({"packed_datatype": "INT16", "packed_shape": "2"}, b"\0\0", "2 bytes of binary data, but shape"),
    ({"packed_datatype": "INT16", "packed_shape": "1"}, "AAA=", "must be bytes"),
])
def test_bad_packed_tensors_name_the_problem(params, element, message):
    with pytest.raises(TensorError, match=message):
        tensors.unpacked("HU", element, params)
    with pytest.raises(TensorError, match="cannot be packed"):
        tensors.packed(SAMPLES["s"])
