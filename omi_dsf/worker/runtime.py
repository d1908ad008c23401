"""The worker runtime: find work items of our topics, claim, run the step, answer, complete.

poll → claim → handle → complete, with:
- discovery by search (always, every poll interval: the catch-up) and by websocket notification
  (when the server pushes: sub-second pickup);
- a lease per item, renewed while the handler runs, so workers of one site never run an item at
  the same time and a crashed worker's item is taken over when its lease expires;
- retries with exponential backoff for unexpected failures, then a clear error answer so that the
  process ends with that error on its start Task instead of waiting forever;
- logs that name the business key and the item, never the inputs (they may be patient data).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping

from omi_dsf.dsf.client import DsfClient
from omi_dsf.dsf.errors import DsfAuthError, DsfConflict, DsfError, DsfNotFound, DsfValidationError
from omi_dsf.dsf.workitem import WorkItem
from omi_dsf.errors import RetryableError
from omi_dsf.steps.api import Handler, StepContext, StepError, StepWithdrawn
from omi_dsf.steps.settings import StepSettings, step_settings
from omi_dsf.worker.lease import LeaseStore

log = logging.getLogger("omi_dsf.worker")

SUBSCRIPTION_CRITERIA = "QuestionnaireResponse?status=in-progress"


@dataclass
class WorkerSettings:
    topics: Mapping[str, str]                  # topic -> Questionnaire url|version
    lease_ttl: float = 60.0
    max_attempts: int = 3
    backoff: float = 2.0                       # first retry after this many seconds, then doubling
    poll_interval: float = 10.0
    websocket: bool = True
    concurrency: int = 8                       # items one worker process handles at once
    # The DSF creates a work item inside the BPE's transaction; answered before that commits, the
    # BPE cannot find its user task and drops the answer. So an item is answered only this old
    # (measured on the 2-core test bed: 6 of 200 answers dropped at 0 s, none of 300 at 0.1 s nor
    # of 500 at 0.25 s; docs/testbed.md).
    settle: float = 0.3
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}")


@dataclass
class Outcome:
    item_id: str
    business_key: str
    topic: str
    status: str               # completed | failed | skipped | withdrawn | stuck
    attempts: int = 0


WITHDRAWN_CHECK_S = 5.0    # how often a running step's work item is looked at (withdrawn meanwhile?)


class _Heartbeat(threading.Thread):
    """While its handler runs: renews the lease (notes when it was lost), and looks whether the work
    item is still open (sets `withdrawn` when the plugin stopped it: the process no longer waits)."""

    def __init__(self, leases: LeaseStore, item_id: str, owner: str, ttl: float,
                 still_open: Callable[[], bool] | None = None):
        super().__init__(daemon=True)
        self.leases, self.item_id, self.owner, self.ttl = leases, item_id, owner, ttl
        self.still_open = still_open
        self.stop = threading.Event()
        self.withdrawn = threading.Event()
        self.lost = False

    def run(self) -> None:
        tick = min(self.ttl / 3, WITHDRAWN_CHECK_S)
        renew_at = time.monotonic() + self.ttl / 3
        while not self.stop.wait(tick):
            if time.monotonic() >= renew_at:
                if not self.leases.renew(self.item_id, self.owner, self.ttl):
                    self.lost = True
                    return
                renew_at = time.monotonic() + self.ttl / 3
            if self.still_open is not None and not self.withdrawn.is_set():
                try:
                    if not self.still_open():
                        self.withdrawn.set()
                except Exception:  # noqa: BLE001 - the server away for a moment: look again next tick
                    pass


class Worker:
    def __init__(self, client: DsfClient, leases: LeaseStore, handlers: Mapping[str, Handler],
                 settings: WorkerSettings, site: StepSettings | Mapping | None = None, audit=None, actor: str = ""):
        unknown = sorted(set(handlers) - set(settings.topics))
        if unknown:
            raise ValueError(f"no work item topic(s) {unknown}; known: {sorted(settings.topics)}")
        self.client, self.leases, self.handlers, self.settings = client, leases, dict(handlers), settings
        # the site's `steps:` settings (a mapping: validated here, relative paths from the working directory)
        self.site = site if isinstance(site, StepSettings) else step_settings(site)
        self.by_questionnaire = {settings.topics[t]: t for t in self.handlers}
        self.notified: queue.Queue[str] = queue.Queue()
        self.stopping = threading.Event()
        self.outcomes: list[Outcome] = []
        self._inflight: set[str] = set()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(settings.concurrency)
        self.audit, self.actor = audit, actor or settings.owner

    # -- discovery --------------------------------------------------------------------------

    def search(self) -> list[dict]:
        found = []
        for questionnaire in self.by_questionnaire:
            found += list(self.client.search("QuestionnaireResponse",
                                             {"status": "in-progress", "questionnaire": questionnaire, "_sort": "_lastUpdated"}))
        return found

    def _listen(self) -> None:
        """Websocket listener thread: pushes ids of in-progress items; reconnects with backoff."""
        delay = 1.0
        while not self.stopping.is_set():
            try:
                sub = self.client.find_or_create_subscription(SUBSCRIPTION_CRITERIA)

                async def consume():
                    async for res in self.client.notifications(sub):
                        if self.stopping.is_set():
                            return
                        if res and res.get("resourceType") == "QuestionnaireResponse" \
                                and res.get("questionnaire") in self.by_questionnaire and res.get("status") == "in-progress":
                            self.notified.put(res["id"])

                log.info("websocket: listening for work items")
                delay = 1.0
                asyncio.run(consume())
            except Exception as exc:  # noqa: BLE001 - polling goes on; reconnect later
                log.warning("websocket: %s: %s; polling continues, reconnect in %.0fs", type(exc).__name__, exc, delay)
            self.stopping.wait(delay)
            delay = min(delay * 2, 30)

    # -- one item -------------------------------------------------------------------------

    def process(self, resource: dict) -> Outcome | None:
        item = WorkItem(resource)
        topic = self.by_questionnaire.get(item.questionnaire)
        if topic is None or item.status != "in-progress" or self.leases.is_done(item.id):
            return None
        s = self.settings
        attempt = self.leases.claim(item.id, s.owner, s.lease_ttl)
        if attempt is None:
            return None          # another worker holds it
        # re-read: the search result may be stale, and the If-Match needs the current version
        try:
            item = WorkItem(self.client.read("QuestionnaireResponse", item.id))
        except DsfNotFound:
            self.leases.finish(item.id, s.owner)
            return None
        if item.status != "in-progress":
            self.leases.finish(item.id, s.owner)
            return None
        log.info("work item %s (%s, business key %s): claimed, attempt %d", item.id, topic, item.business_key, attempt)
        beat = _Heartbeat(self.leases, item.id, s.owner, s.lease_ttl, still_open=lambda: self._open(item.id))
        beat.start()
        try:
            outputs, error = self._run(topic, item, attempt, beat.withdrawn)
        except StepWithdrawn:
            beat.stop.set()
            log.info("work item %s (%s, business key %s): withdrawn while running; the process no longer "
                     "waits for it, step stopped", item.id, topic, item.business_key)
            self.leases.finish(item.id, s.owner)
            outcome = Outcome(item.id, item.business_key, topic, "withdrawn", attempt)
            self.outcomes.append(outcome)
            return outcome
        except BaseException:
            beat.stop.set()
            self.leases.release(item.id, s.owner)     # SIGKILL aside, give it back at once
            raise
        beat.stop.set()
        if beat.lost:
            log.warning("work item %s: lease lost while running; leaving it to its new owner", item.id)
            return None
        outcome = self._complete(topic, item, outputs, error, attempt)
        self.outcomes.append(outcome)
        return outcome

    def _open(self, item_id: str) -> bool:
        """Whether the work item still waits for an answer (the plugin stops it when its user task
        ends unanswered)."""
        return self.client.read("QuestionnaireResponse", item_id).get("status") == "in-progress"

    def _run(self, topic: str, item: WorkItem, first_attempt: int,
             withdrawn: threading.Event | None = None) -> tuple[dict, str | None]:
        s, handler = self.settings, self.handlers[topic]
        outputs_wanted = tuple(i for i in item.item_ids if i not in item.inputs and i != "error")
        attempt = first_attempt
        if attempt > s.max_attempts:   # earlier holders crashed or were killed on every attempt
            return {}, f"{topic}: gave up after {attempt - 1} attempts"
        while True:
            ctx = StepContext(topic=topic, business_key=item.business_key, site=self.site, attempt=attempt,
                              outputs=outputs_wanted, item_id=item.id,
                              log=logging.getLogger(f"omi_dsf.step.{topic}"),
                              withdrawn=withdrawn or threading.Event())
            try:
                answers = dict(handler(item.inputs, ctx) or {})
                # a handler may say more than this work item asks (other processes ask more)
                return {k: v for k, v in answers.items() if k in outputs_wanted}, None
            except StepError as exc:
                log.info("work item %s (%s, business key %s): step error", item.id, topic, item.business_key)
                return {}, f"{topic}: {exc}"
            except StepWithdrawn:
                raise
            except Exception as exc:  # noqa: BLE001 - any other failure is retried
                log.warning("work item %s (%s, business key %s): attempt %d failed: %s",
                            item.id, topic, item.business_key, attempt, type(exc).__name__)
                if attempt >= s.max_attempts:
                    if isinstance(exc, RetryableError):   # its message is meant for the Task
                        return {}, f"{topic}: {exc} (after {attempt} attempts)"
                    return {}, f"{topic}: failed after {attempt} attempts ({type(exc).__name__})"
                if self.stopping.wait(s.backoff * 2 ** (attempt - 1)):
                    raise KeyboardInterrupt("worker stopping") from exc
                ctx.check_withdrawn()   # no retry of a step nobody waits for
                attempt += 1

    def _settle(self, item: WorkItem) -> None:
        updated = (item.resource.get("meta") or {}).get("lastUpdated")
        if not updated:
            return
        created = dt.datetime.fromisoformat(updated.replace("Z", "+00:00")).timestamp()
        wait = created + self.settings.settle - self.client.server_now()
        if wait > 0:
            time.sleep(min(wait, self.settings.settle))

    def _complete(self, topic: str, item: WorkItem, outputs: dict, error: str | None, attempt: int) -> Outcome:
        s = self.settings
        self._settle(item)
        # recorded before the answer: a worker that dies between answering and recording would leave
        # a step done without its record (another worker never sees an answered item); a retry after
        # a failed answer records again, so the trail holds each step at least once
        self._record(item, topic, error, attempt)
        try:
            try:
                self.client.update(item.completed(outputs, error))
            except (ValueError, DsfValidationError, DsfAuthError) as exc:
                current = self.client.read("QuestionnaireResponse", item.id)
                if current.get("status") == "stopped":
                    # withdrawn by the plugin: its user task ended unanswered (its timeout, or the
                    # process ended meanwhile, e.g. an error answer while a parallel step ran)
                    log.info("work item %s (%s, business key %s): withdrawn meanwhile; the process no longer "
                             "waits for it, answer dropped", item.id, topic, item.business_key)
                    self.leases.finish(item.id, s.owner)
                    return Outcome(item.id, item.business_key, topic, "withdrawn", attempt)
                if current.get("status") != "in-progress":
                    # an earlier answer of ours did arrive (e.g. its reply was lost in a restart)
                    log.info("work item %s: already completed; nothing more to do", item.id)
                    self.leases.finish(item.id, s.owner)
                    return Outcome(item.id, item.business_key, topic, "skipped", attempt)
                # answers the server refuses (the DSF answers 403 to a response that breaks its
                # Questionnaire) must not leave the process waiting: report that instead
                log.error("work item %s: answers refused: %s; completing with an error", item.id, exc)
                error = f"{topic}: the DSF refused the step's answers ({getattr(exc, 'status', None) or 'invalid'})"
                self._record(item, topic, error, attempt)
                self.client.update(item.completed({}, error))
        except DsfConflict:
            log.info("work item %s: changed by someone else meanwhile; not ours any more", item.id)
            self.leases.finish(item.id, s.owner)
            return Outcome(item.id, item.business_key, topic, "skipped", attempt)
        except (DsfAuthError, DsfValidationError) as exc:
            # not even the error answer is accepted: retrying cannot help; the step's timeout ends it
            log.error("work item %s (business key %s): cannot be completed: %s", item.id, item.business_key, exc)
            self.leases.finish(item.id, s.owner)
            return Outcome(item.id, item.business_key, topic, "stuck", attempt)
        except DsfError:
            self.leases.release(item.id, s.owner)   # server unreachable: someone retries later
            raise
        self.leases.finish(item.id, s.owner)
        status = "failed" if error else "completed"
        log.info("work item %s (%s, business key %s): %s", item.id, topic, item.business_key, status)
        return Outcome(item.id, item.business_key, topic, status, attempt)

    def _record(self, item: WorkItem, topic: str, error: str | None, attempt: int) -> None:
        if self.audit is not None:
            self.audit.record(item.business_key, f"step-{'failed' if error else 'completed'}", self.actor,
                              item_id=item.id, outcome=topic, attempt=attempt, error=error)

    # -- loop -----------------------------------------------------------------------------

    def _dispatch(self, pool: ThreadPoolExecutor, resource: dict) -> bool:
        """Hand an item to the pool unless this worker already runs it or is full."""
        rid = resource.get("id")
        with self._lock:
            if not rid or rid in self._inflight:
                return False
            self._inflight.add(rid)
        # wait for a free slot rather than drop the item: a notification is not sent twice
        while not self._slots.acquire(timeout=0.5):
            if self.stopping.is_set():
                with self._lock:
                    self._inflight.discard(rid)
                return False
        pool.submit(self._guarded, resource)
        return True

    def _guarded(self, resource: dict) -> None:
        try:
            self.process(resource)
        except DsfError as exc:
            # server down or restarting: the item stays in-progress and is found again later
            log.warning("DSF FHIR server: %s; the item will be retried", exc)
        except Exception:  # noqa: BLE001 - a bug in one item must not stop the worker
            log.exception("work item %s: unexpected error", resource.get("id"))
        finally:
            with self._lock:
                self._inflight.discard(resource.get("id"))
            self._slots.release()

    def poll_once(self, pool: ThreadPoolExecutor | None = None) -> int:
        """Dispatch every in-progress item of our topics (processed inline without a pool)."""
        handled = 0
        for resource in self.search():
            if self.stopping.is_set():
                break
            if pool is None:
                handled += 1 if self.process(resource) else 0
            elif self._dispatch(pool, resource):
                handled += 1
        return handled

    def run(self, max_items: int | None = None, idle_exit: float | None = None) -> None:
        """Work until stop() (or max_items done, or idle for idle_exit seconds); on stop, the items
        being handled are finished before it returns."""
        if self.settings.websocket:
            threading.Thread(target=self._listen, name="omi-ws", daemon=True).start()
        next_poll, last_work = 0.0, time.monotonic()
        with ThreadPoolExecutor(max_workers=self.settings.concurrency, thread_name_prefix="omi-item") as pool:
            while not self.stopping.is_set():
                try:
                    if time.monotonic() >= next_poll:
                        if self.poll_once(pool):
                            last_work = time.monotonic()
                        next_poll = time.monotonic() + self.settings.poll_interval
                    try:
                        item_id = self.notified.get(timeout=max(0.05, min(1.0, next_poll - time.monotonic())))
                    except queue.Empty:
                        item_id = None
                    if item_id and item_id not in self._inflight:
                        try:
                            if self._dispatch(pool, self.client.read("QuestionnaireResponse", item_id)):
                                last_work = time.monotonic()
                        except DsfNotFound:
                            pass
                except DsfError as exc:
                    # server down or restarting: keep trying, lose nothing (items stay in-progress)
                    log.warning("DSF FHIR server: %s; retrying", exc)
                    self.stopping.wait(min(self.settings.poll_interval, 5))
                if max_items is not None and len(self.outcomes) >= max_items:
                    break
                if self._inflight:
                    last_work = time.monotonic()
                if idle_exit is not None and time.monotonic() - last_work > idle_exit:
                    break
            self.stopping.set()

    def stop(self) -> None:
        self.stopping.set()
