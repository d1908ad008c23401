"""The infer step and the registry's health checks against the model servers AI providers run:
the lung model on KServe's model server and on MLServer (each in its own environment, started on
127.0.0.1 by `ai-service --server`), side by side with the reference service. Orthanc is the
DICOMweb gateway (as in test_inference_step.py)."""

from __future__ import annotations

import shutil
from io import BytesIO
from pathlib import Path

import highdicom as hd
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
import numpy as np
import pydicom
import pytest
from starlette.testclient import TestClient
from tritonclient.utils import InferenceServerException

from helpers_provider import manifest_of
from omi_dsf import malloc
from omi_dsf.dicomweb_client import DicomwebClient
from omi_dsf.inference import lungseg, tensors
from omi_dsf.inference.client import InferenceRejected, OipClient
from omi_dsf.peer import Peer
from omi_dsf.registry.app import create_app
from omi_dsf.registry.config import parse_config
from omi_dsf.registry.entries import service_bundle
from omi_dsf.steps import infer as step
from omi_dsf.steps.api import StepContext, StepError
from omi_dsf.testkit import phantom
from omi_dsf.testkit.ai_service import write_device

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("Orthanc") and not Path("/usr/sbin/Orthanc").exists(),
                       reason="Orthanc not installed (tools/apt-packages.txt: orthanc, orthanc-dicomweb)"),
]

SERVERS = {"reference": "ai_service", "kserve": "kserve_service", "mlserver": "mlserver_service"}
SPACING = np.array([2.5, 0.7, 0.7], np.float32)


@pytest.fixture(params=list(SERVERS))
def server(request):
    return request.param, request.getfixturevalue(SERVERS[request.param])


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from omi_dsf.testkit.legacy_pacs import Orthanc

    root = tmp_path_factory.mktemp("servers")
    studies = {}
    for name, seed, slices in (("good", 21, 8), ("long", 22, 12)):
        paths = phantom.write_ct_study(root / name, slices=slices, seed=seed, rows=96, cols=96)
        studies[name] = (str(pydicom.dcmread(paths[0]).StudyInstanceUID), paths)
    manifests = []
    for name, (_, paths) in studies.items():   # each stored last, as the send step does
        manifests.append(root / f"{name}-manifest.dcm")
        manifests[-1].write_bytes(manifest_of(paths))
    with Orthanc(root / "orthanc") as orthanc:
        orthanc.load([p for _, paths in studies.values() for p in paths])
        orthanc.load(manifests)
        yield orthanc, {k: uid for k, (uid, _) in studies.items()}


