"""A cohort: one OMI request per study, a bounded number in flight, followed to the end and kept in
a record file so that an interrupted run resumes where it stopped.

The record (CSV, one row per study: study UID, patient identifier, business key, Task, status,
current step, error, result location) is rewritten atomically after every change, readable only by
its owner: it names patients, like the cohort file it came from, and stays at the site. Before a
start Task is created its row says `submitting`; a run that finds such a row (it was interrupted
between the two) looks for the Task at the DSF before creating one, so no study is submitted twice.
Finished studies are skipped; failed ones run again only with `retry_failed`. A lock file keeps a
second run off the same record while one is running.

Statuses: pending → submitting → submitted → running → completed | failed | refused (the consent
step said no: the study must not be processed, which is not an error to retry).
"""

from __future__ import annotations

import csv
import datetime as dt
import fcntl
import io
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from omi_dsf.errors import UserError

FIELDS = ("study_uid", "patient", "business_key", "task", "status", "step", "error", "result_location",
          "stored_study_uid", "attempts", "updated")
FINAL = ("completed", "failed", "refused")
IN_FLIGHT = ("submitting", "submitted", "running")
MAX_COHORT_BYTES = 20 * 1024 * 1024
MAX_STUDIES = 100_000
REFUSING_STEP = "consent"
LOOK_SLACK_S = 10.0          # a look also asks for what changed this long before the last one


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- the studies of a cohort ----------------------------------------------------------------------


def read_cohort_csv(path: str | Path, is_uid: Callable[[str], bool]) -> list[tuple[str, str]]:
    """(study UID, patient identifier) per row of a CSV file; a first row that is no study (a
    header) is skipped; a bad row is one error naming its line."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_COHORT_BYTES:
            raise UserError(f"cohort {path}: larger than {MAX_COHORT_BYTES // (1024 * 1024)} MiB")
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UserError(f"cohort {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"cohort {path}: not UTF-8 text") from None
    out, seen = [], set()
    for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if n == 1 and not is_uid(cells[0]):
            continue                                   # a header
        if len(cells) < 2 or not cells[1]:
            raise UserError(f"cohort {path}, line {n}: needs two columns, study UID and patient identifier")
        if not is_uid(cells[0]):
            raise UserError(f"cohort {path}, line {n}: {cells[0][:80]!r} is not a valid DICOM UID")
        if len(cells[1]) > 64 or not cells[1].isprintable():
            raise UserError(f"cohort {path}, line {n}: the patient identifier is not a printable value of at most 64 characters")
        if cells[0] in seen:
            raise UserError(f"cohort {path}, line {n}: study {cells[0]} is listed twice")
        seen.add(cells[0])
        out.append((cells[0], cells[1]))
        if len(out) > MAX_STUDIES:
            raise UserError(f"cohort {path}: more than {MAX_STUDIES} studies")
    if not out:
        raise UserError(f"cohort {path}: no studies")
    return out


def query_studies(dicomweb, query: str, is_uid: Callable[[str], bool], limit: int = MAX_STUDIES,
                  page: int = 500) -> list[tuple[str, str]]:
    """(study UID, patient identifier) of each study a QIDO-RS query (`ModalitiesInStudy=CT&…`)
    finds at the site's gateway, page by page."""
    from urllib.parse import parse_qsl

    try:
        filters = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise UserError(f"--query {query[:200]!r} is not of the form key=value&key=value") from None
    reserved = {k for k, _ in filters} & {"limit", "offset", "includefield", "includedefaults"}
    if reserved:
        raise UserError(f"--query: {', '.join(sorted(reserved))} are set by omi, not in the query")
    out, offset = [], 0
    while True:
        # only the two keys it reads: no default key a DIMSE gateway computes per study (counts, modalities)
        found = dicomweb.search_for_studies(fields=("0020000D", "00100020"), search_filters=dict(filters),
                                            limit=page, offset=offset, include_defaults=False)
        for study in found:
            uid = ((study.get("0020000D") or {}).get("Value") or [None])[0]
            pid = ((study.get("00100020") or {}).get("Value") or [None])[0]
            if not isinstance(uid, str) or not is_uid(uid) or not isinstance(pid, str) or not pid:
                continue                               # a study without its UID or patient: not ours to run
            out.append((uid, pid))
        if len(found) < page or len(out) >= limit:
            break
        offset += len(found)
    if not out:
        raise UserError(f"--query {query[:200]!r}: the gateway found no studies")
    return out[:limit]


