"""The `infer` step against real servers: Orthanc as the DICOMweb gateway, the reference AI service.

Orthanc (Debian package, DICOMweb plugin) stands in for the project's gateway: the handler only
speaks standard QIDO/WADO/STOW, so any DICOMweb server will do.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import uvicorn

from conftest import free_port
from helpers_provider import manifest_of
from omi_dsf.dicomweb_client import DicomwebClient
from omi_dsf.inference import lungseg, results
from omi_dsf.inference.client import ServiceUnavailable
from omi_dsf.inference.service import LungSegModel, create_app
from omi_dsf.peer import Peer
from omi_dsf.steps import infer as step
from omi_dsf.steps.api import StepContext, StepError
from omi_dsf.testkit import phantom

# the tests against Orthanc (a real PACS with DICOMweb, as a process) are integration tests; the one
# against the project's gateway and the reference service, both in this process, is a unit test
_NEEDS_ORTHANC = pytest.mark.skipif(not shutil.which("Orthanc") and not Path("/usr/sbin/Orthanc").exists(),
                                    reason="Orthanc not installed (tools/apt-packages.txt: orthanc, orthanc-dicomweb)")


def orthanc(test):
    return pytest.mark.integration(_NEEDS_ORTHANC(test))

MAX_SLICES = 10


@pytest.fixture(scope="module")
def ai_url():
    server = uvicorn.Server(uvicorn.Config(create_app([LungSegModel(max_slices=MAX_SLICES)]),
                                           host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "AI service did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(10)


def _study(root: Path, name: str, seed: int, slices: int, size: int = 128, modality: str = "CT",
           drop: int | None = None) -> tuple[str, list[Path]]:
    paths = phantom.write_ct_study(root / name, slices=slices, seed=seed, rows=size, cols=size)
    if drop is not None:
        paths.pop(drop).unlink()
    if modality != "CT":
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.Modality = modality
            ds.save_as(p)
    return str(pydicom.dcmread(paths[0]).StudyInstanceUID), paths


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from omi_dsf.testkit.legacy_pacs import Orthanc

    root = tmp_path_factory.mktemp("infer")
    studies = {
        "good": _study(root, "good", 10, 8),
        "mr": _study(root, "mr", 11, 4, 32, modality="MR"),
        "gap": _study(root, "gap", 12, 6, 32, drop=3),
        "big": _study(root, "big", 13, MAX_SLICES + 2, 32),
    }
    manifests = []
    for name, (_, paths) in studies.items():   # each stored last, as the send step does
        manifests.append(root / f"{name}-manifest.dcm")
        manifests[-1].write_bytes(manifest_of(paths))
    with Orthanc(root / "orthanc") as orthanc:
        orthanc.load([p for _, paths in studies.values() for p in paths])
        orthanc.load(manifests)
        yield orthanc, {k: uid for k, (uid, _) in studies.items()}


ARRIVAL_TIMEOUT_S = 2.0


def _ctx(gateway_url: str, ai_url: str, **site) -> StepContext:
    return StepContext(topic="infer", business_key="bk-test",
                       site={"gateway_url": gateway_url, "ai_service_url": ai_url, "ai_timeout_s": 60,
                             "study_arrival_timeout_s": ARRIVAL_TIMEOUT_S, **site})


@orthanc
def test_infer_stores_seg_and_sr_and_answers_where(gateway, ai_url, caplog):
    orthanc, uids = gateway
    caplog.set_level(logging.INFO)
    before = orthanc.instance_count()
    out = step.infer({"pseudonymized-study-instance-uid": uids["good"], "ai-service-identifier": "lung-seg",
                         "study-location": f"{orthanc.dicomweb_url}/studies/{uids['good']}"},
                        _ctx(orthanc.dicomweb_url, ai_url))
    assert out["status"] == "completed"
    assert out["result-study-instance-uid"] == uids["good"]
    assert out["result-location"] == f"{orthanc.dicomweb_url}/studies/{uids['good']}"
    seg_series, sr_series = out["result-series-uids"].split(",")
    assert orthanc.instance_count() == before + 2

    with DicomwebClient(Peer(orthanc.dicomweb_url)) as web:
        def series(uid: str) -> list[pydicom.Dataset]:
            return [pydicom.dcmread(BytesIO(b)) for b in web.retrieve_series(uids["good"], uid)]
        (seg_ds,) = series(seg_series)
        (sr_ds,) = series(sr_series)
        seg = hd.seg.Segmentation.from_dataset(seg_ds)
        source = sorted(series(str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)),
                        key=lambda ds: int(ds.InstanceNumber))
    mask = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in source], combine_segments=True)
    truth = phantom.known_lung_mask(8, 10, 128, 128)
    d = lungseg.dice(mask > 0, truth)
    print(f"Dice through gateway + service: {d:.4f}")
    assert d > 0.9
    assert sr_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    # FHIR is the requester's to make, from the SR after re-identification; the step answers none
    assert "fhir-bundle" not in out
    bundle = results.fhir_bundle_from_report(sr_ds)
    assert {e["resource"]["resourceType"] for e in bundle["entry"]} >= {"DiagnosticReport", "Observation"}

    assert re.search(r"infer bk-test: timings .*wado [\d.]+ s.*model [\d.]+ s.*stow [\d.]+ s, total", caplog.text)
    # nothing identifying in the log: not the fake patient's name or ID, nor the UIDs
    for value in (str(source[0].PatientName), str(source[0].PatientID), uids["good"]):
        assert value not in caplog.text

    # idempotent: a second run (a retried work item) stores the same objects, not new ones
    again = step.infer({"pseudonymized-study-instance-uid": uids["good"]}, _ctx(orthanc.dicomweb_url, ai_url))
    assert again["result-series-uids"] == out["result-series-uids"]
    assert orthanc.instance_count() == before + 2


@orthanc
@pytest.mark.parametrize("study, message", [
    ("mr", r"study has no CT series \(modalities found: MR\); the model needs CT"),
    ("gap", r"slices are unevenly spaced: 5.00 mm between instances 3 and 5, 2.50 mm elsewhere; "
            r"about 1 slice\(s\) missing"),
    ("big", rf"series has {MAX_SLICES + 2} slices, more than the model's limit of {MAX_SLICES}"),
])
def test_bad_input_is_a_step_error_naming_the_problem(gateway, ai_url, study, message):
    orthanc, uids = gateway
    before = orthanc.instance_count()
    with pytest.raises(StepError, match=message):
        step.infer({"pseudonymized-study-instance-uid": uids[study]}, _ctx(orthanc.dicomweb_url, ai_url))
    assert orthanc.instance_count() == before  # nothing stored


@orthanc
def test_unknown_study_model_or_service(gateway, ai_url):
    orthanc, uids = gateway
    with pytest.raises(StepError, match="not at the gateway|does not know study"):
        step.infer({"pseudonymized-study-instance-uid": "1.2.3.4.5"}, _ctx(orthanc.dicomweb_url, ai_url))
    with pytest.raises(StepError, match="model 'no-such-model' is not available"):
        step.infer({"pseudonymized-study-instance-uid": uids["good"]},
                      _ctx(orthanc.dicomweb_url, ai_url, ai_model="no-such-model"))
    with pytest.raises(StepError, match="AI service 'x-ray-magic' is not offered"):
        step.infer({"pseudonymized-study-instance-uid": uids["good"], "ai-service-identifier": "x-ray-magic"},
                      StepContext(topic="infer", business_key="bk", site={
                          "gateway_url": orthanc.dicomweb_url, "ai_services": {"lung-seg": {"url": ai_url}}}))
    with pytest.raises(StepError, match="pseudonymized-study-instance-uid is missing"):
        step.infer({}, _ctx(orthanc.dicomweb_url, ai_url))


@orthanc
def test_unreachable_service_is_transient_not_a_step_error(gateway):
    orthanc, uids = gateway
    with pytest.raises(ServiceUnavailable) as info:
        step.infer({"pseudonymized-study-instance-uid": uids["good"]},
                      _ctx(orthanc.dicomweb_url, f"http://127.0.0.1:{free_port()}"))
    assert not isinstance(info.value, StepError)


def test_infer_through_the_project_gateway_store(tmp_path, ai_url):
    """The same step against the project's own DICOMweb gateway with a store backend (provider outbox)."""
    from omi_dsf.dicomweb.config import parse_config
    from omi_dsf.dicomweb.server import BackgroundServer

    cfg = parse_config({"listen": {"host": "127.0.0.1", "port": free_port()}, "auth": {"anonymous": True},
                        "backends": {"OUTBOX": {"type": "store", "path": str(tmp_path / "store")}}})
    good = phantom.write_ct_study(tmp_path / "good", slices=6, rows=64, cols=64, seed=20)
    big = phantom.write_ct_study(tmp_path / "big", slices=MAX_SLICES + 1, rows=32, cols=32, seed=21)
    with BackgroundServer(cfg) as gw:
        web = DicomwebClient(Peer(gw.url))
        web.store_instances([p.read_bytes() for p in good + big])
        web.store_instances([manifest_of(good), manifest_of(big)])   # last, as the send step stores it
        uid = str(pydicom.dcmread(good[0]).StudyInstanceUID)
        out, timings = step.infer_timed({"pseudonymized-study-instance-uid": uid}, _ctx(gw.url, ai_url))
        assert out["result-location"] == f"{gw.url}/studies/{uid}"
        # every phase is timed; the model's time is the service's own and lies inside the request
        seconds = timings.seconds
        assert {"qido", "wado", "volume", "oip_encode", "oip_request", "oip_decode", "model", "seg", "sr",
                "stow", "total"} <= set(seconds)
        assert 0 < seconds["model"] <= seconds["oip_request"]
        assert sum(v for k, v in seconds.items() if k not in ("model", "total")) <= seconds["total"]
        assert timings.overlapped["seg_prepare"] > 0 and timings.overlapped["sr_prepare"] > 0   # while the model ran
        assert len(web.search_for_instances(uid)) == 6 + 1 + 2   # the study, its manifest, SEG and SR
        modalities = {s["00080060"]["Value"][0] for s in web.search_for_series(uid)}
        assert modalities == {"CT", "KO", "SEG", "SR"}
        with pytest.raises(StepError, match=f"more than the model's limit of {MAX_SLICES}"):
            step.infer({"pseudonymized-study-instance-uid": str(pydicom.dcmread(big[0]).StudyInstanceUID)},
                       _ctx(gw.url, ai_url))


