"""The `omi` client without servers: progress from a start Task and work items, the business-key
wait after submitting, the registry view, text output and one-line errors."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from omi_dsf.cli import main
from omi_dsf.client import render
from omi_dsf.client.progress import derive
from omi_dsf.client.registry_client import RegistryClient
from omi_dsf.client.requests import start
from omi_dsf.dsf.tasks import BPMN_MESSAGE, message_task
from omi_dsf.dsf.workitem import topics_from_spec
from omi_dsf.errors import UserError
from omi_dsf.spec.model import load_spec

SPEC = load_spec()
TOPICS = topics_from_spec()
TOPIC_OF = {q: t for t, q in TOPICS.items()}
KEY = "6f1c0d1e-0000-4000-8000-000000000001"
INPUTS = {"study-instance-uid": "1.2.3", "patient-identifier": "PID-9", "ai-service-identifier": "lung-seg",
          "provider-organization": "ai.omi.test"}


def task(status="in-progress", key=KEY, outputs: dict | None = None) -> dict:
    t = message_task("startOmiInference", "dic.omi.test", "dic.omi.test", INPUTS)
    t.update(id="t1", status=status, meta={"lastUpdated": "2026-11-28T10:00:00Z"})
    if key:
        t["input"].append({"type": {"coding": [{"system": BPMN_MESSAGE, "code": "business-key"}]}, "valueString": key})
    for code, value in (outputs or {}).items():
        system = BPMN_MESSAGE if code == "error" else SPEC.code_system_url
        t.setdefault("output", []).append({"type": {"coding": [{"system": system, "code": code}]}, "valueString": value})
    return t


def item(topic: str, status: str, at: str, key: str = KEY, error: str | None = None) -> dict:
    items = [{"linkId": "business-key", "answer": [{"valueString": key}]},
             {"linkId": "user-task-id", "answer": [{"valueString": "u1"}]}]
    if error:
        items.append({"linkId": "error", "answer": [{"valueString": error}]})
    return {"resourceType": "QuestionnaireResponse", "id": f"{topic}-{at}", "status": status,
            "questionnaire": TOPICS[topic], "meta": {"lastUpdated": at}, "item": items}


def states(p) -> dict[str, str]:
    return {s.name: s.state for s in p.steps}


def test_progress_through_the_steps():
    p = derive(task(), [], TOPIC_OF)
    assert p.current == "in-progress" and p.business_key == KEY
    assert states(p) == dict.fromkeys(("consent", "prepare", "send", "infer", "return"), "pending")
    p = derive(task(), [item("consent", "completed", "1"), item("prepare", "in-progress", "2")], TOPIC_OF)
    assert states(p)["prepare"] == "running" and states(p)["infer"] == "pending" and p.current == "prepare"
    # once prepare is done, the provider reads the study while send stores it: both run
    p = derive(task(), [item("consent", "completed", "1"), item("prepare", "completed", "2"),
                        item("send", "in-progress", "3")], TOPIC_OF)
    assert states(p)["send"] == states(p)["infer"] == "running" and p.current == "send"
    done = [item(t, "completed", str(i)) for i, t in enumerate(("consent", "prepare", "send"))]
    p = derive(task(), done, TOPIC_OF)
    assert states(p)["infer"] == "running" and p.current == "infer" and "ai.omi.test" in p.steps[3].detail
    p = derive(task(), done + [item("return", "in-progress", "9")], TOPIC_OF)
    assert states(p)["infer"] == "done" and p.current == "return"
    p = derive(task(), done + [item("return", "completed", "9")], TOPIC_OF)
    assert p.current == "finishing"
    p = derive(task("completed", outputs={"stored-study-instance-uid": "9.9"}), done + [item("return", "completed", "9")],
               TOPIC_OF)
    assert p.current == "completed" and set(states(p).values()) == {"done"}
    assert p.outputs["stored-study-instance-uid"] == "9.9" and p.service == "lung-seg"


def test_amended_work_items_count_as_answered():
    # DSF 2.x sets a completed QuestionnaireResponse `amended` once its BPE has taken the answer
    amended = [item(t, "amended", str(i)) for i, t in enumerate(("consent", "prepare", "send"))]
    p = derive(task(), amended, TOPIC_OF)
    assert [states(p)[t] for t in ("consent", "prepare", "send")] == ["done"] * 3 and p.current == "infer"
    p = derive(task(), [item("consent", "amended", "1", error="consent: no consent")], TOPIC_OF)
    assert states(p)["consent"] == "failed" and p.steps[0].detail == "consent: no consent"
    p = derive(task(), [item("consent", "entered-in-error", "1")], TOPIC_OF)
    assert states(p)["consent"] == "failed" and p.steps[0].detail == "work item entered-in-error"


def test_a_request_that_failed_while_steps_ran_alongside():
    """The provider answered an error while send ran: the send's work item was withdrawn (stopped), the
    request failed at infer. A send that failed while infer ran at the provider: infer did not finish."""
    answer = message_task("omiInferenceResult", "ai.omi.test", "dic.omi.test", {"error": "model not ready"},
                          business_key=KEY)
    done = [item(t, "completed", str(i)) for i, t in enumerate(("consent", "prepare"))]
    p = derive(task("failed", outputs={"error": "infer: model not ready"}), done + [item("send", "stopped", "3")],
               TOPIC_OF, answer)
    assert [states(p)[t] for t in ("send", "infer", "return")] == ["stopped", "failed", "pending"]
    assert p.steps[2].detail.startswith("withdrawn") and "[-] send" in render.progress(p)
    p = derive(task("failed", outputs={"error": "send: refused"}),
               done + [item("send", "completed", "3", error="send: refused")], TOPIC_OF)
    assert [states(p)[t] for t in ("send", "infer", "return")] == ["failed", "stopped", "pending"]
    assert p.current == "failed"


def test_failed_step_and_failed_task():
    # a step answered with an error
    p = derive(task("failed", outputs={"error": "consent: no consent"}),
               [item("consent", "completed", "1", error="consent: no consent")], TOPIC_OF)
    assert states(p)["consent"] == "failed" and p.steps[0].detail == "consent: no consent" and p.current == "failed"
    text = render.progress(p)
    assert "[!] consent" in text and text.count("no consent") == 1   # not repeated as a separate error line
    # the Task failed without a failed item (e.g. the message to the provider could not be sent)
    done = [item(t, "completed", str(i)) for i, t in enumerate(("consent", "prepare", "send"))]
    p = derive(task("failed", outputs={"error": "provider unreachable"}), done, TOPIC_OF)
    assert states(p)["infer"] == "failed" and p.steps[3].detail == "provider unreachable"
    assert "error: provider unreachable" in render.results(p)


def test_the_providers_answer_decides_infer():
    done = [item(t, "completed", str(i)) for i, t in enumerate(("consent", "prepare", "send"))]
    answer = message_task("omiInferenceResult", "ai.omi.test", "dic.omi.test", {"error": "model not ready"},
                          business_key=KEY)
    answer["authoredOn"] = "2026-11-28T10:05:00Z"
    p = derive(task(), done + [item("return", "in-progress", "9")], TOPIC_OF, answer)
    assert states(p)["infer"] == "failed" and p.steps[3].detail == "at the provider: model not ready"
    assert p.steps[3].updated == "2026-11-28T10:05:00Z"
    ok = message_task("omiInferenceResult", "ai.omi.test", "dic.omi.test", {"result-location": "https://x"},
                      business_key=KEY)
    p = derive(task(), done, TOPIC_OF, ok)
    assert states(p)["infer"] == "done" and states(p)["return"] == "pending"


def test_only_the_newest_item_per_step_counts():
    # a retried step: the older failed item is superseded by the newer completed one
    items = [item("consent", "completed", "2026-11-28T10:00:02Z"),
             item("consent", "stopped", "2026-11-28T10:00:01Z")]
    assert states(derive(task(), items, TOPIC_OF))["consent"] == "done"


class FakeDsf:
    """create() answers like a DSF FHIR server; read() returns the Task as the BPE changes it."""

    def __init__(self, versions: list[dict]):
        self.versions, self.created, self.reads = versions, None, 0

    def create(self, resource):
        self.created = resource
        return {**resource, "id": "t1", "status": "requested"}

    def read(self, rtype, rid):
        self.reads += 1
        return self.versions[min(self.reads, len(self.versions)) - 1]


def test_start_waits_for_the_business_key():
    dsf = FakeDsf([task("requested", key=None), task("in-progress")])
    t, key = start(dsf, "dic.omi.test", INPUTS, wait=5, sleep=lambda s: None)
    assert key == KEY and dsf.reads == 2
    assert dsf.created["requester"]["identifier"]["value"] == "dic.omi.test"
    assert dsf.created["restriction"]["recipient"][0]["identifier"]["value"] == "dic.omi.test"
    failed = task("failed", key=None, outputs={"error": "no process"})
    t, key = start(FakeDsf([failed]), "dic.omi.test", INPUTS, wait=5, sleep=lambda s: None)
    assert key is None and t["status"] == "failed"
    t, key = start(FakeDsf([task("requested", key=None)]), "dic.omi.test", INPUTS, wait=0.05, poll=0.01)
    assert key is None and t["status"] == "requested"
    with pytest.raises(ValueError, match="missing required input"):
        start(FakeDsf([]), "dic.omi.test", {**INPUTS, "study-instance-uid": ""}, wait=1)


@pytest.mark.integration   # the session's FHIR store
def test_registry_view_and_table(tmp_path, fhir_store):
    from omi_dsf.registry.app import create_app
    from omi_dsf.registry.config import parse_config
    from omi_dsf.registry.entries import service_bundle
    from omi_dsf.registry.registrations import Registry
    from omi_dsf.registry.store import Store

    cfg = parse_config({"fhir_store": {"url": fhir_store.state().base_url}, "health": {"interval": 0}}, tmp_path)
    store = Store(cfg.store_peer())
    store.install_search_parameters()
    store.clear()
    b = service_bundle("ai.omi.test", "lung-seg", name="Lung", model="lung-seg", model_version="0.1.0",
                       oip_url="http://127.0.0.1:9", modality=["CT"], body_site=[("http://snomed.info/sct", "39607008")])
    Registry(store).transaction(b, "ai.omi.test")
    store.record_check("lung-seg", "degraded", 1500.0, "slow: 1500 ms > 1000 ms")
    app = create_app(cfg, store=store, run_checks=False)
    with TestClient(app, base_url="http://registry.test") as http:
        reg = RegistryClient("http://registry.test", http=http)
        (svc,) = reg.services({"modality": "CT"})
        assert (svc.status, svc.latency_ms, svc.model, svc.oip_url) == ("degraded", 1500.0, "lung-seg", "http://127.0.0.1:9")
        assert reg.services({"modality": "MR"}) == []
        with pytest.raises(UserError, match="no AI service 'x'"):
            reg.service("x")
        with pytest.raises(UserError, match=r"HTTP 400: error: unknown search parameter 'colour'"):
            reg.services({"colour": "red"})
    table = render.services_table([svc])
    assert "lung-seg  degraded  ai.omi.test" in table and "1500 ms" in table and "slow: 1500 ms" in table


def test_cli_site_errors_are_one_line(tmp_path, capsys):
    assert main(["status", "--site", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"error: site config {tmp_path / 'missing.yaml'}:")
    site = tmp_path / "site.yaml"
    site.write_text(json.dumps({"fhir_url": "https://127.0.0.1:1/fhir"}))
    assert main(["results", "KEY", "--site", str(site)]) == 2
    assert capsys.readouterr().err == f"error: {site}: 'site' (this organization's DSF identifier) is missing\n"
    site.write_text(json.dumps({"site": "dic.omi.test", "fhir_url": "https://127.0.0.1:1/fhir"}))
    assert main(["results", "KEY", "--site", str(site)]) == 2
    assert capsys.readouterr().err == f"error: {site}: 'ca_file' is missing\n"


def _client_site(tmp_path, fhir_url: str):
    """A client site file with a test PKI's client certificate; its key password in tmp_path/pw."""
    from helpers_pki import CLIENT, issue, make_ca, write_ca, write_pem

    ca_key, ca = make_ca("client test CA")
    cert, key = write_pem(tmp_path, "dic", *issue(ca_key, ca, "dic client", CLIENT), password="password")
    (tmp_path / "pw").write_text("password")
    site = tmp_path / "site.yaml"
    site.write_text(json.dumps({"site": "dic.omi.test", "fhir_url": fhir_url, "ca_file": write_ca(tmp_path / "ca.pem", ca),
                                "client_cert": cert, "client_key": key, "client_key_password_file": "pw"}))
    return site


