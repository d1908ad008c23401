"""A step handler that proves the work-item loop without touching any data: it answers every
output with a value derived from the inputs, so a test can check each answer came from its item."""

from __future__ import annotations

import hashlib
import json
import os

from omi_dsf.spec.model import load_spec
from omi_dsf.steps.api import Answers, StepContext, StepError

_TYPES = {c.code: c.type for c in load_spec().codes.values()}


def fingerprint(topic: str, inputs: Answers) -> str:
    return hashlib.sha256(json.dumps([topic, sorted((k, str(v)) for k, v in inputs.items())]).encode()).hexdigest()[:16]


def demo_step(inputs: Answers, ctx: StepContext) -> Answers:
    # knobs for tests: slow down, or fail, through the site settings
    journal = ctx.site.demo_journal
    if journal:   # one line per execution, appended atomically: tests count executions per item
        with open(journal, "a") as f:
            f.write(f"{ctx.topic} {ctx.item_id} {ctx.business_key} {ctx.attempt}\n")
    if ctx.topic in ctx.site.demo_fail_topics:
        raise RuntimeError("demo handler told to fail")
    if ctx.topic in ctx.site.demo_deny_topics:
        raise StepError("denied by the demo handler")
    if str(inputs.get("patient-identifier")) in (ctx.site.demo_deny_patients.get(ctx.topic) or []):
        raise StepError("denied by the demo handler for this patient")
    delay = ctx.site.demo_delay or float(os.environ.get("OMI_DEMO_DELAY", 0))
    if delay:
        ctx.withdrawn.wait(delay)   # as a real step would, it stops when its work item is withdrawn
        ctx.check_withdrawn()
    fp = fingerprint(ctx.topic, inputs)
    return {o: (len(inputs) if _TYPES.get(o) == "integer" else f"{ctx.topic}-{fp}") for o in ctx.outputs}
