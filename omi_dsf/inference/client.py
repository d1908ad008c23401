"""Client for an Open Inference Protocol v2 server (KServe, Triton, the reference service).

Checks inputs against the model's metadata before sending, so a wrong shape or datatype
fails here with the model's own declaration in the message instead of deep in a server.
Errors are `OipError` subclasses with messages fit for a Task's error output.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import httpx
import numpy as np

from omi_dsf.inference import tensors
from omi_dsf.inference.tensors import TensorError
from omi_dsf.errors import RetryableError  # the service's state, fit for the Task
from omi_dsf.peer import Peer, PeerConfigError, http_client, json_answer


class OipError(Exception):
    """Inference through the Open Inference Protocol failed."""


class ServiceUnavailable(OipError, RetryableError):
    """The server cannot be reached or answers with a server error."""


class InferenceTimeout(OipError, RetryableError):
    """The server did not answer within the client's timeout."""


class ModelNotReady(OipError, RetryableError):
    """The model is unknown to the server or not ready to infer."""


class ServiceBusy(ModelNotReady):
    """The server has no room for another request now (HTTP 503 or 429 with Retry-After, gRPC
    RESOURCE_EXHAUSTED): ask again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class TensorMismatch(OipError):
    """An input does not fit the model's declared inputs (name, datatype, shape)."""