def test_unreachable_dsf_is_one_line(tmp_path, capsys):
    from conftest import free_port

    site = _client_site(tmp_path, f"https://127.0.0.1:{free_port()}/fhir")
    assert main(["status", "--site", str(site)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: status: GET Task?: cannot connect to https://127.0.0.1:") and err.count("\n") == 1
    (tmp_path / "pw").write_text("wrong password")
    assert main(["status", "--site", str(site)]) == 2
    assert "cannot load client certificate" in capsys.readouterr().err


def test_submit_with_an_empty_input_is_one_line(tmp_path, capsys):
    site = _client_site(tmp_path, "https://127.0.0.1:1/fhir")
    assert main(["submit", "--study", "1.2.3", "--patient", "", "--service", "s", "--provider", "ai.omi.test",
                 "--site", str(site)]) == 2
    assert capsys.readouterr().err == ("error: submit: startOmiInference: missing required input(s) "
                                       "['patient-identifier']\n")


def test_stored_result_series_from_the_gateway(tmp_path):
    from pathlib import Path

    import pydicom

    from omi_dsf.client.stored import stored_series
    from omi_dsf.dicomweb.app import create_app as gateway_app
    from omi_dsf.dicomweb.config import parse_config as gateway_config
    from omi_dsf.testkit.phantom import write_ct_study

    files = write_ct_study(tmp_path / "study", slices=2, seed=3, rows=32, cols=32)
    cfg = gateway_config({"auth": {"anonymous": True},
                          "backends": {"PACS": {"type": "store", "path": str(tmp_path / "store")}}})
    with TestClient(gateway_app(cfg), base_url="http://gw.test") as gw:
        body = b"".join(b"--B\r\nContent-Type: application/dicom\r\n\r\n" + Path(f).read_bytes() + b"\r\n"
                        for f in files) + b"--B--\r\n"
        assert gw.post("/studies", content=body, headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=B'}).status_code == 200
        ds = pydicom.dcmread(files[0])
        (series,) = stored_series(gw, "http://gw.test", ds.StudyInstanceUID)
        assert series == {"series_instance_uid": ds.SeriesInstanceUID, "modality": "CT",
                          "description": ds.SeriesDescription, "instances": 2}
        assert stored_series(gw, "http://gw.test", "1.2.3.999") == []
        with pytest.raises(UserError, match="HTTP 404: no PACS or store named 'NOPE'"):
            stored_series(gw, "http://gw.test/aets/NOPE", ds.StudyInstanceUID)
    text = render.stored("http://gw.test/studies/1.2", [series])
    assert "CT      2 instance(s)" in text and ds.SeriesInstanceUID in text
    assert render.stored("http://gw.test/studies/9", []) == "  not (yet) in the local PACS at http://gw.test/studies/9"


def test_stored_series_from_a_gateway_that_does_not_answer_is_one_line():
    from omi_dsf.client.stored import stored_series
    from omi_dsf.peer import http_client
    from omi_dsf.testkit.procs import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with http_client(timeout=5) as http, pytest.raises(UserError) as exc:
        stored_series(http, url, "1.2.826.0.1.3680043.8.498.1")
    msg = str(exc.value)
    assert msg.startswith(f"gateway {url}: ") and "does not answer" in msg and "\n" not in msg

