"""Tensors on the wire in the Open Inference Protocol v2 (KServe / Triton "v2").

A message (infer request or response) is a JSON object whose "inputs" or "outputs" list
describes tensors by name, datatype and shape. Each tensor's values travel either in the
JSON ("data": flat row-major list) or, with the binary tensor data extension, as raw
little-endian bytes appended after the JSON; then the JSON's length is given in the
`Inference-Header-Content-Length` header and the tensor carries
`parameters.binary_data_size`. Client and reference service share this code.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"

# v2 datatype name -> numpy dtype (little-endian on the wire)
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}


class TensorError(ValueError):
    """A tensor's datatype, shape or data is malformed or does not fit what was declared."""


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    for name, dtype in DTYPES.items():
        if name != "BYTES" and array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            return name
    raise TensorError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")


def shape_matches(shape: Iterable[int], declared: Iterable[int]) -> bool:
    """True when `shape` fits `declared`, where -1 in `declared` accepts any size."""
    shape, declared = list(shape), list(declared)
    return len(shape) == len(declared) and all(d == -1 or d == s for s, d in zip(shape, declared))


def check_declared(model: str, declared: list[dict], inputs: Mapping[str, np.ndarray]) -> None:
    """Raise `TensorError` naming the first of `inputs` that is not among the model's `declared` inputs
    (metadata "inputs": name, datatype, shape) or does not fit its datatype and shape, or a missing one."""
    by_name = {t["name"]: t for t in declared}
    for name in inputs:
        if name not in by_name:
            raise TensorError(f"model '{model}' has no input '{name}' (inputs: {', '.join(by_name)})")
    for name, spec in by_name.items():
        if name not in inputs:
            raise TensorError(f"model '{model}' needs input '{name}' ({spec['datatype']} {spec['shape']})")
        got = datatype_of(inputs[name])
        if got != spec["datatype"]:
            raise TensorError(f"input '{name}' is {got}, model '{model}' expects {spec['datatype']}")
        if not shape_matches(inputs[name].shape, spec["shape"]):
            raise TensorError(f"input '{name}' has shape {list(inputs[name].shape)}, model '{model}' "
                              f"expects {spec['shape']}")


def _check_shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise TensorError(f"tensor '{name}': shape must be a list of non-negative integers, got {shape!r}")
    return shape