def test_protocol_is_detected_and_both_encodings_agree(server):
    name, service = server
    hu = phantom.phantom_hu(6, 3, 64, 64)
    with OipClient(service.url, timeout=60) as ai:
        assert ai.binary_tensors() is (name != "mlserver")
        meta = ai.model_metadata(lungseg.NAME)
        assert ("parameters" in meta) is (name != "kserve")   # KServe's model metadata has no parameters
        answer = ai.infer(lungseg.NAME, {"HU": hu, "SPACING_MM": SPACING}, request_id="r-1")
        assert answer.id == "r-1"
        assert answer.outputs["LUNG_LABELS"].shape == hu.shape and answer.outputs["LUNG_LABELS"].dtype == np.uint8
        expected = lungseg.LungSegModel().infer({"HU": hu, "SPACING_MM": SPACING})
        assert np.array_equal(answer.outputs["LUNG_LABELS"], expected["LUNG_LABELS"])
        assert np.allclose(answer.outputs["LUNG_VOLUME_ML"], expected["LUNG_VOLUME_ML"])
        if name != "mlserver":   # JSON too, where binary is the default
            as_json = ai.infer(lungseg.NAME, {"HU": hu, "SPACING_MM": SPACING}, binary=False)
            assert np.array_equal(as_json.outputs["LUNG_LABELS"], expected["LUNG_LABELS"])
        # the model's own refusal reaches the caller as a 4xx with its message, on every server
        with pytest.raises(InferenceRejected, match="2 slices"):
            ai.infer(lungseg.NAME, {"HU": hu[:2], "SPACING_MM": SPACING})
    if service.grpc_url:   # KServe's and MLServer's gRPC ports take the tensors as raw bytes
        with OipClient(service.url, timeout=60, grpc_url=service.grpc_url) as ai:
            # MLServer's model takes them packed too (one BYTES element each): its metadata says so
            assert (ai.model_metadata(lungseg.NAME).get("parameters") or {}).get("packed_tensors") is (
                True if name == "mlserver" else None)
            for packed in (None, False):   # as the metadata says, and as declared
                answer = ai.infer(lungseg.NAME, {"HU": hu, "SPACING_MM": SPACING}, request_id="r-2", packed=packed)
                assert answer.id == "r-2" and answer.model_version == lungseg.VERSION
                assert answer.outputs["LUNG_LABELS"].dtype == np.uint8
                assert np.array_equal(answer.outputs["LUNG_LABELS"], expected["LUNG_LABELS"])
                assert np.allclose(answer.outputs["LUNG_VOLUME_ML"], expected["LUNG_VOLUME_ML"])
            with pytest.raises(InferenceRejected, match="2 slices"):
                ai.infer(lungseg.NAME, {"HU": hu[:2], "SPACING_MM": SPACING})
    if name == "mlserver":   # a packed tensor that does not fit its stated shape: 400 with the problem named
        import tritonclient.grpc as triton_grpc

        raw, params = tensors.packed(hu)
        entry = triton_grpc.InferInput("HU", [1], "BYTES").set_data_from_numpy(np.array([raw[:-2]], dtype=object))
        for key, value in params.items():
            entry._get_tensor().parameters[key].string_param = value
        spacing = triton_grpc.InferInput("SPACING_MM", [3], "FP32").set_data_from_numpy(SPACING)
        client = triton_grpc.InferenceServerClient(service.grpc_url.removeprefix("grpc://"))
        with pytest.raises(InferenceServerException, match="binary data, but shape") as caught:
            client.infer(lungseg.NAME, [entry, spacing])
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        client.close()


def _ctx(gateway_url: str, entry: dict) -> StepContext:
    return StepContext(topic="infer", business_key="bk-servers",
                       site={"gateway_url": gateway_url, "ai_timeout_s": 120, "ai_services": {"lung-seg": entry}})


def test_infer_step_stores_seg_and_sr_on_each_server(server, gateway, tmp_path):
    name, service = server
    orthanc, uids = gateway
    entry = {"url": service.url, "model": lungseg.NAME, "grpc_url": service.grpc_url}
    if name == "kserve":
        entry["device"] = str(write_device(tmp_path / "device.json", service.url))
    answers, timings = step.infer_timed({"pseudonymized-study-instance-uid": uids["good"],
                                         "ai-service-identifier": "lung-seg"}, _ctx(orthanc.dicomweb_url, entry))
    assert answers["status"] == "completed"
    assert ("model" in timings.seconds) is (name == "reference")   # only the reference service reports it
    seg_series, _ = answers["result-series-uids"].split(",")
    with DicomwebClient(Peer(orthanc.dicomweb_url)) as web:
        (seg_ds,) = [pydicom.dcmread(BytesIO(b)) for b in web.retrieve_series(uids["good"], seg_series)]
        source = sorted((pydicom.dcmread(BytesIO(b)) for b in web.retrieve_series(
            uids["good"], str(seg_ds.ReferencedSeriesSequence[0].SeriesInstanceUID))),
            key=lambda ds: int(ds.InstanceNumber))
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    mask = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in source], combine_segments=True)
    assert lungseg.dice(mask > 0, phantom.known_lung_mask(8, 21, 96, 96)) > 0.9


def test_slice_limit_comes_from_the_device_on_kserve(kserve_service, gateway, tmp_path):
    orthanc, uids = gateway
    inputs = {"pseudonymized-study-instance-uid": uids["long"], "ai-service-identifier": "lung-seg"}
    entry = {"url": kserve_service.url, "model": lungseg.NAME}
    with pytest.raises(StepError, match="give the service's `device`"):
        step.infer(inputs, _ctx(orthanc.dicomweb_url, entry))
    entry["device"] = str(write_device(tmp_path / "device.json", kserve_service.url, max_slices=10))
    with pytest.raises(StepError, match="12 slices, more than the model's limit of 10"):
        step.infer(inputs, _ctx(orthanc.dicomweb_url, entry))


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


