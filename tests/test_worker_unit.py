"""Work items and worker configuration, without a DSF (the DSF runs in test_worker_dsf.py; leases are
site state, in test_site_state.py)."""

from __future__ import annotations

import pytest

from helpers_cli import run_cli
from omi_dsf.dsf.errors import operation_outcome_text
from omi_dsf.dsf.workitem import WorkItem, topics_from_spec
from omi_dsf.spec.model import load_spec
from omi_dsf.steps.api import StepContext, StepError
from omi_dsf.steps.demo import demo_step, fingerprint


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
    assert set(topics) == {"consent", "prepare", "send", "infer", "return"}
    version = load_spec().plugin.resource_version          # a.b of the plugin's a.b.c.d
    assert topics["consent"].endswith(f"/fhir/Questionnaire/omi-consent|{version}")


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


# -- demo handler and CLI -------------------------------------------------------------------------


def test_demo_handler_answers_every_output_from_its_inputs():
    ctx = StepContext(topic="send", business_key="bk", site={}, outputs=("pseudonym", "instance-count"))
    out = demo_step({"patient-identifier": "P1"}, ctx)
    assert out == {"pseudonym": f"send-{fingerprint('send', {'patient-identifier': 'P1'})}", "instance-count": 1}
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
