"""The step handlers: one module per work item topic, on the contract in `api.py`.

  consent       consent.py       the patient's consent for the external AI service
  prepare       prepare.py       where the study goes: its pseudonymized UID and location at the provider's
                                 gateway, before anything is read (send derives them the same way)
  send          send.py          the study, instance by instance: de-identification (omi_dsf.deid),
                                 leak check, STOW-RS to the provider's gateway (omi_dsf.transfer)
  infer         infer.py         provider: study → AI service → SEG + SR (omi_dsf.inference)
  return        return_.py       results back, re-identified, into the PACS (omi_dsf.transfer)
  (any)         demo.py          answers every item without touching data (`worker --demo`)

Each step module reads the work item's inputs and the site's `steps:` settings, calls the domain
packages and turns their errors into StepError (the requester must fix something) or lets them
propagate (transient: the runtime retries). The worker runtime loads them by name from HANDLERS,
at start, so that a step's heavy imports cost nothing to a worker that does not run it.
"""

from __future__ import annotations

import importlib

from omi_dsf.errors import UserError
from omi_dsf.steps.api import Handler

# topic -> "module:function"; a site's `handlers:` may name another for a topic
HANDLERS = {
    "consent": "omi_dsf.steps.consent:consent",
    "prepare": "omi_dsf.steps.prepare:prepare",
    "send": "omi_dsf.steps.send:send",
    "infer": "omi_dsf.steps.infer:infer",
    "return": "omi_dsf.steps.return_:return_results",
}
DEMO_HANDLER = "omi_dsf.steps.demo:demo_step"


def load_handler(ref: str) -> Handler:
    module, _, name = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"handler '{ref}' cannot be loaded: {exc}") from exc