def test_a_seg_made_whole_after_the_answer_takes_its_sr_with_it(tmp_path, ai_url, seg_without_derivation):
    """Where the SEG's frames cannot be told from its header (so it is made whole from the mask after the
    answer), the SR is made after it too, not ahead: both are stored, the SR with the model's volumes."""
    from omi_dsf.dicomweb.config import parse_config
    from omi_dsf.dicomweb.server import BackgroundServer

    cfg = parse_config({"listen": {"host": "127.0.0.1", "port": free_port()}, "auth": {"anonymous": True},
                        "backends": {"OUTBOX": {"type": "store", "path": str(tmp_path / "store")}}})
    good = phantom.write_ct_study(tmp_path / "good", slices=6, rows=64, cols=64, seed=22)
    with BackgroundServer(cfg) as gw:
        web = DicomwebClient(Peer(gw.url))
        web.store_instances([p.read_bytes() for p in good])
        web.store_instances([manifest_of(good)])
        uid = str(pydicom.dcmread(good[0]).StudyInstanceUID)
        out, timings = step.infer_timed({"pseudonymized-study-instance-uid": uid}, _ctx(gw.url, ai_url))
        assert "seg_prepare" in timings.overlapped and "sr_prepare" not in timings.overlapped
        seg_series, sr_series = out["result-series-uids"].split(",")
        sr = pydicom.dcmread(BytesIO(web.retrieve_series(uid, sr_series)[0]))
        _, volumes, _ = results.read_measurement_report(sr)
        assert all(v > 0 for v in volumes)
        assert len(web.retrieve_series(uid, seg_series)) == 1


