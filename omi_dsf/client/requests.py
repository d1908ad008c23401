"""Inference requests at the site's own DSF FHIR server: start one, find them, read their work items."""

from __future__ import annotations

import json
import time
from typing import Callable

from omi_dsf.errors import UserError
from omi_dsf.client.progress import LOCAL_STEPS, RequestProgress, business_key
from omi_dsf.dsf.client import DsfClient
from omi_dsf.dsf.errors import DsfError
from omi_dsf.dsf.tasks import input_value, message_task
from omi_dsf.dsf.workitem import topics_from_spec
from omi_dsf.spec.model import load_spec

START_MESSAGE = "startOmiInference"


def start_profile() -> str:
    """The start Task's profile as its `_profile` search needs it (url|version)."""
    spec = load_spec()
    process, message = spec.message_owner(START_MESSAGE)
    return spec.profile_canonical(message)


def start(client: DsfClient, organization: str, inputs: dict[str, str], wait: float = 60.0,
          poll: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> tuple[dict, str | None]:
    """POST the start Task (requester and recipient: this site) and read it back until the BPE has
    given it a business key or failed it. Returns (task, business key)."""
    task = message_task(START_MESSAGE, organization, organization, inputs)
    created = client.create(task)
    task_id = created.get("id")
    if not task_id:
        raise UserError("the DSF FHIR server accepted the Task but returned no id")
    deadline = time.monotonic() + wait
    current = created
    while True:
        key = business_key(current)
        if key or current.get("status") == "failed":
            return current, key
        if time.monotonic() >= deadline:
            return current, None
        sleep(poll)
        current = client.read("Task", task_id)


def request_tasks(client: DsfClient, limit: int = 20) -> list[dict]:
    """The newest start Tasks of this site (any status), newest first."""
    params = {"_profile": start_profile(), "_sort": "-_lastUpdated"}
    found = []
    for task in client.search("Task", params, page_size=min(limit, 50)):
        if task.get("status") == "draft":   # the plugin's draft Task (a template), not a request
            continue
        found.append(task)
        if len(found) >= limit:
            break
    return found


def find_task(client: DsfClient, key: str, scan: int = 500) -> dict:
    for task in client.search("Task", {"_profile": start_profile(), "_sort": "-_lastUpdated"}, page_size=50):
        if business_key(task) == key:
            return task
        scan -= 1
        if scan <= 0:
            break
    raise UserError(f"no OMI inference request with business key {key} at this site")


def work_items(client: DsfClient, key: str | None, since: str | None = None) -> dict[str, list[dict]]:
    """The site's work items (QuestionnaireResponses, any status) by business key; only `key`'s if
    given. `since` (the oldest request's authoredOn) keeps the searches short on a busy site."""
    topics = topics_from_spec()
    out: dict[str, list[dict]] = {}
    for topic in LOCAL_STEPS:
        params = {"questionnaire": topics[topic]}
        if since:
            params["_lastUpdated"] = f"ge{since}"
        for qr in client.search("QuestionnaireResponse", params, page_size=50):
            items = {i.get("linkId"): i for i in qr.get("item", [])}
            bk = ((items.get("business-key") or {}).get("answer") or [{}])[0].get("valueString")
            if bk and (key is None or bk == key):
                out.setdefault(bk, []).append(qr)
    return out


def result_messages(client: DsfClient, key: str | None, since: str | None = None) -> dict[str, dict]:
    """The providers' omiInferenceResult Tasks received at this site, by business key."""
    spec = load_spec()
    _, message = spec.message_owner("omiInferenceResult")
    params = {"_profile": spec.profile_canonical(message)}
    if since:
        params["_lastUpdated"] = f"ge{since}"
    out = {}
    for task in client.search("Task", params, page_size=50):
        bk = business_key(task)
        if bk and (key is None or bk == key):
            out[bk] = task
    return out


def topic_of() -> dict[str, str]:
    return {q: t for t, q in topics_from_spec().items()}


def dsf_call(what: str, fn, *args, **kw):
    """Run a DSF call; its error, or an answer that is not the FHIR JSON expected (HTML, a list where
    a resource is due), becomes one line for the user."""
    try:
        return fn(*args, **kw)
    except DsfError as exc:
        raise UserError(f"{what}: {exc}") from None
    except (json.JSONDecodeError, AttributeError, TypeError, KeyError) as exc:
        raise UserError(f"{what}: the DSF FHIR server's answer is not the FHIR JSON expected "
                        f"({type(exc).__name__}: {str(exc)[:100]})") from None


# -- many requests at once (cohorts) ---------------------------------------------------------------


def started_tasks(client: DsfClient, study_uids: set[str], scan: int = 2000) -> dict[str, dict]:
    """This site's newest start Task per study UID among `study_uids` (the newest `scan` Tasks)."""
    found: dict[str, dict] = {}
    for task in request_tasks(client, scan):
        uid = input_value(task, "study-instance-uid")
        if uid in study_uids and uid not in found:
            found[str(uid)] = task
    return found


def in_flight_to(client: DsfClient, provider: str) -> int:
    """How many of this site's requests to `provider` are running now (any cohort, any user)."""
    n = 0
    for status in ("requested", "in-progress"):
        params = {"_profile": start_profile(), "status": status}
        n += sum(1 for t in client.search("Task", params, page_size=200)
                 if input_value(t, "provider-organization") == provider)
    return n


def progress_of_tasks(client: DsfClient, tasks: list[dict]) -> dict[str, RequestProgress]:
    """Where each of these start Tasks is (by Task id), from one search per work item topic."""
    from omi_dsf.client.progress import derive

    stamps = [s for s in (since_of(t) for t in tasks) if s]
    since = min(stamps) if stamps and len(stamps) == len(tasks) else None
    items, answers, topics = work_items(client, None, since), result_messages(client, None, since), topic_of()
    return {t["id"]: derive(t, items.get(business_key(t) or "", []), topics, answers.get(business_key(t) or ""))
            for t in tasks}


def since_of(task: dict) -> str | None:
    """A minute before the Task was authored: work items are created after their Task (slack for
    clock differences)."""
    import datetime as dt
    try:
        t = dt.datetime.fromisoformat(str(task.get("authoredOn")).replace("Z", "+00:00"))
    except ValueError:
        return None
    return (t - dt.timedelta(minutes=1)).isoformat()