class InferenceRejected(OipError):
    """The server refused the request (HTTP 4xx) with its own error message."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass
class InferResult:
    model_name: str
    model_version: str | None
    id: str | None
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)


class OipClient:
    def __init__(self, base_url: str | Peer, timeout: float | None = None, http: httpx.Client | None = None,
                 verify: ssl.SSLContext | None = None, token: str | None = None, grpc_url: str | None = None):
        """`base_url`: the service as a Peer (URL, CA file, client certificate, token file, timeout: the
        site's configuration), or its URL. `http` replaces the HTTP client, e.g. a starlette TestClient
        for in-process tests. With a URL, `verify` is the TLS context (`omi_dsf.tls.client_context`;
        default the system CAs) and `token` a bearer token. Timeout default 120 s.
        `grpc_url` (grpc://host:port, or grpcs:// with the Peer's CA and client certificate): the same
        server's OIP v2 gRPC port; inference then goes there, tensors as raw bytes (KServe and MLServer
        turn tensors that come over HTTP into Python lists; MLServer's HTTP takes JSON only)."""
        self.grpc_url = grpc_url
        self._grpc_channel = self._grpc_call = None
        self._peer = base_url if isinstance(base_url, Peer) else None
        if isinstance(base_url, Peer):
            peer = base_url
            self.base_url, self.timeout = peer.url, float(timeout if timeout is not None else peer.timeout)
            if http is None:
                try:
                    http = peer.client(timeout=self.timeout)
                except PeerConfigError as exc:
                    raise OipError(str(exc)) from None
        else:
            self.base_url, self.timeout = base_url.rstrip("/"), float(timeout if timeout is not None else 120.0)
        self._http = http or http_client(self.base_url, verify, self.timeout, token=token)
        self._metadata: dict[tuple[str, str | None], dict] = {}
        self._binary: bool | None = None

    def close(self) -> None:
        self._http.close()
        if self._grpc_channel is not None:
            self._grpc_channel.close()

    def __enter__(self) -> "OipClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- health and metadata ------------------------------------------------------------------

    def server_live(self) -> bool:
        return self._status("GET", "/v2/health/live") == 200

    def server_ready(self) -> bool:
        return self._status("GET", "/v2/health/ready") == 200

    def server_metadata(self) -> dict:
        return self._json("GET", "/v2")

    def binary_tensors(self) -> bool:
        """Whether the server takes and answers tensors in the binary tensor data extension, from its
        metadata (asked once per client): it lists "binary_tensor_data" among its extensions (Triton,
        the reference service), or it is KServe's model server, which decodes and encodes them without
        listing them. Otherwise (MLServer) tensors travel as JSON."""
        if self._binary is None:
            try:
                meta = self.server_metadata()
            except InferenceRejected:
                meta = {}
            self._binary = uses_binary_tensors(meta)
        return self._binary

    def model_ready(self, model: str, version: str | None = None) -> bool:
        # The protocol answers 200 for ready and a 4xx for not ready or unknown.
        return self._status("GET", f"{_model_path(model, version)}/ready") == 200

    def model_metadata(self, model: str, version: str | None = None, refresh: bool = False) -> dict:
        key = (model, version)
        if refresh or key not in self._metadata:
            try:
                meta = self._json("GET", _model_path(model, version))
            except InferenceRejected as exc:
                raise ModelNotReady(f"model '{model}' is not available at {self.base_url}: {exc}") from None
            if not isinstance(meta.get("inputs"), list) or not isinstance(meta.get("outputs"), list):
                raise OipError(f"metadata of model '{model}' lacks 'inputs'/'outputs'")
            self._metadata[key] = meta
        return self._metadata[key]

    def wait_until_ready(self, model: str, timeout: float = 30.0, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.model_ready(model):
                    return
            except ServiceUnavailable:
                pass
            if time.monotonic() >= deadline:
                raise ModelNotReady(f"model '{model}' at {self.base_url} not ready within {timeout:g} s")
            time.sleep(interval)

    # -- inference ----------------------------------------------------------------------------

    def check_inputs(self, model: str, inputs: Mapping[str, np.ndarray], version: str | None = None) -> None:
        """Raise `TensorMismatch` naming the first input that does not fit the model's metadata."""
        declared = {t["name"]: t for t in self.model_metadata(model, version)["inputs"]}
        for name in inputs:
            if name not in declared:
                raise TensorMismatch(f"model '{model}' has no input '{name}' (inputs: {', '.join(declared)})")
        for name, spec in declared.items():
            if name not in inputs:
                if (spec.get("parameters") or {}).get("optional"):
                    continue
                raise TensorMismatch(f"model '{model}' needs input '{name}' ({spec['datatype']} {spec['shape']})")
            array = np.asarray(inputs[name])
            try:
                datatype = tensors.datatype_of(array)
            except TensorError as exc:
                raise TensorMismatch(f"input '{name}': {exc}") from None
            if datatype != spec["datatype"]:
                raise TensorMismatch(f"input '{name}' is {datatype}, model '{model}' expects {spec['datatype']}")
            if not tensors.shape_matches(array.shape, spec["shape"]):
                raise TensorMismatch(f"input '{name}' has shape {list(array.shape)}, model '{model}' "
                                     f"expects {spec['shape']} (-1: any size)")

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], *, outputs: list[str] | None = None,
              binary: bool | None = None, version: str | None = None, check: bool = True,
              request_id: str | None = None, parameters: Mapping[str, Any] | None = None,
              timings: dict[str, float] | None = None, on_sent: Callable[[], None] | None = None,
              packed: bool | None = None) -> InferResult:
        """Run the model; `binary` selects the binary tensor data extension for inputs and outputs
        (default: gRPC with raw bytes when the client has a `grpc_url`, else binary where the server's HTTP
        has it, `binary_tensors`).
        `timings`, if given, receives the seconds spent in "encode", "request" (HTTP round trip,
        the server's work included) and "decode". `on_sent` is called once the request body is
        out, while the server works (e.g. to start work of one's own that would slow the sending).
        `packed` (gRPC only): numeric tensors each as one BYTES element (`tensors.packed`); default as the
        model's metadata says (`parameters.packed_tensors`)."""
        if check:
            self.check_inputs(model, inputs, version)
            if not self.model_ready(model, version):
                raise ModelNotReady(f"model '{model}' at {self.base_url} is not ready")
        if binary is None:
            if self.grpc_url:
                if packed is None:
                    meta = self.model_metadata(model, version)
                    packed = (meta.get("parameters") or {}).get("packed_tensors") is True
                return self._infer_grpc(model, inputs, outputs, version, request_id, parameters, timings, on_sent,
                                        packed)
            binary = self.binary_tensors()
        header: dict[str, Any] = {}
        if request_id:
            header["id"] = request_id
        if parameters:
            header["parameters"] = dict(parameters)
        if outputs is not None or binary:
            names = outputs
            if names is None:
                names = [t["name"] for t in self.model_metadata(model, version)["outputs"]]
            header["outputs"] = [{"name": n, "parameters": {"binary_data": binary}} for n in names]
        t0 = time.perf_counter()
        parts, headers = tensors.encode_parts(header, "inputs", inputs, binary=binary)
        t1 = time.perf_counter()
        # streamed in 4 MB slices with a Content-Length (so not chunked): no 100 MB join, no quadratic resend
        response = self._request("POST", f"{_model_path(model, version)}/infer",
                                 content=_body(parts, on_sent), headers=headers)
        t2 = time.perf_counter()
        if response.status_code != 200:
            self._raise(response, model)
        try:
            message, out = tensors.decode(response.content, response.headers.get(tensors.HEADER_LENGTH), "outputs")
        except TensorError as exc:
            raise OipError(f"malformed response from model '{model}': {exc}") from None
        if timings is not None:
            timings.update(encode=t1 - t0, request=t2 - t1, decode=time.perf_counter() - t2)
        return InferResult(model_name=message.get("model_name", model), model_version=message.get("model_version"),
                           id=message.get("id"), outputs=out, parameters=message.get("parameters") or {})

    # -- gRPC (OIP v2's GRPCInferenceService; the messages of tritonclient's service_pb2) ----------

    def _grpc(self):
        """The ModelInfer call on the gRPC channel, opened once: requests go as bytes (`_grpc_request`),
        answers come as bytes."""
        if self._grpc_call is None:
            import grpc

            scheme, _, address = self.grpc_url.partition("://")
            if scheme not in ("grpc", "grpcs") or not address:
                raise OipError(f"grpc_url {self.grpc_url!r}: expected grpc://host:port or grpcs://host:port")
            options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
            if scheme == "grpcs":
                peer = self._peer
                if peer is not None and peer.client_key_password_file:
                    raise OipError("grpc_url: a client key with a password is not supported over gRPC")

                def read(path: str | None) -> bytes | None:
                    try:
                        return Path(path).read_bytes() if path else None
                    except OSError as exc:
                        raise OipError(f"grpc_url: {path}: {exc.strerror}") from None

                credentials = grpc.ssl_channel_credentials(
                    root_certificates=read(peer.ca_file if peer else None),
                    private_key=read(peer.client_key if peer else None),
                    certificate_chain=read(peer.client_cert if peer else None))
                self._grpc_channel = grpc.secure_channel(address, credentials, options)
            else:
                self._grpc_channel = grpc.insecure_channel(address, options)
            self._grpc_call = self._grpc_channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        return self._grpc_call

    def _infer_grpc(self, model: str, inputs: Mapping[str, np.ndarray], outputs: list[str] | None,
                    version: str | None, request_id: str | None, parameters: Mapping[str, Any] | None,
                    timings: dict[str, float] | None, on_sent: Callable[[], None] | None,
                    packed: bool = False) -> InferResult:
        """`infer` over gRPC: tensors as raw bytes (raw_input_contents), the answer's likewise; `packed`
        (the model's metadata says `packed_tensors`): numeric tensors each as one BYTES element
        (`tensors.packed`), for a server that would unpack raw bytes into Python lists (MLServer)."""
        import grpc

        names = outputs or [t["name"] for t in self.model_metadata(model, version)["outputs"]]
        if packed:
            parameters = {**(parameters or {}), "packed_outputs": True}
        t0 = time.perf_counter()
        body = _grpc_request(model, version, request_id, inputs, names, parameters, packed)
        t1 = time.perf_counter()
        token = self._peer.token() if self._peer is not None else None
        call = self._grpc().future(body, timeout=self.timeout,
                                   metadata=(("authorization", f"Bearer {token}"),) if token else None)
        del body
        if on_sent is not None:
            on_sent()
        try:
            answer = call.result(timeout=self.timeout + 5)
        except grpc.FutureTimeoutError:
            call.cancel()
            raise InferenceTimeout(f"{self.grpc_url}: no answer within {self.timeout:g} s") from None
        except grpc.RpcError as exc:
            self._raise_grpc(exc, model)
        t2 = time.perf_counter()
        from tritonclient.grpc import service_pb2

        try:
            # the small fields parsed by protobuf, the tensors' raw contents as views of the answer: protobuf
            # would copy them (52 MB for a 200-slice mask)
            head, raws = _split_raw_contents(answer)
            response = service_pb2.ModelInferResponse.FromString(head)
            out = _grpc_outputs(response, raws)
        except TensorError as exc:
            raise OipError(f"malformed response from model '{model}': {exc}") from None
        except Exception as exc:   # protobuf's DecodeError
            raise OipError(f"malformed response from model '{model}': {type(exc).__name__}") from None
        if timings is not None:
            timings.update(encode=t1 - t0, request=t2 - t1, decode=time.perf_counter() - t2)
        return InferResult(model_name=response.model_name or model, model_version=response.model_version or None,
                           id=response.id or None, outputs=out, parameters=_grpc_parameters(response.parameters))

    def _raise_grpc(self, error, model: str) -> None:
        code = error.code() if callable(getattr(error, "code", None)) else None
        status = getattr(code, "name", "") or ""
        text = str((error.details() if callable(getattr(error, "details", None)) else None) or error)[:300]
        if status == "RESOURCE_EXHAUSTED":
            raise ServiceBusy(f"{self.grpc_url}: {status}: {text}")
        if status in ("UNAVAILABLE", "INTERNAL", "UNKNOWN", "CANCELLED"):
            raise ServiceUnavailable(f"{self.grpc_url}: {status}: {text}")
        if status == "DEADLINE_EXCEEDED":
            raise InferenceTimeout(f"{self.grpc_url}: no answer within {self.timeout:g} s")
        if status == "NOT_FOUND":
            raise ModelNotReady(f"model '{model}' is unknown to {self.grpc_url}: {text}")
        raise InferenceRejected(f"model '{model}' rejected the request ({status or 'gRPC'}): {text}", 400)

    # -- HTTP ---------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kw)
        except httpx.TimeoutException:
            raise InferenceTimeout(f"{method} {self.base_url}{path}: no answer within {self.timeout:g} s") from None
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 500 and response.status_code != 503:
            raise ServiceUnavailable(f"{method} {self.base_url}{path}: HTTP {response.status_code}: "
                                     f"{_error_text(response)}")
        return response

    def _status(self, method: str, path: str) -> int:
        return self._request(method, path).status_code

    def _json(self, method: str, path: str) -> dict:
        response = self._request(method, path)
        if response.status_code != 200:
            raise InferenceRejected(f"HTTP {response.status_code}: {_error_text(response)}", response.status_code)
        return json_answer(response, f"{method} {self.base_url}{path}", OipError)

    def _raise(self, response: httpx.Response, model: str) -> None:
        text = _error_text(response)
        retry_after = response.headers.get("Retry-After", "")
        if response.status_code in (429, 503) and retry_after.strip().isdigit():
            raise ServiceBusy(f"model '{model}' is busy: {text}", float(retry_after))
        if response.status_code == 503 or "not ready" in text.lower():
            raise ModelNotReady(f"model '{model}' is not ready: {text}")
        if response.status_code == 404:
            raise ModelNotReady(f"model '{model}' is unknown to {self.base_url}: {text}")
        raise InferenceRejected(f"model '{model}' rejected the request (HTTP {response.status_code}): {text}",
                                response.status_code)


def uses_binary_tensors(server_metadata: Mapping[str, Any]) -> bool:
    """True for a server whose metadata (GET /v2) lists the binary tensor data extension, or names
    KServe's model server (it has the extension without listing it: "extensions" there are only the
    model repository's)."""
    extensions = server_metadata.get("extensions") or []
    if isinstance(extensions, list) and "binary_tensor_data" in extensions:
        return True
    return str(server_metadata.get("name", "")).strip().lower() == "kserve"


_RAW_INPUT_CONTENTS = b"\x3a"   # ModelInferRequest field 7 (raw_input_contents), length-delimited
# InferTensorContents field per datatype, for an answer whose tensors are not raw
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _grpc_request(model: str, version: str | None, request_id: str | None, inputs: Mapping[str, np.ndarray],
                  outputs: list[str], parameters: Mapping[str, Any] | None, packed: bool) -> bytes:
    """A serialized ModelInferRequest, its tensors' bytes copied once: the message without them, then each
    as a raw_input_contents field appended (protobuf's wire format: fields may follow in any order), from
    a view of the array (tritonclient copies a 100 MB volume three times: tobytes, the message, its
    serialization)."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model, model_version=version or "", id=request_id or "")
    raws: list[list[bytes | memoryview]] = []
    for name, array in inputs.items():
        array = np.asarray(array)
        datatype = tensors.datatype_of(array)
        tensor = request.inputs.add(name=name)
        view = tensors.wire_view(array)
        if packed and datatype != "BYTES":   # one BYTES element: 4 bytes of length, then the raw bytes
            tensor.datatype, tensor.shape[:] = "BYTES", [1]
            for key, value in tensors.packed_parameters(array).items():
                tensor.parameters[key].string_param = value
            raws.append([len(view).to_bytes(4, "little"), view])
        else:
            tensor.datatype, tensor.shape[:] = datatype, list(array.shape)
            raws.append([view])
    for name in outputs:
        request.outputs.add(name=name)
    for key, value in (parameters or {}).items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, int):
            request.parameters[key].int64_param = value
        elif isinstance(value, float):
            request.parameters[key].double_param = value
        else:
            request.parameters[key].string_param = str(value)
    parts: list[bytes | memoryview] = [request.SerializeToString()]
    for pieces in raws:
        parts += [_RAW_INPUT_CONTENTS, _varint(sum(len(p) for p in pieces)), *pieces]
    return b"".join(parts)


def _grpc_parameters(parameters) -> dict[str, Any]:
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in parameters.items()
            if v.WhichOneof("parameter_choice")}


_RAW_OUTPUT_CONTENTS = 6   # ModelInferResponse field 6 (raw_output_contents), repeated bytes


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ValueError("truncated varint")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _split_raw_contents(answer: bytes) -> tuple[bytes | memoryview, list[memoryview] | None]:
    """A serialized ModelInferResponse as (the message without its raw_output_contents, those contents
    as views of `answer`, in order), walking its top-level fields by protobuf's wire format; (answer,
    None) where the walk does not get through it (protobuf then parses it whole, or says what is
    wrong)."""
    view = memoryview(answer).cast("B")
    head: list[memoryview] = []
    raws: list[memoryview] = []
    pos, end = 0, len(view)
    try:
        while pos < end:
            start = pos
            key, pos = _read_varint(view, pos)
            wire = key & 7
            if wire == 0:
                _, pos = _read_varint(view, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = _read_varint(view, pos)
                if key >> 3 == _RAW_OUTPUT_CONTENTS and pos + length <= end:
                    raws.append(view[pos:pos + length])
                    pos += length
                    continue
                pos += length
            else:   # groups: none in this message
                return answer, None
            if pos > end:
                return answer, None
            head.append(view[start:pos])
    except ValueError:
        return answer, None
    return b"".join(head), raws


def _grpc_outputs(response, raw_outputs: list | None = None) -> dict[str, np.ndarray]:
    """The answer's tensors, from its raw contents (views, no copy; `raw_outputs` where they were split off
    the message, `_split_raw_contents`) or its typed contents; a packed one (`tensors.packed`) as the
    numeric tensor it carries."""
    out = {}
    if raw_outputs is None:
        raw_outputs = response.raw_output_contents
    for index, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if index < len(raw_outputs):
            raw = raw_outputs[index]
            params = _grpc_parameters(tensor.parameters)
            if tensors.is_packed(tensor.datatype, params):
                view = memoryview(raw)
                if len(view) < 4 or int.from_bytes(view[:4], "little") != len(view) - 4:
                    raise TensorError(f"tensor '{tensor.name}': packed, but not one BYTES element")
                out[tensor.name] = tensors.unpacked(tensor.name, view[4:], params)
            else:
                out[tensor.name] = tensors.from_wire(tensor.name, tensor.datatype, shape, raw)
        elif tensor.datatype in _CONTENTS:
            values = list(getattr(tensor.contents, _CONTENTS[tensor.datatype]))
            if tensor.datatype == "BYTES":
                out[tensor.name] = np.array(values, dtype=object).reshape(shape)
            else:
                out[tensor.name] = tensors.from_json(tensor.name, tensor.datatype, shape, values)
        else:
            raise TensorError(f"tensor '{tensor.name}': unknown datatype {tensor.datatype!r}")
    return out


def _body(parts: list, on_sent: Callable[[], None] | None) -> Iterator[memoryview]:
    yield from tensors.chunks(parts)
    if on_sent is not None:  # the client asks for more only after the last slice went out
        on_sent()


def _model_path(model: str, version: str | None) -> str:
    path = f"/v2/models/{model}"
    return f"{path}/versions/{version}" if version else path


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
        if isinstance(data, dict) and "error" in data:
            return str(data["error"])
    except ValueError:
        pass
    return response.text[:300] or response.reason_phrase