@orthanc
def test_busy_service_is_waited_for_not_a_failure(gateway, caplog):
    """The AI service takes one request at a time (limits.max_concurrent_infer 1) and the model is
    slow: three studies at once all complete, the later ones after waiting for room."""
    from omi_dsf.inference.config import ServiceConfig

    class Slow(LungSegModel):
        def infer(self, inputs):
            time.sleep(1.5)
            return super().infer(inputs)

    cfg = ServiceConfig.model_validate({"auth": {"anonymous": True}, "limits": {"max_concurrent_infer": 1}})
    server = uvicorn.Server(uvicorn.Config(create_app([Slow(max_slices=MAX_SLICES)], cfg), host="127.0.0.1",
                                           port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.05)
    orthanc, uids = gateway
    caplog.set_level(logging.INFO)
    out: list = []

    def one() -> None:
        try:
            out.append(step.infer({"pseudonymized-study-instance-uid": uids["good"], "ai-service-identifier": "lung-seg"},
                                  _ctx(orthanc.dicomweb_url, f"http://127.0.0.1:{server.config.port}")))
        except Exception as exc:   # noqa: BLE001 - reported below
            out.append(exc)

    try:
        runs = [threading.Thread(target=one) for _ in range(3)]
        for r in runs:
            r.start()
        for r in runs:
            r.join(120)
    finally:
        server.should_exit = True
        thread.join(10)
    assert [o["status"] if isinstance(o, dict) else repr(o) for o in out] == ["completed"] * 3
    assert "the AI service is busy; asking again" in caplog.text


def _store_gateway(path: Path):
    from omi_dsf.dicomweb.config import parse_config
    from omi_dsf.dicomweb.server import BackgroundServer

    return BackgroundServer(parse_config({"listen": {"host": "127.0.0.1", "port": free_port()},
                                          "auth": {"anonymous": True},
                                          "backends": {"OUTBOX": {"type": "store", "path": str(path)}}}))


def test_infer_reads_the_study_as_it_arrives(tmp_path, ai_url, caplog, monkeypatch):
    """The requester's send stores the study while the step runs (a thread STOWs one instance at a time,
    slowly, the manifest last): the step reads the instances as they arrive and answers what it answers
    on the same study complete at the start; it had read instances before the last one arrived."""
    caplog.set_level(logging.INFO)
    paths = phantom.write_ct_study(tmp_path / "study", slices=MAX_SLICES, rows=64, cols=64, seed=23)
    uid = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
    arrived: dict[str, float] = {}
    reads: list[float] = []     # when the step parsed each instance it read alone (as it arrived)
    parse = step.read_instance
    monkeypatch.setattr(step, "read_instance", lambda data: (reads.append(time.monotonic()), parse(data))[1])
    with _store_gateway(tmp_path / "arriving") as gw, _store_gateway(tmp_path / "complete") as whole:
        web = DicomwebClient(Peer(gw.url))

        def send() -> None:
            time.sleep(0.5)                      # the step starts before the first instance is there
            for p in paths[:-1]:
                web.store_instances([p.read_bytes()])
                time.sleep(0.3)
            arrived["last"] = time.monotonic()
            web.store_instances([paths[-1].read_bytes()])
            time.sleep(0.3)
            web.store_instances([manifest_of(paths)])

        sender = threading.Thread(target=send)
        sender.start()
        try:
            out, timings = step.infer_timed({"pseudonymized-study-instance-uid": uid},
                                            _ctx(gw.url, ai_url, study_arrival_timeout_s=10))
        finally:
            sender.join(30)
        match = re.search(r"infer bk-test: (\d+) instances read while the study arrived, (\d+) in the series used",
                          caplog.text)
        assert match and int(match[1]) > 0 and int(match[2]) == MAX_SLICES
        assert timings.seconds["arrival"] > 0     # it waited for instances
        assert reads and min(reads) < arrived["last"]   # reading began before the last instance arrived
        # the same answer as on the study complete at the start
        DicomwebClient(Peer(whole.url)).store_instances([p.read_bytes() for p in paths] + [manifest_of(paths)])
        again, complete = step.infer_timed({"pseudonymized-study-instance-uid": uid}, _ctx(whole.url, ai_url))
        assert "arrival" not in complete.seconds
        assert out["result-series-uids"] == again["result-series-uids"]
        assert out["result-study-instance-uid"] == again["result-study-instance-uid"] == uid
        results_there = [sorted(i["00080018"]["Value"][0] for i in DicomwebClient(Peer(u)).search_for_instances(uid))
                         for u in (gw.url, whole.url)]
        assert results_there[0] == results_there[1] and len(results_there[0]) == MAX_SLICES + 3  # + manifest, SEG, SR


def test_a_study_that_never_completes_fails_after_the_arrival_timeout(tmp_path, ai_url):
    """Instances without a manifest (a send that died, a stranger's study), a manifest listing an instance
    that never comes, and a study that never arrives: each a StepError naming the setting, after
    study_arrival_timeout_s without a new instance."""
    paths = phantom.write_ct_study(tmp_path / "study", slices=4, rows=32, cols=32, seed=24)
    other = phantom.write_ct_study(tmp_path / "other", slices=4, rows=32, cols=32, seed=25)
    with _store_gateway(tmp_path / "store") as gw:
        web = DicomwebClient(Peer(gw.url))
        web.store_instances([p.read_bytes() for p in paths])
        uid = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
        start = time.monotonic()
        with pytest.raises(StepError, match=r"the study did not arrive complete within 1 s "
                                            r"\(steps.study_arrival_timeout_s\) of its last new instance: "
                                            r"4 instances, no manifest"):
            step.infer({"pseudonymized-study-instance-uid": uid}, _ctx(gw.url, ai_url, study_arrival_timeout_s=1))
        assert 1 <= time.monotonic() - start < 10

        web.store_instances([p.read_bytes() for p in other[:-1]] + [manifest_of(other)])
        with pytest.raises(StepError, match=r"within 1 s .* the manifest lists instances the gateway does not have"):
            step.infer({"pseudonymized-study-instance-uid": str(pydicom.dcmread(other[0]).StudyInstanceUID)},
                       _ctx(gw.url, ai_url, study_arrival_timeout_s=1))

        with pytest.raises(StepError, match=r"study 1.2.3.4.5 is not at the gateway: nothing arrived within 1 s"):
            step.infer({"pseudonymized-study-instance-uid": "1.2.3.4.5"},
                       _ctx(gw.url, ai_url, study_arrival_timeout_s=1))
        # nothing stored for any of them
        assert len(web.search_for_instances(uid)) == 4