# -- the record -----------------------------------------------------------------------------------


class Record:
    """The cohort record file; `lock()` while a run changes it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, dict[str, str]] = {}
        self._lock_file = None

    def lock(self, wait: bool = False) -> bool:
        self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            return False
        return True

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> "Record":
        try:
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or "study_uid" not in reader.fieldnames:
                    raise UserError(f"{self.path} is not a cohort record (no study_uid column)")
                self.rows = {r["study_uid"]: {k: (r.get(k) or "") for k in FIELDS} for r in reader}
        except OSError as exc:
            raise UserError(f"cohort record {self.path}: {exc.strerror}") from None
        return self

    def add(self, studies: Iterable[tuple[str, str]]) -> int:
        """Studies not yet in the record, as pending; how many were new."""
        n = 0
        for uid, patient in studies:
            if uid not in self.rows:
                self.rows[uid] = {**dict.fromkeys(FIELDS, ""), "study_uid": uid, "patient": patient,
                                  "status": "pending", "attempts": "0", "updated": _now()}
                n += 1
        return n

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(self.rows.values())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def update(self, uid: str, save: bool = True, **values) -> bool:
        """Change a row; written at once unless `save` is false (then: whether it changed)."""
        row = self.rows[uid]
        values = {k: "" if v is None else str(v) for k, v in values.items()}
        if not any(row.get(k) != v for k, v in values.items()):
            return False
        row.update(values, updated=_now())
        if save:
            self.save()
        return True

    def with_status(self, *statuses: str) -> list[dict[str, str]]:
        return [r for r in self.rows.values() if r["status"] in statuses]


def summary(record: Record) -> dict:
    """Counts by status and step; failures grouped by reason."""
    rows = list(record.rows.values())
    status = Counter(r["status"] for r in rows)
    steps = Counter(r["step"] or r["status"] for r in rows if r["status"] in IN_FLIGHT)
    failed = Counter(_reason(r) for r in rows if r["status"] == "failed")
    refused = Counter(_reason(r) for r in rows if r["status"] == "refused")
    return {"record": str(record.path), "studies": len(rows), "completed": status["completed"],
            "failed": status["failed"], "refused": status["refused"],
            "in_flight": sum(status[s] for s in IN_FLIGHT), "pending": status["pending"],
            "steps": dict(sorted(steps.items())),
            "failed_by_reason": dict(failed.most_common()), "refused_by_reason": dict(refused.most_common())}


def _reason(row: dict) -> str:
    step = row["step"] or "?"
    error = " ".join(row["error"].split())[:120] or "no reason given"
    return error if error.startswith(f"{step}:") else f"{step}: {error}"   # work item errors name their step


def summary_text(s: dict) -> str:
    lines = [f"cohort {s['record']}: {s['studies']} studies: {s['completed']} completed, {s['failed']} failed, "
             f"{s['refused']} refused by consent, {s['in_flight']} in flight, {s['pending']} not started"]
    if s["steps"]:
        lines.append("  in flight: " + ", ".join(f"{k} {v}" for k, v in s["steps"].items()))
    for title, key in (("failed", "failed_by_reason"), ("refused", "refused_by_reason")):
        for reason, n in s[key].items():
            lines.append(f"  {title} {n:>4}  {reason}")
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Limits:
    parallel: int = 4                       # this cohort's requests in flight
    provider: int | None = None             # the site's requests in flight to this provider, all runs
    interval: float = 2.0                   # seconds between looks at the DSF
    dsf_retries: int = 10                   # consecutive unreachable looks before the run stops


@dataclass
class Run:
    """Submits and follows the record's studies through the site's DSF FHIR server (`client`)."""
    record: Record
    client: object
    organization: str
    service: str
    provider: str
    limits: Limits = field(default_factory=Limits)
    on_change: Callable[[dict], None] | None = None
    started: float = field(default_factory=time.monotonic)
    finished_now: int = 0
    # what the last looks saw, so that each look asks only for what changed since (see follow)
    _tasks: dict = field(default_factory=dict, repr=False)      # Task id → the start Task
    _items: dict = field(default_factory=dict, repr=False)      # business key → {work item id: item}
    _answers: dict = field(default_factory=dict, repr=False)    # business key → the result message
    _looked: float | None = field(default=None, repr=False)    # the server's clock at the last look

    def run(self, sleep: Callable[[float], None] = time.sleep) -> dict:
        from omi_dsf.dsf.errors import DsfAuthError, DsfError

        self.adopt_interrupted()
        failures = 0
        while True:
            try:
                self.follow()
                self.submit_more()
                failures = 0
            except DsfAuthError as exc:
                raise UserError(f"the site's DSF refused this client: {exc}") from None
            except DsfError as exc:
                if exc.status and 400 <= exc.status < 500 and exc.status not in (408, 429):
                    raise UserError(f"the site's DSF: {exc}") from None
                failures += 1
                if failures > self.limits.dsf_retries:
                    raise UserError(f"the DSF is not answering ({exc}); the record is kept: run the same command "
                                    "again to resume") from None
            s = summary(self.record)
            if self.on_change:
                self.on_change(self.view(s))
            if not s["in_flight"] and not s["pending"]:
                return s
            sleep(self.limits.interval)

    def view(self, s: dict) -> dict:
        """The summary with rate and time left, for the live view."""
        minutes = max(time.monotonic() - self.started, 1e-6) / 60
        rate = self.finished_now / minutes
        left = s["pending"] + s["in_flight"]
        return {**s, "per_minute": round(rate, 2), "eta_s": round(left / rate * 60) if rate else None}

    # -- submitting -------------------------------------------------------------------------
    def adopt_interrupted(self) -> None:
        """Rows left `submitting` by an interrupted run: the Task may exist; find it, else submit."""
        from omi_dsf.client.requests import started_tasks

        waiting = {r["study_uid"] for r in self.record.with_status("submitting")}
        if not waiting:
            return
        found = started_tasks(self.client, waiting)
        for uid in waiting:
            task = found.get(uid)
            if task is not None:
                self.record.update(uid, status="submitted", task=task["id"])
            else:
                self.record.update(uid, status="pending")

    def room(self) -> int:
        from omi_dsf.client.requests import in_flight_to

        ours = len(self.record.with_status(*IN_FLIGHT))
        n = self.limits.parallel - ours
        if n > 0 and self.limits.provider is not None:
            n = min(n, self.limits.provider - in_flight_to(self.client, self.provider))
        return max(n, 0)

    def submit_more(self) -> None:
        from omi_dsf.client.requests import start
        from omi_dsf.dsf.errors import DsfAuthError, DsfError

        pending = self.record.with_status("pending")
        for row in pending[: self.room()]:
            uid = row["study_uid"]
            self.record.update(uid, status="submitting", attempts=int(row["attempts"] or 0) + 1, error="",
                               step="", task="", business_key="")
            inputs = {"study-instance-uid": uid, "patient-identifier": row["patient"],
                      "ai-service-identifier": self.service, "provider-organization": self.provider}
            try:
                task, key = start(self.client, self.organization, inputs, wait=0)
            except DsfAuthError:
                raise                                   # the site's certificate: nothing will go
            except DsfError as exc:
                if exc.status and 400 <= exc.status < 500 and exc.status not in (408, 429):
                    self.record.update(uid, status="failed", step="submit", error=str(exc))   # this study only
                    continue
                raise                                   # the DSF is away: the row stays `submitting`
            except (ValueError, UserError) as exc:
                self.record.update(uid, status="failed", step="submit", error=str(exc))
                continue
            self._tasks[task["id"]] = task
            self.record.update(uid, status="submitted", task=task["id"], business_key=key or "")

    # -- following --------------------------------------------------------------------------
    def follow(self) -> None:
        """Where the in-flight studies are. The first look reads their Tasks and every work item
        since the oldest was authored; later looks ask only for the start Tasks, work items and result
        messages that changed since the last look (less a slack for clocks and commits), so that
        following a cohort costs the DSF about the same per look however many studies it holds."""
        from omi_dsf.client.progress import derive
        from omi_dsf.client.requests import business_key, result_messages, since_of, start_profile, topic_of, \
            work_items

        rows = self.record.with_status("submitted", "running")
        if not rows:
            return
        now = self.client.server_now()
        ids = {r["task"] for r in rows}
        for tid in sorted(ids - set(self._tasks)):          # adopted or resumed: not seen yet
            self._tasks[tid] = self.client.read("Task", tid)
        if self._looked is None:
            stamps = [since_of(self._tasks[t]) for t in ids]
            since = min(stamps) if all(stamps) else None
        else:
            since = dt.datetime.fromtimestamp(self._looked - LOOK_SLACK_S, dt.timezone.utc).isoformat()
            for task in self.client.search("Task", {"_profile": start_profile(), "_lastUpdated": f"ge{since}"}):
                if task.get("id") in ids:
                    self._tasks[task["id"]] = task
        for key, found in work_items(self.client, None, since).items():
            self._items.setdefault(key, {}).update((qr["id"], qr) for qr in found)
        self._answers.update(result_messages(self.client, None, since))
        self._looked = now
        topics = topic_of()
        changed = False
        for row in rows:
            uid = row["study_uid"]
            task = self._tasks[row["task"]]
            key = business_key(task) or ""
            p = derive(task, list(self._items.get(key, {}).values()), topics, self._answers.get(key))
            values = {"business_key": p.business_key or "", "step": p.current,
                      "result_location": p.outputs.get("result-location"),
                      "stored_study_uid": p.outputs.get("stored-study-instance-uid")}
            if p.task_status == "completed":
                values.update(status="completed", step="", error="")
            elif p.task_status == "failed":
                failed = next((s for s in p.steps if s.state == "failed"), None)
                step = failed.name if failed else "?"
                error = (failed.detail if failed else None) or p.error or "the process failed"
                values.update(status="refused" if step == REFUSING_STEP else "failed", step=step, error=error)
            else:
                values.update(status="running")
            if values["status"] in FINAL and row["status"] not in FINAL:
                self.finished_now += 1
            changed = self.record.update(uid, save=False, **values) or changed
        if changed:
            self.record.save()
        self._forget()

    def _forget(self) -> None:
        """Keep only what the studies still in flight need (a busy site's other requests, and
        finished ones, are dropped)."""
        from omi_dsf.client.requests import business_key

        live = {r["task"] for r in self.record.with_status("submitted", "running")}
        self._tasks = {t: task for t, task in self._tasks.items() if t in live}
        keys = {business_key(task) or "" for task in self._tasks.values()}
        if "" not in keys:                                 # every one's key known: the rest is not ours
            self._items = {k: v for k, v in self._items.items() if k in keys}
            self._answers = {k: v for k, v in self._answers.items() if k in keys}


def retry_failed(record: Record) -> int:
    """Failed studies (not those consent refused) back to pending; how many."""
    rows = record.with_status("failed")
    for r in rows:
        record.update(r["study_uid"], status="pending")
    return len(rows)
