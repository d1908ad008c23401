"""The `consent` step: does the patient's consent permit use by an external AI service?

Site configuration, `ctx.site.consent` (omi_dsf.consent.config.ConsentSettings).
Inputs: patient-identifier (required). Outputs: consent-reference (which consent permitted:
"Consent/<id>" or the gICS check), and where the work item asks for them consented, consent-reason.
A deny, including any error while checking, raises StepError with the reason.
"""

from __future__ import annotations

from omi_dsf.consent.check import check
from omi_dsf.consent.mii import Decision
from omi_dsf.steps.api import Answers, StepContext, StepError, text_input

IN_PATIENT = "patient-identifier"


def consent(inputs: Answers, ctx: StepContext) -> Answers:
    patient_id = text_input(inputs, IN_PATIENT)
    if ctx.site.consent is None:
        raise StepError("consent denied: consent check not configured (steps.consent)")
    try:
        decision = check(patient_id, ctx.site.consent)
    except Exception as exc:  # an error while checking is a deny, never a pass
        decision = Decision(False, f"consent check failed ({type(exc).__name__})")
    ctx.log.info("consent for %s: %s", ctx.business_key, "permit" if decision.permitted else "deny")
    if not decision.permitted:
        raise StepError(f"consent denied: {decision.reason}")
    out = {"consent-reference": decision.reference, "consented": True, "consent-reason": decision.reason}
    return ctx.wanted(out)
