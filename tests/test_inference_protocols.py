"""What the infer step learns from a server before sending a study, without a server: whether it
takes binary tensors, where the model's modality, slice limits and labels come from (model metadata
parameters or the registry's Device), and the `ai-service --server` command line."""

from __future__ import annotations

import json

import pytest

from helpers_cli import run_cli
from omi_dsf.config import ConfigError
from omi_dsf.errors import UserError
from omi_dsf.inference import lungseg, servers
from omi_dsf.inference.client import uses_binary_tensors
from omi_dsf.registry import device
from omi_dsf.steps import infer as step
from omi_dsf.steps.api import StepError
from omi_dsf.steps.settings import step_settings
from omi_dsf.testkit.ai_service import write_device

# GET /v2 as each server answers it (reference: service.py; the others as measured, tests/test_inference_servers.py)
REFERENCE = {"name": "omi-dsf-reference-ai-service", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
TRITON = {"name": "triton", "version": "2.50.0", "extensions": ["classification", "model_repository",
                                                                "binary_tensor_data", "statistics"]}
KSERVE = {"name": "kserve", "version": "0.21.0", "extensions": ["model_repository_extension"]}
MLSERVER = {"name": "mlserver", "version": "1.7.1", "extensions": []}


@pytest.mark.parametrize("meta, binary", [(REFERENCE, True), (TRITON, True), (KSERVE, True), (MLSERVER, False),
                                          ({}, False), ({"name": "x", "extensions": "binary_tensor_data"}, False)])
def test_binary_tensors_where_the_server_has_them(meta, binary):
    assert uses_binary_tensors(meta) is binary


def test_metadata_parameters_come_first():
    meta = lungseg.LungSegModel(max_slices=40).metadata()
    params = step._model_parameters(meta, "lung-seg", None)
    assert params["modality"] == "CT" and params["max_slices"] == 40


def test_without_parameters_the_device_is_needed(tmp_path):
    meta = {"name": "lung-seg", "inputs": [], "outputs": []}   # what KServe answers: no parameters
    with pytest.raises(StepError, match="device"):
        step._model_parameters(meta, "lung-seg", None)
    path = write_device(tmp_path / "device.json", "http://127.0.0.1:9", max_slices=77)
    params = step._model_parameters(meta, "lung-seg", path)
    assert params == {"modality": "CT", "min_slices": 3, "max_slices": 77,
                      "labels": {"1": "right lung", "2": "left lung"},
                      "algorithm_name": "lung-seg", "algorithm_version": lungseg.VERSION}
    step._check_labels(params, "lung-seg")


def test_device_without_modality_or_with_a_bad_limit_is_refused(tmp_path):
    path = write_device(tmp_path / "device.json", "http://127.0.0.1:9")
    dev = json.loads(path.read_text())
    no_modality = {**dev, "property": [p for p in dev["property"] if p["type"]["coding"][0]["code"] != "modality"]}
    with pytest.raises(device.DeviceError, match="no modality"):
        device.model_parameters(no_modality)
    for p in dev["property"]:
        if p["type"]["coding"][0]["code"] == "max-slices":
            p["valueQuantity"][0]["value"] = "many"
    with pytest.raises(device.DeviceError, match="max-slices must be a whole number"):
        device.model_parameters(dev)
    with pytest.raises(device.DeviceError, match="expected a Device"):
        device.model_parameters({"resourceType": "Patient"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(StepError, match="bad.json"):
        step._model_parameters({"name": "m"}, "m", bad)


def test_labels_that_mean_something_else_are_refused():
    with pytest.raises(StepError, match="labels 1 as 'left lung'"):
        step._check_labels({"labels": {"1": "left lung", "2": "right lung"}}, "m")
    step._check_labels({"modality": "CT"}, "m")   # no labels stated: the protocol's outputs decide


def test_device_setting_is_a_url_or_an_existing_file(tmp_path):
    def entry(**keys):
        return step_settings({"ai_services": {"lung-seg": {"url": "http://127.0.0.1:9", **keys}}}).ai_services["lung-seg"]
    peer = step._device_setting(entry(device="https://registry.example/fhir/Device/x"), "lung-seg", 10)
    assert peer.url == "https://registry.example/fhir/Device/x"
    with pytest.raises(ConfigError, match="ai_services.lung-seg.device: .* is neither a URL nor a file"):
        entry(device=str(tmp_path / "missing.json"))
    path = write_device(tmp_path / "device.json", "http://127.0.0.1:9")
    assert step._device_setting(entry(device=str(path)), "lung-seg", 10) == path
    assert step._device_setting(entry(), "lung-seg", 10) is None


def test_mlserver_model_settings_carry_the_model():
    settings = servers.mlserver_model_settings(123)
    assert settings["implementation"] == "omi_dsf.inference.mlserver_runtime.LungSegRuntime"
    assert settings["parameters"]["extra"] == {"max_slices": 123}
    assert [t["name"] for t in settings["inputs"]] == ["HU", "SPACING_MM"]


def test_a_missing_server_environment_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("OMI_KSERVE_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(UserError, match="OMI_KSERVE_PYTHON"):
        servers.python_for("kserve")


@pytest.mark.parametrize("args, message", [
    (["--server", "kserve"], "give --anonymous"),
    (["--server", "mlserver", "--config", "x.yaml"], "give --anonymous"),
    (["--server", "kserve", "--anonymous", "--host", "10.1.2.3"], "listens on all interfaces"),
    (["--server", "mlserver", "--anonymous", "--max-slices", "2"], "at least 3"),
    (["--anonymous", "--grpc-port", "9"], "--grpc-port is for --server kserve or mlserver"),
    (["--anonymous", "--metrics-port", "9"], "--metrics-port is for --server mlserver"),
    (["--server", "kserve", "--anonymous", "--metrics-port", "9"], "kserve serves /metrics on --port"),
])
def test_other_servers_command_line_errors_are_one_line(args, message):
    r = run_cli("ai-service", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("settings, extra, message", [
    ({"auth": {"jwt": [{"issuer": "https://idp.test", "key_file": "idp.pem"}]}}, [], "auth.jwt: KServe's model server checks no tokens"),
    ({"tls": {"client_ca": "ca.pem"}}, [], "tls.client_ca: KServe's model server checks no client certificates"),
    ({"tls": {"keyfile_password_file": "ca.pem"}}, [], "tls.keyfile_password_file"),
    ({"limits": {"max_body_mb": 10}}, [], "limits: the reference service's"),
    ({"listen": {"host": "127.0.0.1"}}, [], "listen.host: KServe's model server listens on all interfaces"),
    ({}, ["--grpc-port", "9"], "KServe's gRPC port serves no TLS"),
    ({"listen": {"port": 8080}}, [], "moves a TLS server from port 8080 to 8443"),
    ({}, ["--anonymous"], "--anonymous is for running without --config"),
])
def test_kserve_takes_of_the_configuration_what_it_can_serve(tmp_path, settings, extra, message):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    for name in ("ca.pem", "ai.pem", "ai.key"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "idp.pem").write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    data = {"auth": {"anonymous": True}, "tls": {"certfile": "ai.pem", "keyfile": "ai.key"}}
    for key, value in settings.items():
        data[key] = {**data.get(key, {}), **value} if key in ("tls", "auth") else value
    if "jwt" in data["auth"]:
        data["auth"].pop("anonymous")
    (tmp_path / "ai.yaml").write_text(json.dumps(data))
    r = run_cli("ai-service", "--server", "kserve", "--config", str(tmp_path / "ai.yaml"), *extra)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("packed", [False, True])
def test_grpc_request_carries_each_tensor_once_as_raw_contents(packed):
    """The client's ModelInferRequest is built with the tensors appended as raw_input_contents fields; a
    protobuf parser reads it as tritonclient's would be read, packed tensors as one BYTES element each."""
    import numpy as np
    from tritonclient.grpc import service_pb2

    from omi_dsf.inference import tensors
    from omi_dsf.inference.client import _grpc_request

    hu = np.arange(-300, 300, dtype=np.int16).reshape(6, 10, 10)[:, ::2]   # not contiguous: made so once
    spacing = np.array([2.5, 0.7, 0.7], np.float32)
    body = _grpc_request("lung-seg", "1", "r-1", {"HU": hu, "SPACING_MM": spacing}, ["LUNG_LABELS"],
                         {"packed_outputs": True, "note": "x", "n": 3}, packed)
    request = service_pb2.ModelInferRequest.FromString(body)
    assert (request.model_name, request.model_version, request.id) == ("lung-seg", "1", "r-1")
    assert [o.name for o in request.outputs] == ["LUNG_LABELS"]
    assert request.parameters["packed_outputs"].bool_param and request.parameters["n"].int64_param == 3
    got = {}
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        params = {k: v.string_param for k, v in tensor.parameters.items()}
        if packed:
            assert (tensor.datatype, list(tensor.shape)) == ("BYTES", [1])
            assert int.from_bytes(raw[:4], "little") == len(raw) - 4
            got[tensor.name] = tensors.unpacked(tensor.name, raw[4:], params)
        else:
            got[tensor.name] = tensors.from_wire(tensor.name, tensor.datatype, list(tensor.shape), raw)
    assert np.array_equal(got["HU"], hu) and got["HU"].dtype == np.int16 and np.array_equal(got["SPACING_MM"], spacing)


@pytest.mark.parametrize("packed", [False, True])
def test_grpc_answer_is_read_without_copying_its_tensors(packed):
    """The client reads a ModelInferResponse with its raw_output_contents split off as views of the answer
    (protobuf would copy them): the same outputs and fields as protobuf's own parse, the mask's array a
    view of the answer's bytes; a cut-off answer is malformed, as protobuf says."""
    import numpy as np
    from tritonclient.grpc import service_pb2

    from omi_dsf.inference import tensors
    from omi_dsf.inference.client import _grpc_outputs, _split_raw_contents

    labels = np.random.default_rng(3).integers(0, 3, (4, 300, 70), dtype=np.uint8)   # > 16 KB: multi-byte lengths
    volumes = np.array([1500.5, 1400.25], np.float32)
    response = service_pb2.ModelInferResponse(model_name="lung-seg", model_version="2", id="r-9")
    response.parameters["model_time_ms"].double_param = 812.5
    response.parameters["note"].string_param = "x" * 300
    for name, array in (("LUNG_LABELS", labels), ("LUNG_VOLUME_ML", volumes)):
        tensor = response.outputs.add(name=name)
        if packed:
            tensor.datatype, tensor.shape[:] = "BYTES", [1]
            for key, value in tensors.packed_parameters(array).items():
                tensor.parameters[key].string_param = value
            response.raw_output_contents.append(len(array.tobytes()).to_bytes(4, "little") + array.tobytes())
        else:
            tensor.datatype, tensor.shape[:] = tensors.datatype_of(array), list(array.shape)
            response.raw_output_contents.append(array.tobytes())
    answer = response.SerializeToString()

    head, raws = _split_raw_contents(answer)
    assert len(head) < 1000 and len(raws) == 2
    parsed = service_pb2.ModelInferResponse.FromString(head)
    assert (parsed.model_name, parsed.model_version, parsed.id) == ("lung-seg", "2", "r-9")
    assert parsed.parameters["model_time_ms"].double_param == 812.5 and not parsed.raw_output_contents
    out = _grpc_outputs(parsed, raws)
    whole = _grpc_outputs(service_pb2.ModelInferResponse.FromString(answer))
    assert np.array_equal(out["LUNG_LABELS"], labels) and out["LUNG_LABELS"].dtype == np.uint8
    assert np.array_equal(out["LUNG_VOLUME_ML"], volumes)
    assert all(np.array_equal(out[k], whole[k]) for k in whole)
    assert np.shares_memory(out["LUNG_LABELS"], np.frombuffer(answer, np.uint8))   # a view, not a copy

    cut = answer[:-100]   # inside the last raw contents field: handed to protobuf whole, which refuses it
    head, raws = _split_raw_contents(cut)
    assert raws is None and head is cut
    with pytest.raises(Exception, match="(?i)error|truncat"):
        service_pb2.ModelInferResponse.FromString(head)


def test_grpc_port_that_does_not_answer_is_unavailable():
    import numpy as np

    from omi_dsf.inference.client import OipClient, ServiceUnavailable
    from omi_dsf.testkit.procs import free_port

    with OipClient("http://127.0.0.1:9", timeout=5, grpc_url=f"grpc://127.0.0.1:{free_port()}") as ai:
        with pytest.raises(ServiceUnavailable, match="UNAVAILABLE"):
            ai.infer("lung-seg", {"HU": np.zeros((3, 4, 4), np.int16)}, outputs=["LUNG_LABELS"], check=False,
                     packed=False)


def test_grpcs_uses_the_peers_ca_and_fails_as_unavailable_without_a_server(tmp_path):
    """grpcs:// reads the Peer's CA (and client certificate) for the channel; nothing listening is
    ServiceUnavailable, retried by the worker like any unreachable service."""
    import numpy as np

    from helpers_pki import make_ca, write_ca
    from omi_dsf.inference.client import OipClient, ServiceUnavailable
    from omi_dsf.peer import Peer
    from omi_dsf.testkit.procs import free_port

    ca = write_ca(tmp_path / "ca.pem", make_ca("grpc test CA")[1])
    with OipClient(Peer(url="https://127.0.0.1:9", ca_file=ca, timeout=5),
                   grpc_url=f"grpcs://127.0.0.1:{free_port()}") as ai:
        with pytest.raises(ServiceUnavailable, match="UNAVAILABLE"):
            ai.infer("lung-seg", {"HU": np.zeros((3, 4, 4), np.int16)}, outputs=["LUNG_LABELS"], check=False,
                     packed=False)
