"""Where an inference request is: derived from the start Task (status, outputs) and the site's work
items (QuestionnaireResponses) carrying the request's business key.

The DIC sees its own work items (consent, prepare, send, return) but not the provider's `infer`
item: infer counts as running once `prepare` is done (the provider's process starts then, and reads
the study while `send` stores it), and as done (or failed, with the provider's error) once the
provider's result message (an omiInferenceResult Task at this site) has arrived.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from omi_dsf.dsf.tasks import BPMN_MESSAGE, input_value, outputs
from omi_dsf.dsf.workitem import WorkItem

STEPS = ("consent", "prepare", "send", "infer", "return")
LOCAL_STEPS = ("consent", "prepare", "send", "return")


@dataclass
class StepState:
    name: str
    state: str = "pending"            # pending | running | done | failed | stopped (ended unfinished: the
                                      # request failed elsewhere meanwhile)
    updated: str | None = None
    detail: str | None = None


@dataclass
class RequestProgress:
    business_key: str | None
    task_id: str
    task_status: str
    authored: str | None
    updated: str | None
    service: str | None
    provider: str | None
    steps: list[StepState] = field(default_factory=list)
    outputs: dict[str, object] = field(default_factory=dict)
    error: str | None = None

    @property
    def current(self) -> str:
        if self.task_status == "completed":
            return "completed"
        if self.task_status == "failed":
            return "failed"
        for s in self.steps:
            if s.state in ("running", "failed"):
                return s.name
        if self.steps and all(s.state == "done" for s in self.steps):
            return "finishing"
        return "starting" if self.task_status in ("requested", "draft") else self.task_status

    def as_dict(self) -> dict:
        return {**asdict(self), "current": self.current}


def _updated(resource: dict) -> str:
    return (resource.get("meta") or {}).get("lastUpdated", "")


def business_key(task: dict) -> str | None:
    value = input_value(task, "business-key", BPMN_MESSAGE)
    return str(value) if value else None


def derive(task: dict, items: list[dict], topic_of: dict[str, str], result_message: dict | None = None) -> RequestProgress:
    """`items`: QuestionnaireResponses with the Task's business key; `topic_of`: questionnaire → topic;
    `result_message`: the provider's omiInferenceResult Task for this business key, once it arrived."""
    out = outputs(task)
    p = RequestProgress(business_key(task), task.get("id", ""), task.get("status", ""), task.get("authoredOn"),
                        _updated(task) or None, _str(input_value(task, "ai-service-identifier")),
                        _str(input_value(task, "provider-organization")), outputs=out,
                        error=_str(out.get("error")))
    latest: dict[str, WorkItem] = {}
    for res in sorted(items, key=_updated):
        wi = WorkItem(res)
        topic = topic_of.get(wi.questionnaire)
        if topic in LOCAL_STEPS:
            latest[topic] = wi
    steps = {name: StepState(name) for name in STEPS}
    for topic, wi in latest.items():
        s = steps[topic]
        s.updated = _updated(wi.resource) or None
        error = next((a.get("valueString") for i in wi.resource.get("item", []) if i.get("linkId") == "error"
                      for a in i.get("answer", [])), None)
        if wi.status == "in-progress":
            s.state, s.detail = "running", "waiting for or being handled by a worker"
        elif wi.answered and error:
            s.state, s.detail = "failed", error
        elif wi.answered:
            s.state = "done"
        elif wi.status == "stopped":      # withdrawn by the plugin: the process no longer waited for it
            s.state, s.detail = "stopped", "withdrawn: the request ended before it was answered"
        else:
            s.state, s.detail = "failed", f"work item {wi.status}"
    if result_message is not None:   # the provider answered: its error, if any, is the infer step's
        infer = steps["infer"]
        infer.updated = result_message.get("authoredOn") or _updated(result_message) or None
        error = input_value(result_message, "error")
        infer.state, infer.detail = ("failed", f"at the provider: {error}") if error else ("done", None)
    elif "return" in latest:
        steps["infer"].state = "done"
    elif steps["prepare"].state == "done":
        steps["infer"].state, steps["infer"].detail = "running", f"at the provider {p.provider or ''}".strip()
        steps["infer"].updated = steps["prepare"].updated
    if p.task_status == "completed":
        for s in steps.values():
            if s.state in ("pending", "running"):
                s.state = "done"
    elif p.task_status == "failed":
        failed = [s for s in steps.values() if s.state == "failed"]
        if failed:   # what still ran alongside (infer at the provider while send failed) ended unfinished
            for s in steps.values():
                if s.state == "running":
                    s.state, s.detail = "stopped", "not finished: the request failed"
        else:
            target = next((s for s in steps.values() if s.state == "running"), None) or \
                next((s for s in steps.values() if s.state == "pending"), None)
            if target:
                target.state, target.detail = "failed", p.error or "the process failed"
    p.steps = [steps[n] for n in STEPS]
    return p


def _str(value) -> str | None:
    return None if value is None else str(value)
