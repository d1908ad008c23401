"""Whether a patient's consent permits the configured purpose, from the site's consent settings
(`steps.consent`, omi_dsf.consent.config.ConsentSettings). A failed lookup is a deny with the
reason, never a pass.
"""

from __future__ import annotations

from .gics import GicsChecker
from .mii import Decision, evaluate_all
from .config import ConsentSettings
from .policy import codes_for
from .sources import ConsentLookupError, from_fhir_server, from_folder


def check(patient_id: str, cfg: ConsentSettings) -> Decision:
    codes = codes_for(cfg.purpose, cfg.codes)
    try:
        if cfg.kind == "gics":
            checker = GicsChecker(cfg.url, cfg.domain, cfg.identifier_system, timeout=cfg.timeout)
            return checker.check(patient_id, codes)
        if cfg.kind == "fhir":
            consents = from_fhir_server(cfg.url, cfg.identifier_system, patient_id, timeout=cfg.timeout)
        else:
            consents = from_folder(cfg.path, patient_id)
    except ConsentLookupError as exc:
        return Decision(False, f"consent check failed: {exc}")
    return evaluate_all(consents, codes)
