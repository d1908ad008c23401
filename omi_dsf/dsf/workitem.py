"""The DSF external work item: a QuestionnaireResponse (status in-progress) that the BPE created at
a user task. Its answered items are the step's inputs; a worker answers the output items and sets
it completed, and the BPE continues the process."""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass
from typing import Mapping

from omi_dsf.spec.model import Spec, load_spec

DSF_ITEMS = ("business-key", "user-task-id")
# A worker sets `completed`; DSF 2.x sets a completed response `amended` once its BPE has taken it.
ANSWERED = ("completed", "amended")
VALUE_KEYS = ("valueString", "valueInteger", "valueBoolean", "valueDecimal", "valueUri", "valueUrl", "valueDate",
              "valueDateTime", "valueTime", "valueReference")


def topics_from_spec(spec: Spec | None = None) -> dict[str, str]:
    """Work item topic → Questionnaire `url|version`, as the BPE writes it into QuestionnaireResponses."""
    spec = spec or load_spec()
    return {s.name: f"{spec.questionnaire_url(s)}|{spec.plugin.resource_version}"
            for p in spec.processes for s in p.all_steps() if s.kind == "work_item"}


def _value(answer: dict):
    for k in VALUE_KEYS:
        if k in answer:
            return answer[k]
    return None


def _answer(value) -> dict:
    if isinstance(value, bool):
        return {"valueBoolean": value}
    if isinstance(value, int):
        return {"valueInteger": value}
    if isinstance(value, float):
        return {"valueDecimal": value}
    return {"valueString": str(value)}


@dataclass(frozen=True)
class WorkItem:
    resource: dict

    @property
    def id(self) -> str:
        return self.resource["id"]

    @property
    def version(self) -> str:
        return (self.resource.get("meta") or {}).get("versionId", "")

    @property
    def questionnaire(self) -> str:
        return self.resource.get("questionnaire", "")

    @property
    def status(self) -> str:
        return self.resource.get("status", "")

    @property
    def answered(self) -> bool:
        """Answered by a worker (completed; amended once a DSF 2.x BPE has taken the answer)."""
        return self.status in ANSWERED

    def _items(self) -> dict[str, dict]:
        return {i.get("linkId"): i for i in self.resource.get("item", [])}

    def _first(self, link_id: str):
        item = self._items().get(link_id)
        if not item or not item.get("answer"):
            return None
        return _value(item["answer"][0])

    @property
    def business_key(self) -> str:
        return str(self._first("business-key") or "")

    @property
    def user_task_id(self) -> str:
        return str(self._first("user-task-id") or "")

    @property
    def inputs(self) -> dict[str, object]:
        """Answered items other than the DSF's own: the step's inputs."""
        out = {}
        for link_id, item in self._items().items():
            if link_id in DSF_ITEMS or link_id == "error" or not item.get("answer"):
                continue
            out[link_id] = _value(item["answer"][0])
        return out

    @property
    def item_ids(self) -> list[str]:
        return [i for i in self._items() if i not in DSF_ITEMS]

    def completed(self, outputs: Mapping[str, object], error: str | None = None,
                  now: dt.datetime | None = None) -> dict:
        """The resource to PUT: outputs answered, `error` answered only on failure, status completed."""
        unknown = sorted(set(outputs) - set(self.item_ids))
        if unknown:
            raise ValueError(f"work item {self.id} has no item(s) {unknown} for these outputs")
        res = copy.deepcopy(self.resource)
        for item in res.get("item", []):
            link_id = item.get("linkId")
            if link_id == "error":
                if error:
                    item["answer"] = [{"valueString": error[:1000]}]
                else:
                    item.pop("answer", None)
            elif link_id in outputs and outputs[link_id] is not None:
                item["answer"] = [_answer(outputs[link_id])]
            elif link_id not in DSF_ITEMS and item.get("answer") and _value(item["answer"][0]) in ("Placeholder..",):
                item.pop("answer", None)
        res["status"] = "completed"
        res["authored"] = (now or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds")
        return res
