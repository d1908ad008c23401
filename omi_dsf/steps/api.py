"""What a step handler sees: the contract between the worker runtime and the steps.

A handler is a plain callable registered per topic (consent, send, infer,
return; omi_dsf.steps.HANDLERS). It receives the work item's input answers and a context, and
returns the output answers. A `StepError` is a business failure with a message fit for the
requester's Task (never patient data); any other exception counts as a transient failure and is
retried (an `omi_dsf.errors.RetryableError` also has a message fit for the Task). The step
modules turn the domain packages' errors into these.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

from omi_dsf.audit import certificate_subject, trail
from omi_dsf.steps.settings import StepSettings, step_settings

T = TypeVar("T")

Answers = Mapping[str, str | int | bool | float]


class StepError(Exception):
    """The step cannot succeed with these inputs; retrying will not help."""


class StepWithdrawn(Exception):
    """The work item was withdrawn while the step ran (its process no longer waits for it): stop,
    answer nothing."""


@dataclass(frozen=True)
class StepContext:
    topic: str                  # e.g. "send"
    business_key: str           # the DSF process instance's business key
    site: StepSettings          # the site's `steps:` settings (a mapping is validated into them)
    attempt: int = 1
    outputs: tuple[str, ...] = ()   # the work item's output items (besides error)
    item_id: str = ""               # the QuestionnaireResponse id, for idempotency keys
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("omi_dsf.step"))
    withdrawn: threading.Event = field(default_factory=threading.Event)   # set by the runtime

    def check_withdrawn(self) -> None:
        """Raises StepWithdrawn once the runtime saw the work item withdrawn; a long step calls it
        between its pieces of work (send: before each instance)."""
        if self.withdrawn.is_set():
            raise StepWithdrawn(f"{self.topic}: work item withdrawn")

    def __post_init__(self) -> None:
        if not isinstance(self.site, StepSettings):   # a caller outside the worker (tests, tools)
            object.__setattr__(self, "site", step_settings(self.site))

    def wanted(self, answers: Mapping[str, Any]) -> dict:
        """The answers this work item has items for (all of them when no outputs are given, as
        when a step is called outside the runtime)."""
        return {k: v for k, v in answers.items() if not self.outputs or k in self.outputs}


Handler = Callable[[Answers, StepContext], Answers]


def step_errors(*domain_errors: type[Exception]) -> Callable[[Handler], Handler]:
    """Decorates a handler: the domain errors given (failures retrying cannot fix, with a message
    fit for the Task) become StepError; everything else passes as it is."""
    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(inputs: Answers, ctx: StepContext) -> Answers:
            try:
                return handler(inputs, ctx)
            except domain_errors as exc:
                raise StepError(str(exc)) from None
        return run
    return decorate


def text_input(inputs: Answers, code: str, required: bool = True) -> str:
    """The input `code` as stripped text; StepError when it is required and missing or empty."""
    value = str(inputs.get(code, "") or "").strip()
    if required and not value:
        raise StepError(f"input {code} is missing")
    return value


def audit(ctx: StepContext, action: str, client_cert: str | None = None, **details) -> None:
    """One event in the site's audit trail (`ctx.site.audit`, set by the worker; none: nothing),
    naming `ctx.site.actor`, else the subject of `client_cert`, else "omi-worker"."""
    path = ctx.site.audit
    if not path:
        return
    actor = ctx.site.actor
    if not actor and client_cert:
        actor = certificate_subject(client_cert)
    trail(str(path)).record(ctx.business_key, action, str(actor or "omi-worker"), item_id=ctx.item_id or None,
                            attempt=ctx.attempt, **details)


class Timings:
    """Seconds per phase of one step run, in the order the phases ran, for the step's log line
    (numbers only: phase names and seconds, nothing about the patient or the study). "total" is
    the step's wall time; `overlapped` holds work done in the background meanwhile (the infer
    step builds its SEG while the model runs; its "model" is the AI service's own compute time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.overlapped: dict[str, float] = {}
        self._alongside: dict[str, str] = {}
        self._start = time.perf_counter()

    def background(self, name: str, fn, *args, alongside: str = "the model", **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._alongside[name] = alongside
            self.overlapped[name] = time.perf_counter() - start

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def timed(self, name: str, items: Iterable[T]) -> Iterator[T]:
        """`items`, the time spent waiting for each one added to phase `name`."""
        found = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(found)
            except StopIteration:
                return
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            yield item

    def finish(self) -> None:
        self.seconds["total"] = time.perf_counter() - self._start  # wall time of the whole step

    def summary(self) -> str:
        return ", ".join([f"{k} {v:.2f} s" for k, v in self.seconds.items()]
                         + [f"{k} {v:.2f} s (alongside {self._alongside.get(k, 'the model')})"
                            for k, v in self.overlapped.items()])

