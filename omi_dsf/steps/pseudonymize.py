"""The `pseudonymize` step: de-identify and pseudonymize the study (omi_dsf.deid).

Site configuration, `ctx.site["pseudonymization"]`:
    domain       pseudonym domain (required)
    key_file     file with the site key (else $OMI_DEID_KEY_FILE / $OMI_DEID_KEY)
    store        the site's UID map (removed attributes, embedded pseudonyms): a SQLite file or a
                 postgresql:// URL shared by workers on several hosts (omi_dsf/database.py)
    provider     {"kind": "embedded"} | {"kind": "gpas", "wsdl": …} | {"kind": "ttp-fhir", "url": …}
    options      list of option names (see profile.OPTION_NAMES)
    source       {"kind": "folder", "path": ".../{study_uid}"} | {"kind": "dicomweb", "url": …}
                 (WADO-RS; url defaults to the site's gateway_url) | a kind another part registered
    sink         {"kind": "folder", "path": ".../{business_key}"} | {"kind": "dicomweb", "url": …}
    on_refused_instance   "refuse-study" (default): one instance that cannot be de-identified
                 safely stops the study; "send-rest": it is left out, the rest is sent, and each
                 refused instance is reported (outputs, audit trail, log)
    pixel_recipes  extra pixel-cleaning recipe files (see pixels.py) besides the shipped one
Inputs: study-instance-uid (required), patient-identifier (optional; checked against the files).
Outputs: pseudonym, pseudonymized-study-instance-uid, instance-count, refused-instance-count,
refused-instances, pseudonymized-study-location (where the sink put the study: a folder, or a
DICOMweb store's …/studies; the send step reads it from there), and where the work item asks for
it byte-count (only the work item's output items are answered).
"""

from __future__ import annotations

from typing import Any, Mapping

from omi_dsf.audit import trail
from omi_dsf.deid import instance_io
from omi_dsf.deid.keys import KeyError_, load_key
from omi_dsf.deid.pipeline import StudyPseudonymizer
from omi_dsf.deid.profile import UnknownOptionError, parse_options
from omi_dsf.deid.pseudonyms import UnknownPseudonymError, make_provider
from omi_dsf.deid.pseudonyms.factory import ConfigError
from omi_dsf.deid.refusal import Refused
from omi_dsf.deid.store import SiteStore
from omi_dsf.steps.api import Answers, StepContext, StepError, text_input

IN_STUDY = "study-instance-uid"
IN_PATIENT = "patient-identifier"


def pseudonymization_settings(site: Mapping[str, Any]) -> tuple[dict, str]:
    """The site's `pseudonymization` settings (send and return read them too) and its domain."""
    cfg = dict(site.get("pseudonymization") or {})
    if not cfg.get("domain"):
        raise StepError("site configuration pseudonymization.domain is missing")
    return cfg, str(cfg["domain"])


def pseudonymize(inputs: Answers, ctx: StepContext) -> Answers:
    study_uid = text_input(inputs, IN_STUDY)
    patient_id = text_input(inputs, IN_PATIENT, required=False) or None
    cfg, _ = pseudonymization_settings(ctx.site)
    try:
        options = parse_options(cfg.get("options") or ())
        key = load_key(cfg.get("key_file"))
    except (UnknownOptionError, KeyError_) as exc:
        raise StepError(str(exc)) from None
    params = {"study_uid": study_uid, "business_key": ctx.business_key,
              "gateway_url": ctx.site.get("gateway_url", "")}
    store = SiteStore(cfg.get("store", "omi-site.sqlite"))
    sink = None
    try:
        provider = make_provider(cfg.get("provider"), key, store)
        source = instance_io.open_source(cfg.get("source") or {}, params)
        sink = instance_io.open_sink(cfg.get("sink") or {}, params)
        run = StudyPseudonymizer(key=key, domain=cfg["domain"], provider=provider, store=store,
                                 options=options, expect_patient_id=patient_id,
                                 expect_study_uid=study_uid,
                                 policy=cfg.get("on_refused_instance") or "refuse-study",
                                 pixel_recipes=cfg.get("pixel_recipes") or ())
        written = 0
        # number the instances: file names may carry patient names, and errors go to the Task
        numbered = ((f"instance {n}", item) for n, (_, item) in enumerate(source, 1))
        for out in run.process(numbered):
            written += sink.write(out.dataset, out.data)
        refused = [str(r) for r in run.result.refused]
        if run.result.instances == 0:
            if refused:
                raise StepError(f"no instance of the study could be sent: {len(refused)} refused; "
                                f"the first: {refused[0]}")
            raise StepError("no instances of the study found in the source")
        store.sync()  # the UID map is durable before the step reports success
        location = sink.close()
    except FileNotFoundError:
        if sink is not None:
            sink.abort()
        raise StepError("the study was not found in the configured source") from None
    except (Refused, UnknownPseudonymError, ConfigError, ValueError,
            instance_io.SourceError, instance_io.SinkError) as exc:
        if sink is not None:
            sink.abort()
        raise StepError(str(exc)) from None
    except BaseException:
        if sink is not None:
            sink.abort()
        raise  # e.g. the pseudonym service is down: transient, the runtime retries
    finally:
        store.close()
    ctx.log.info("pseudonymized %d instances (%d bytes) for %s", run.result.instances, written,
                 ctx.business_key)
    _report_refused(ctx, refused, run.result.pseudo_study_uid)
    out = {
        "pseudonym": run.result.pseudonym,
        "pseudonymized-study-instance-uid": run.result.pseudo_study_uid,
        "instance-count": run.result.instances,
        "refused-instance-count": len(refused),
        "refused-instances": refused_text(refused) or None,
        "byte-count": written,
        "pseudonymized-study-location": location,
    }
    return ctx.wanted(out)


REFUSED_LINES_MAX = 50   # the work item's answer stays readable; the audit trail has every line


def refused_text(refused: list[str]) -> str:
    """One line per refused instance (at most REFUSED_LINES_MAX, then how many more)."""
    lines = refused[:REFUSED_LINES_MAX]
    if len(refused) > REFUSED_LINES_MAX:
        lines.append(f"... and {len(refused) - REFUSED_LINES_MAX} more (see the site's audit trail)")
    return "\n".join(lines)


def _report_refused(ctx: StepContext, refused: list[str], pseudo_study_uid: str) -> None:
    """Each refused instance in the step's log and, where the site keeps one, its audit trail.
    The lines name instances by number and pseudonymized UID only: no patient data."""
    if not refused:
        return
    ctx.log.warning("%d instance(s) refused and not sent for %s (policy send-rest)", len(refused),
                    ctx.business_key)
    for line in refused:
        ctx.log.warning("refused %s", line)
    if ctx.site.get("audit"):
        audit_trail = trail(str(ctx.site["audit"]))
        for line in refused:
            audit_trail.record(ctx.business_key, "instance-refused", str(ctx.site.get("actor") or "omi-worker"),
                               item_id=ctx.item_id or None, attempt=ctx.attempt,
                               pseudonymized_study_uid=pseudo_study_uid, error=line)