def _bytes_to_wire(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def _bytes_from_wire(name: str, raw: bytes, count: int) -> np.ndarray:
    out, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(raw):
            raise TensorError(f"tensor '{name}': BYTES data ends inside an element length")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise TensorError(f"tensor '{name}': BYTES element longer than the data")
        out.append(raw[pos:pos + n])
        pos += n
    if pos != len(raw):
        raise TensorError(f"tensor '{name}': {len(raw) - pos} bytes left after {count} BYTES elements")
    return np.array(out, dtype=object)


def wire_view(array: np.ndarray) -> bytes | memoryview:
    """Raw bytes of a tensor for the binary extension (row-major, little-endian), without a copy
    when the array already is that (a 200-slice CT is 100 MB: every copy costs tens of
    milliseconds and as much memory)."""
    if datatype_of(array) == "BYTES":
        return _bytes_to_wire(array)
    wire = np.ascontiguousarray(array, dtype=DTYPES[datatype_of(array)])
    return memoryview(wire).cast("B")


def from_wire(name: str, datatype: str, shape: list[int], raw: bytes | memoryview) -> np.ndarray:
    dtype = _dtype(name, datatype)
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_wire(name, bytes(raw), count).reshape(shape)
    if len(raw) != count * dtype.itemsize:
        raise TensorError(f"tensor '{name}': {len(raw)} bytes of binary data, but shape {shape} of "
                          f"{datatype} needs {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def from_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    dtype = _dtype(name, datatype)
    if datatype == "BYTES":
        flat = [data] if isinstance(data, str) else list(np.asarray(data, dtype=object).reshape(-1))
        values = np.array([v.encode("utf-8") if isinstance(v, str) else v for v in flat], dtype=object)
    else:
        try:
            values = np.asarray(data).reshape(-1)
        except ValueError:
            raise TensorError(f"tensor '{name}': data is not a regular array") from None
        allowed = {"BOOL": "b"}.get(datatype, "iu" if dtype.kind in "iu" else "iuf")
        if values.size and values.dtype.kind not in allowed:
            raise TensorError(f"tensor '{name}': {datatype} data holds {values.dtype.kind!r}-kind values "
                              f"(e.g. {values[0]!r})")
        if dtype.kind in "iu" and values.size:
            info = np.iinfo(dtype)
            if values.min() < info.min or values.max() > info.max:
                raise TensorError(f"tensor '{name}': values outside the range of {datatype}")
        values = values.astype(dtype)
    if values.size != math.prod(shape):
        raise TensorError(f"tensor '{name}': {values.size} values do not fill shape {shape} "
                          f"({math.prod(shape)} values)")
    return values.reshape(shape)


# A numeric tensor *packed*: a BYTES tensor of shape [1] whose one element is the tensor's raw bytes
# (row-major, little-endian), its own datatype and shape in the tensor's parameters `packed_datatype`
# ("INT16") and `packed_shape` ("200,512,512"). For a server that turns raw tensor bytes into Python
# lists on arrival but passes BYTES elements through as they are (MLServer over gRPC, its issue #913):
# a model on it says in its metadata parameters that it takes and gives tensors so
# (`packed_tensors: true`); a request asks for packed outputs with the request parameter
# `packed_outputs: true`.
PACKED_DATATYPE, PACKED_SHAPE = "packed_datatype", "packed_shape"


def packed_parameters(array: np.ndarray) -> dict[str, str]:
    """The parameters of a numeric tensor sent packed."""
    datatype = datatype_of(array)
    if datatype == "BYTES":
        raise TensorError("a BYTES tensor cannot be packed")
    return {PACKED_DATATYPE: datatype, PACKED_SHAPE: ",".join(str(d) for d in array.shape)}


def packed(array: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A numeric tensor's one BYTES element and its parameters."""
    params = packed_parameters(array)
    return np.ascontiguousarray(array, dtype=DTYPES[params[PACKED_DATATYPE]]).tobytes(), params


def is_packed(datatype: str, parameters: Mapping[str, Any] | None) -> bool:
    return datatype == "BYTES" and PACKED_DATATYPE in (parameters or {})


def unpacked(name: str, element: Any, parameters: Mapping[str, Any]) -> np.ndarray:
    """The numeric tensor a packed one carries (a read-only view of `element`, no copy)."""
    datatype, shape_text = parameters.get(PACKED_DATATYPE), parameters.get(PACKED_SHAPE)
    if not isinstance(datatype, str) or datatype == "BYTES" or not isinstance(shape_text, str):
        raise TensorError(f"tensor '{name}': packed, but without a numeric {PACKED_DATATYPE} and a {PACKED_SHAPE}")
    if not isinstance(element, (bytes, bytearray, memoryview)):
        raise TensorError(f"tensor '{name}': a packed tensor's element must be bytes (packed tensors travel over "
                          f"gRPC)")
    try:
        shape = [int(d) for d in shape_text.split(",")] if shape_text.strip() else []
    except ValueError:
        raise TensorError(f"tensor '{name}': {PACKED_SHAPE} {shape_text[:40]!r} is not a list of integers") from None
    return from_wire(name, datatype, _check_shape(name, shape), element)


def _json_data(array: np.ndarray) -> list:
    if datatype_of(array) == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
    return array.reshape(-1).tolist()


def _dtype(name: str, datatype: Any) -> np.dtype:
    if datatype not in DTYPES:
        raise TensorError(f"tensor '{name}': unknown datatype {datatype!r} (one of {', '.join(DTYPES)})")
    return DTYPES[datatype]


def encode(header: Mapping[str, Any], key: str, tensors: Mapping[str, np.ndarray],
           binary: bool | Iterable[str] = False, tensor_parameters: Mapping[str, dict] | None = None
           ) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a message with `tensors` under `key` ("inputs"/"outputs").

    `binary` is True (all tensors binary), False (all JSON) or the names to send binary.
    """
    parts, headers = encode_parts(header, key, tensors, binary, tensor_parameters)
    return b"".join(parts), headers


def encode_parts(header: Mapping[str, Any], key: str, tensors: Mapping[str, np.ndarray],
                 binary: bool | Iterable[str] = False, tensor_parameters: Mapping[str, dict] | None = None
                 ) -> tuple[list[bytes | memoryview], dict[str, str]]:
    """`encode` as the body's pieces in order (JSON, then each binary tensor as a view of its array,
    not a copy), with a Content-Length header; for sending a large message without joining it."""
    binary_names = set(tensors) if binary is True else set(binary or ())
    entries, blobs = [], []
    for name, array in tensors.items():
        array = np.asarray(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        params = dict((tensor_parameters or {}).get(name, {}))
        if name in binary_names:
            raw = wire_view(array)
            params["binary_data_size"] = len(raw)
            blobs.append(raw)
        else:
            entry["data"] = _json_data(array)
        if params:
            entry["parameters"] = params
        entries.append(entry)
    head = json.dumps({**header, key: entries}, separators=(",", ":")).encode("utf-8")
    length = str(len(head) + sum(len(b) for b in blobs))
    if not blobs:
        return [head], {"Content-Type": "application/json", "Content-Length": length}
    return [head, *blobs], {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head)),
                            "Content-Length": length}


def chunks(parts: Iterable[bytes | memoryview], size: int = 4 << 20) -> Iterator[memoryview]:
    """The parts in slices of at most `size` bytes, for streaming a body: an HTTP client handed one
    100 MB buffer may copy what is left of it after every partial socket write."""
    for part in parts:
        view = memoryview(part).cast("B")
        for start in range(0, len(view), size):
            yield view[start:start + size]


def decode(body: bytes, header_length: str | int | None, key: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON part of a message and its tensors (under `key`) as numpy arrays; binary tensors are
    read-only views into `body`, not copies."""
    if header_length is None:
        head, rest = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise TensorError(f"{HEADER_LENGTH} is not an integer: {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise TensorError(f"{HEADER_LENGTH} {n} is outside the body of {len(body)} bytes")
        view = memoryview(body).cast("B")
        head, rest = view[:n], view[n:]
    try:
        message = json.loads(bytes(head) if isinstance(head, memoryview) else head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorError(f"message is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise TensorError("message must be a JSON object")
    entries = message.get(key, [])
    if not isinstance(entries, list):
        raise TensorError(f"'{key}' must be a list")
    tensors, pos = {}, 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise TensorError(f"each of '{key}' needs a 'name'")
        name = entry["name"]
        if "datatype" not in entry or "shape" not in entry:
            if "data" not in entry and "binary_data_size" not in entry.get("parameters", {}):
                continue  # a requested-output entry without data (e.g. in an infer request)
            raise TensorError(f"tensor '{name}': needs 'datatype' and 'shape'")
        shape = _check_shape(name, entry["shape"])
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or pos + size > len(rest):
                raise TensorError(f"tensor '{name}': binary_data_size {size!r} does not fit the "
                                  f"{len(rest) - pos} bytes of binary data left")
            tensors[name] = from_wire(name, entry["datatype"], shape, rest[pos:pos + size])
            pos += size
        elif "data" in entry:
            tensors[name] = from_json(name, entry["datatype"], shape, entry["data"])
        else:
            raise TensorError(f"tensor '{name}': neither 'data' nor binary_data_size")
    if pos != len(rest):
        raise TensorError(f"{len(rest) - pos} bytes of binary data belong to no tensor")
    return message, tensors
