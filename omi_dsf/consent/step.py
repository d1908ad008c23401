"""The `consent` step handler (worker contract: omi_dsf/worker/api.py).

Site configuration, `ctx.site["consent"]`:
    kind               "fhir" (MII Consent resources on a FHIR server), "folder" (JSON files),
                       or "gics" (TTP-FHIR gateway $isConsented)
    url                FHIR base (fhir) or the gateway's gICS base …/ttp-fhir/fhir/gics (gics)
    path               folder of <patient-id>.json (folder)
    identifier_system  system of the patient identifier (fhir, gics)
    domain             gICS consent domain (gics), e.g. "MII"
    purpose            default "external-ai-service"; codes: override the policy codes
Inputs: patient-identifier (required). Outputs: consent-reference (which consent permitted:
"Consent/<id>" or the gICS check), and where the work item asks for them consented, consent-reason.
A deny, including any error while checking, raises StepError with the reason.
"""

from __future__ import annotations

from omi_dsf.worker.api import Answers, StepContext, StepError

from .gics import GicsChecker
from .mii import Decision, evaluate_all
from .policy import UnknownPurposeError, codes_for
from .sources import ConsentLookupError, from_fhir_server, from_folder

IN_PATIENT = "patient-identifier"


def check(patient_id: str, cfg: dict) -> Decision:
    try:
        codes = codes_for(cfg.get("purpose", "external-ai-service"), cfg.get("codes"))
    except UnknownPurposeError as exc:
        return Decision(False, str(exc))
    kind = cfg.get("kind")
    try:
        if kind == "gics":
            checker = GicsChecker(cfg["url"], cfg["domain"], cfg["identifier_system"],
                                  timeout=float(cfg.get("timeout", 10.0)))
            return checker.check(patient_id, codes)
        if kind == "fhir":
            consents = from_fhir_server(cfg["url"], cfg["identifier_system"], patient_id,
                                        timeout=float(cfg.get("timeout", 10.0)))
        elif kind == "folder":
            consents = from_folder(cfg["path"], patient_id)
        else:
            return Decision(False, f"consent check not configured (kind {kind!r}; use fhir, folder or gics)")
    except KeyError as exc:
        return Decision(False, f"consent configuration lacks {exc.args[0]!r}")
    except ConsentLookupError as exc:
        return Decision(False, f"consent check failed: {exc}")
    return evaluate_all(consents, codes)


def consent(inputs: Answers, ctx: StepContext) -> Answers:
    patient_id = str(inputs.get(IN_PATIENT, "") or "").strip()
    if not patient_id:
        raise StepError(f"input {IN_PATIENT} is missing")
    try:
        decision = check(patient_id, dict(ctx.site.get("consent") or {}))
    except Exception as exc:  # an error while checking is a deny, never a pass
        decision = Decision(False, f"consent check failed ({type(exc).__name__})")
    ctx.log.info("consent for %s: %s", ctx.business_key, "permit" if decision.permitted else "deny")
    if not decision.permitted:
        raise StepError(f"consent denied: {decision.reason}")
    out = {"consent-reference": decision.reference, "consented": True, "consent-reason": decision.reason}
    return ctx.wanted(out)