@pytest.mark.parametrize("name", ["kserve", "mlserver"])
def test_model_servers_run_with_the_malloc_settings(name, request):
    """KServe's and MLServer's server processes get `malloc.ENVIRONMENT` (no page faults on every copy of
    a volume, omi_dsf/malloc.py)."""
    service = request.getfixturevalue(SERVERS[name])
    needle = {"kserve": b"omi_dsf.inference.kserve_model", "mlserver": b"mlserver.cli.main"}[name]
    servers = [pid for pid in _descendants(service.proc.pid) if needle in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert servers, f"no {name} server process under the ai-service command"
    for pid in servers:
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        assert {k: environ.get(k) for k in malloc.ENVIRONMENT} == malloc.ENVIRONMENT


def test_registry_health_checks_each_server(server, tmp_path, fhir_store):
    name, service = server
    key = tmp_path / "idp.pem"   # the registry needs a way in for writes; this test registers directly
    key.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    cfg = parse_config({"fhir_store": {"url": fhir_store.state().base_url}, "health": {"interval": 0},
                        "auth": {"jwt": [{"issuer": "https://idp.test", "key_file": str(key)}]}}, tmp_path)
    app = create_app(cfg, run_checks=False)
    with TestClient(app, base_url="http://registry.test"):
        app.state.store.clear()   # no registry entries of earlier tests in the session's store
        for sid, model in (("known", lungseg.NAME), ("unknown", "no-such-model")):
            app.state.registry.transaction(service_bundle(
                "ai.example.org", sid, name=sid, model=model, model_version="1", oip_url=service.url,
                modality=["CT"], body_site=[("http://snomed.info/sct", "39607008")]), "ai.example.org")
        states = app.state.checker.check_all()
    assert states["known"].status == "up", states["known"].detail
    assert states["unknown"].status == "degraded" and "model not ready" in states["unknown"].detail


def test_kserve_serves_tls_the_step_verifies(tmp_path):
    """KServe's model server with the reference service's configuration file (tls.certfile/keyfile):
    HTTPS on its port; the OIP client verifies it against the site's CA as for every peer, and refuses
    a server its CA did not sign."""
    import ipaddress

    import yaml
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from helpers_pki import issue, make_ca, write_ca, write_pem
    from omi_dsf.inference.client import ServiceUnavailable
    from omi_dsf.testkit.ai_service import AiServiceProcess
    from omi_dsf.tls import client_context

    ca_key, ca_cert = make_ca("kserve test CA")
    ca = write_ca(tmp_path / "ca.pem", ca_cert)
    other = write_ca(tmp_path / "other.pem", make_ca("another CA")[1])
    cert, key = write_pem(tmp_path, "server", *issue(ca_key, ca_cert, "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                                                     [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    (tmp_path / "ai.yaml").write_text(yaml.safe_dump({"tls": {"certfile": cert, "keyfile": key},
                                                      "auth": {"anonymous": True}, "max_slices": 10}))
    with AiServiceProcess(log=tmp_path / "kserve.log", args=("--config", str(tmp_path / "ai.yaml")),
                          tls=client_context(ca), timeout=120, server="kserve") as service:
        assert service.url.startswith("https://") and service.grpc_url is None
        hu = phantom.phantom_hu(6, 3, 64, 64)
        with OipClient(Peer(url=service.url, ca_file=ca, timeout=60)) as ai:   # as the infer step makes it
            assert ai.server_ready() and ai.binary_tensors()
            answer = ai.infer(lungseg.NAME, {"HU": hu, "SPACING_MM": SPACING})
            expected = lungseg.LungSegModel().infer({"HU": hu, "SPACING_MM": SPACING})
            assert np.array_equal(answer.outputs["LUNG_LABELS"], expected["LUNG_LABELS"])
        with OipClient(Peer(url=service.url, ca_file=other, timeout=10)) as ai, pytest.raises(ServiceUnavailable):
            ai.server_ready()
