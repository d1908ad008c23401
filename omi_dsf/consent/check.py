"""Whether a patient's consent permits the configured purpose, from the site's consent settings.

Settings (`steps.consent` in the site YAML):
    kind               "fhir" (MII Consent resources on a FHIR server), "folder" (JSON files),
                       or "gics" (TTP-FHIR gateway $isConsented)
    url                FHIR base (fhir) or the gateway's gICS base …/ttp-fhir/fhir/gics (gics)
    path               folder of <patient-id>.json (folder)
    identifier_system  system of the patient identifier (fhir, gics)
    domain             gICS consent domain (gics), e.g. "MII"
    purpose            default "external-ai-service"; codes: override the policy codes
A configuration error or a failed lookup is a deny with the reason, never a pass.
"""

from __future__ import annotations

from .gics import GicsChecker
from .mii import Decision, evaluate_all
from .policy import UnknownPurposeError, codes_for
from .sources import ConsentLookupError, from_fhir_server, from_folder


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

