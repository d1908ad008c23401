"""What a step handler sees: the contract between the worker runtime and the steps.

A handler is a plain callable registered per topic (consent, pseudonymize, send, infer,
return). It receives the work item's input answers and a context, and returns the output
answers. A `StepError` is a business failure with a message fit for the requester's Task
(never patient data); any other exception counts as a transient failure and is retried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

Answers = Mapping[str, str | int | bool | float]


class StepError(Exception):
    """The step cannot succeed with these inputs; retrying will not help."""


class RetryableStepError(Exception):
    """A failure worth retrying (a peer down, a timeout) whose message is fit for the requester's
    Task: after the last attempt the runtime reports it instead of just the exception's type."""


@dataclass(frozen=True)
class StepContext:
    topic: str                  # e.g. "pseudonymize"
    business_key: str           # the DSF process instance's business key
    site: Mapping[str, Any]     # the site configuration (gateway URL, pseudonym domain, …)
    attempt: int = 1
    outputs: tuple[str, ...] = ()   # the work item's output items (besides error)
    item_id: str = ""               # the QuestionnaireResponse id, for idempotency keys
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("omi_dsf.step"))


Handler = Callable[[Answers, StepContext], Answers]
