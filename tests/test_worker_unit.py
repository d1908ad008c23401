"""Work items, leases and worker configuration, without a DSF (the DSF runs in test_worker_dsf.py)."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from helpers_cli import run_cli
from omi_dsf.dsf.errors import operation_outcome_text
from omi_dsf.dsf.workitem import WorkItem, topics_from_spec
from omi_dsf.steps.api import StepContext, StepError
from omi_dsf.steps.demo import demo_step, fingerprint
from omi_dsf.worker.lease import SqliteLeases, open_lease_store



def qr(**answers) -> dict:
    items = [{"linkId": "business-key", "text": "The business-key of the process execution", "answer": [{"valueString": "bk-1"}]},
             {"linkId": "user-task-id", "text": "The user-task-id of the process execution", "answer": [{"valueString": "ut-9"}]}]
    for link, value in answers.items():
        item = {"linkId": link.replace("_", "-"), "text": link}
        if value is not None:
            key = "valueInteger" if isinstance(value, int) else "valueString"
            item["answer"] = [{key: value}]
        items.append(item)
    return {"resourceType": "QuestionnaireResponse", "id": "qr1", "meta": {"versionId": "1"}, "status": "in-progress",
            "questionnaire": "http://x/fhir/Questionnaire/omi-consent|0.1", "item": items}


def test_topics_come_from_the_spec():
    topics = topics_from_spec()
    assert set(topics) == {"consent", "pseudonymize", "send", "infer", "return"}
    assert topics["consent"].endswith("/fhir/Questionnaire/omi-consent|0.1")


def test_work_item_reads_inputs_and_keys():
    item = WorkItem(qr(patient_identifier="P1", study_instance_uid="1.2.3", consent_reference=None, error=None))
    assert item.business_key == "bk-1" and item.user_task_id == "ut-9"
    assert item.inputs == {"patient-identifier": "P1", "study-instance-uid": "1.2.3"}
    assert "consent-reference" in item.item_ids and "error" in item.item_ids


def test_completed_answers_outputs_and_leaves_error_empty():
    item = WorkItem(qr(patient_identifier="P1", consent_reference=None, instance_count=None, error=None))
    done = item.completed({"consent-reference": "Consent/7", "instance-count": 3})
    answers = {i["linkId"]: i.get("answer") for i in done["item"]}
    assert answers["consent-reference"] == [{"valueString": "Consent/7"}]
    assert answers["instance-count"] == [{"valueInteger": 3}]
    assert answers["error"] is None
    assert answers["business-key"] == [{"valueString": "bk-1"}] and answers["user-task-id"] == [{"valueString": "ut-9"}]
    assert done["status"] == "completed" and done["authored"]
    assert item.resource["status"] == "in-progress"   # the original is untouched


def test_completed_with_error_answers_only_error():
    item = WorkItem(qr(consent_reference=None, error=None))
    done = item.completed({}, "consent: no consent for use by an external AI service")
    answers = {i["linkId"]: i.get("answer") for i in done["item"]}
    assert answers["error"] == [{"valueString": "consent: no consent for use by an external AI service"}]
    assert answers["consent-reference"] is None


def test_completed_rejects_outputs_the_item_does_not_have():
    with pytest.raises(ValueError, match=r"no item\(s\) \['nonsense'\]"):
        WorkItem(qr(error=None)).completed({"nonsense": 1})


def test_operation_outcome_text():
    oo = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                                                         "diagnostics": "Task.input: minimum required = 2", "location": ["Task"]}]}
    assert operation_outcome_text(oo) == "error: Task.input: minimum required = 2 at Task"
    assert operation_outcome_text({"resourceType": "Bundle"}) == ""


# -- leases ---------------------------------------------------------------------------------------


def test_lease_is_exclusive_until_it_expires(tmp_path):
    leases = SqliteLeases(tmp_path / "l.db")
    assert leases.claim("a", "w1", ttl=0.3) == 1
    assert leases.claim("a", "w2", ttl=10) is None
    assert leases.renew("a", "w1", ttl=0.3)
    time.sleep(0.4)
    assert leases.claim("a", "w2", ttl=10) == 2          # taken over: the second attempt
    assert not leases.renew("a", "w1", ttl=10)            # w1 learns it lost the lease


def test_released_and_finished_leases(tmp_path):
    leases = open_lease_store(f"sqlite:///{tmp_path}/l.db")
    assert leases.claim("a", "w1", 60) == 1
    leases.release("a", "w1")
    assert leases.claim("a", "w2", 60) == 2
    leases.finish("a", "w2")
    assert leases.is_done("a")
    assert leases.claim("a", "w3", 60) is None            # done is done, whoever asks


def _claim_all(path: str, owner: str, ids: list[str], out) -> None:
    leases = SqliteLeases(path)
    out.put([i for i in ids if leases.claim(i, owner, 60)])


def test_concurrent_processes_claim_each_item_once(tmp_path):
    path = str(tmp_path / "l.db")
    SqliteLeases(path)
    ids = [f"item-{i}" for i in range(200)]
    q = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_claim_all, args=(path, f"w{n}", ids, q)) for n in range(4)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    claimed = [i for part in got for i in part]
    assert sorted(claimed) == sorted(ids)                  # every item once, none twice


# -- demo handler and CLI -------------------------------------------------------------------------


def test_demo_handler_answers_every_output_from_its_inputs():
    ctx = StepContext(topic="pseudonymize", business_key="bk", site={}, outputs=("pseudonym", "instance-count"))
    out = demo_step({"patient-identifier": "P1"}, ctx)
    assert out == {"pseudonym": f"pseudonymize-{fingerprint('pseudonymize', {'patient-identifier': 'P1'})}", "instance-count": 1}
    assert demo_step({"patient-identifier": "P2"}, ctx)["pseudonym"] != out["pseudonym"]
    with pytest.raises(StepError):
        demo_step({}, StepContext(topic="consent", business_key="bk", site={"demo_deny_topics": ["consent"]}))


def test_worker_cli_errors_are_one_line(tmp_path):
    cfg = tmp_path / "site.yaml"
    cfg.write_text("fhir_url: https://127.0.0.1:1/fhir\n")
    run = lambda *a: run_cli("worker", *a)
    p = run("--site", str(cfg), "--topics", "consent,sing")
    assert p.returncode == 2 and "unknown topic(s) ['sing']" in p.stderr
    p = run("--site", str(cfg), "--topics", "consent", "--demo")
    assert p.returncode == 2 and "'ca_file' is missing" in p.stderr
    p = run("--site", str(tmp_path / "nope.yaml"), "--topics", "consent")
    assert p.returncode == 2 and "nope.yaml" in p.stderr
