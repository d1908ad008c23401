"""The `pseudonymize` step: de-identify and pseudonymize the study (omi_dsf.deid).

Site configuration, `ctx.site.pseudonymization` (omi_dsf.deid.config.PseudonymizationSettings: domain,
key_file, store, provider, options, source, sink, on_refused_instance, pixel_recipes) and
`ctx.site.gateway_url` (the default URL of a dicomweb source or sink). A refused instance is
reported in the outputs, the audit trail and the log.
Inputs: study-instance-uid (required), patient-identifier (optional; checked against the files).
Outputs: pseudonym, pseudonymized-study-instance-uid, instance-count, refused-instance-count,
refused-instances, pseudonymized-study-location (where the sink put the study: a folder, or a
DICOMweb store's …/studies; the send step reads it from there), and where the work item asks for
it byte-count (only the work item's output items are answered).
"""

from __future__ import annotations

from omi_dsf.audit import trail
from omi_dsf.deid import instance_io
from omi_dsf.deid.keys import KeyError_, load_key
from omi_dsf.deid.pipeline import StudyPseudonymizer
from omi_dsf.deid.config import PseudonymizationSettings
from omi_dsf.deid.profile import parse_options
from omi_dsf.deid.pseudonyms import UnknownPseudonymError, make_provider
from omi_dsf.deid.pseudonyms.factory import ConfigError
from omi_dsf.deid.refusal import Refused
from omi_dsf.deid.store import SiteStore
from omi_dsf.steps.api import Answers, StepContext, StepError, Timings, text_input
from omi_dsf.steps.settings import StepSettings

IN_STUDY = "study-instance-uid"
IN_PATIENT = "patient-identifier"


def pseudonymization_settings(site: StepSettings) -> PseudonymizationSettings:
    """The site's `pseudonymization` settings (send and return read them too)."""
    if site.pseudonymization is None:
        raise StepError("site configuration steps.pseudonymization is missing")
    return site.pseudonymization


def pseudonymize(inputs: Answers, ctx: StepContext) -> Answers:
    t = Timings()
    study_uid = text_input(inputs, IN_STUDY)
    patient_id = text_input(inputs, IN_PATIENT, required=False) or None
    cfg = pseudonymization_settings(ctx.site)
    if cfg.source is None or cfg.sink is None:
        raise StepError("site configuration steps.pseudonymization needs source and sink")
    try:
        key = load_key(cfg.key_file)
    except KeyError_ as exc:
        raise StepError(str(exc)) from None
    params = {"study_uid": study_uid, "business_key": ctx.business_key, "gateway_url": ctx.site.gateway_url or ""}
    store = SiteStore(cfg.store)
    sink = None
    try:
        provider = make_provider(cfg.provider, key, store)
        source = instance_io.open_source(cfg.source, params)
        sink = instance_io.open_sink(cfg.sink, params)
        run = StudyPseudonymizer(key=key, domain=cfg.domain, provider=provider, store=store,
                                 options=parse_options(cfg.options), expect_patient_id=patient_id,
                                 expect_study_uid=study_uid, policy=cfg.on_refused_instance,
                                 pixel_recipes=cfg.pixel_recipes)
        written = 0
        # number the instances: file names may carry patient names, and errors go to the Task
        numbered = ((f"instance {n}", item) for n, (_, item) in enumerate(t.timed("read", source), 1))
        for out in t.timed("deid", run.process(numbered)):
            with t.phase("write"):
                written += sink.write(out.dataset, out.data)
        refused = [str(r) for r in run.result.refused]
        if run.result.instances == 0:
            if refused:
                raise StepError(f"no instance of the study could be sent: {len(refused)} refused; "
                                f"the first: {refused[0]}")
            raise StepError("no instances of the study found in the source")
        with t.phase("sync"):
            store.sync()  # the UID map is durable before the step reports success
        with t.phase("write"):
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
    t.seconds["deid"] = t.seconds.get("deid", 0.0) - t.seconds.get("read", 0.0)  # waiting for the source apart
    t.finish()
    ctx.log.info("pseudonymized %d instances (%d bytes) for %s", run.result.instances, written,
                 ctx.business_key)
    ctx.log.info("pseudonymize %s: timings %s", ctx.business_key, t.summary())
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
    if ctx.site.audit:
        audit_trail = trail(str(ctx.site.audit))
        for line in refused:
            audit_trail.record(ctx.business_key, "instance-refused", ctx.site.actor or "omi-worker",
                               item_id=ctx.item_id or None, attempt=ctx.attempt,
                               pseudonymized_study_uid=pseudo_study_uid, error=line)
