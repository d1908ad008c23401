"""The OIP v2 client against the reference AI service: protocol, errors, and segmentation quality."""

from __future__ import annotations

import socket
import time
import warnings

import numpy as np
import pytest

from conftest import free_port
from omi_dsf.inference import lungseg
from omi_dsf.testkit import phantom
from omi_dsf.testkit.ai_service import AiServiceProcess
from omi_dsf.inference.client import (InferenceRejected, InferenceTimeout, ModelNotReady, OipClient,
                                      ServiceUnavailable, TensorMismatch)
from omi_dsf.inference.service import LungSegModel, create_app

SPACING = np.array([2.5, 2.8, 2.8], np.float32)  # 128 matrix over a 358 mm field


@pytest.fixture
def model():
    return LungSegModel(max_slices=40)


@pytest.fixture
def ai(model):
    with warnings.catch_warnings():  # starlette warns at import that it prefers another httpx package
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    with TestClient(create_app([model]), base_url="http://ai") as http:
        yield OipClient("http://ai", http=http)


@pytest.fixture(scope="module")
def study():
    return phantom.phantom_hu(12, 1, 128, 128), phantom.known_lung_mask(12, 1, 128, 128)


def test_health_metadata_and_ready(ai, model):
    assert ai.server_live() and ai.server_ready()
    assert "binary_tensor_data" in ai.server_metadata()["extensions"]
    meta = ai.model_metadata("lung-seg")
    assert meta["versions"] == [lungseg.VERSION]
    assert {t["name"]: t["datatype"] for t in meta["inputs"]} == {"HU": "INT16", "SPACING_MM": "FP32"}
    p = meta["parameters"]
    assert (p["modality"], p["body_part"], p["max_slices"]) == ("CT", "CHEST", 40)
    assert ai.model_ready("lung-seg") and ai.model_ready("lung-seg", version=lungseg.VERSION)
    assert not ai.model_ready("no-such-model") and not ai.model_ready("lung-seg", version="9")
    model.ready = False
    assert not ai.model_ready("lung-seg") and not ai.server_ready()


@pytest.mark.parametrize("binary", [True, False])
def test_segmentation_matches_phantom_lungs(ai, study, binary):
    hu, truth = study
    result = ai.infer("lung-seg", {"HU": hu, "SPACING_MM": SPACING}, binary=binary, request_id="r-7")
    labels = result.outputs["LUNG_LABELS"]
    assert result.id == "r-7" and result.model_version == lungseg.VERSION
    assert result.parameters["model_time_ms"] > 0  # the service's own compute time, for the step's timings
    assert labels.dtype == np.uint8 and labels.shape == hu.shape
    d = lungseg.dice(labels > 0, truth)
    print(f"Dice ({'binary' if binary else 'JSON'}): {d:.4f}")
    assert d > 0.9
    # the lung in the image's left half (low columns) is the patient's right lung
    half = np.zeros_like(truth)
    half[:, :, :64] = True
    assert lungseg.dice(labels == lungseg.RIGHT, truth & half) > 0.9
    right, left = result.outputs["LUNG_VOLUME_ML"]
    expected = truth.sum() * float(np.prod(SPACING)) / 1000
    assert right + left == pytest.approx(expected, rel=0.05)


def test_segmentation_survives_heavy_noise():
    # 120 HU noise puts tissue voxels below the air threshold now and then; Dice must hold
    hu = phantom.phantom_hu(12, 4, 128, 128).astype(np.float32)
    hu += np.random.default_rng(9).normal(0, 120, hu.shape)
    labels = LungSegModel().infer({"HU": np.clip(hu, -1024, 3071).astype(np.int16), "SPACING_MM": SPACING})
    d = lungseg.dice(labels["LUNG_LABELS"] > 0, phantom.known_lung_mask(12, 4, 128, 128))
    print(f"Dice (noise 120 HU): {d:.4f}")
    assert d > 0.9


def test_selected_outputs_only(ai, study):
    hu, _ = study
    result = ai.infer("lung-seg", {"HU": hu, "SPACING_MM": SPACING}, outputs=["LUNG_VOLUME_ML"], binary=False)
    assert set(result.outputs) == {"LUNG_VOLUME_ML"}


def test_client_rejects_mismatched_inputs_before_sending(ai, study):
    hu, _ = study
    with pytest.raises(TensorMismatch, match="'HU' is FP32, model 'lung-seg' expects INT16"):
        ai.infer("lung-seg", {"HU": hu.astype(np.float32), "SPACING_MM": SPACING})
    with pytest.raises(TensorMismatch, match=r"'HU' has shape \[128, 128\]"):
        ai.infer("lung-seg", {"HU": hu[0], "SPACING_MM": SPACING})
    with pytest.raises(TensorMismatch, match="needs input 'SPACING_MM'"):
        ai.infer("lung-seg", {"HU": hu})
    with pytest.raises(TensorMismatch, match="has no input 'CT'"):
        ai.infer("lung-seg", {"CT": hu, "HU": hu, "SPACING_MM": SPACING})


def test_service_rejects_what_a_careless_client_sends(ai, study):
    hu, _ = study
    with pytest.raises(InferenceRejected, match="expects INT16") as info:
        ai.infer("lung-seg", {"HU": hu.astype(np.int32), "SPACING_MM": SPACING}, check=False)
    assert info.value.status == 400
    with pytest.raises(InferenceRejected, match="2 slices; model 'lung-seg' accepts 3 to 40"):
        ai.infer("lung-seg", {"HU": hu[:2], "SPACING_MM": SPACING}, check=False)
    with pytest.raises(InferenceRejected, match="41 slices"):
        ai.infer("lung-seg", {"HU": np.zeros((41, 16, 16), np.int16), "SPACING_MM": SPACING}, check=False)
    with pytest.raises(InferenceRejected, match="three positive numbers"):
        ai.infer("lung-seg", {"HU": hu, "SPACING_MM": np.array([0, 1, 1], np.float32)}, check=False)
    with pytest.raises(InferenceRejected, match="has no output 'MASK'"):
        ai.infer("lung-seg", {"HU": hu, "SPACING_MM": SPACING}, outputs=["MASK"], check=False)


def test_model_not_ready_and_unknown_model(ai, model, study):
    hu, _ = study
    model.ready = False
    with pytest.raises(ModelNotReady, match="not ready"):
        ai.infer("lung-seg", {"HU": hu, "SPACING_MM": SPACING})
    with pytest.raises(ModelNotReady, match="not ready"):
        ai.infer("lung-seg", {"HU": hu, "SPACING_MM": SPACING}, check=False)
    with pytest.raises(ModelNotReady, match="unknown model 'other'"):
        ai.infer("other", {"HU": hu}, check=False)
    with pytest.raises(ModelNotReady, match="not available"):
        ai.model_metadata("other")
    with pytest.raises(ModelNotReady, match="not ready within"):
        ai.wait_until_ready("lung-seg", timeout=0.3, interval=0.1)


def test_timeout_and_unreachable_server():
    # a socket that accepts connections (backlog) but never answers
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        with OipClient(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3) as ai:
            start = time.monotonic()
            with pytest.raises(InferenceTimeout, match="no answer within 0.3 s"):
                ai.server_live()
            assert time.monotonic() - start < 5
    with OipClient(f"http://127.0.0.1:{free_port()}", timeout=2) as ai:
        with pytest.raises(ServiceUnavailable, match="ConnectError"):
            ai.model_metadata("lung-seg")


@pytest.mark.integration
def test_ai_service_command_serves_the_protocol():
    with AiServiceProcess(args=("--max-slices", "30"), timeout=40) as service, \
            OipClient(service.url, timeout=30) as ai:
        assert ai.model_metadata("lung-seg")["parameters"]["max_slices"] == 30
        hu, truth = phantom.phantom_hu(10, 2, 256, 256), phantom.known_lung_mask(10, 2, 256, 256)
        result = ai.infer("lung-seg", {"HU": hu, "SPACING_MM": np.array([2.5, 1.4, 1.4], np.float32)})
        d = lungseg.dice(result.outputs["LUNG_LABELS"] > 0, truth)
        print(f"Dice over HTTP (256x256x10): {d:.4f}")
        assert d > 0.9


def test_on_sent_is_called_once_after_the_body_went_out(ai, study):
    hu, _ = study
    calls, timings = [], {}
    ai.infer("lung-seg", {"HU": hu, "SPACING_MM": SPACING}, on_sent=lambda: calls.append(time.perf_counter()),
             timings=timings)
    assert len(calls) == 1
    assert set(timings) == {"encode", "request", "decode"} and all(v >= 0 for v in timings.values())


def test_clients_share_one_verifying_tls_context():
    """Each step makes a new client; the CA bundle is loaded once per process, still verifying."""
    import ssl
    with OipClient("https://127.0.0.1:1") as one, OipClient("http://127.0.0.1:2") as two:
        contexts = [c._http._transport._pool._ssl_context for c in (one, two)]
    assert contexts[0] is contexts[1]
    assert contexts[0].verify_mode == ssl.CERT_REQUIRED and contexts[0].check_hostname
