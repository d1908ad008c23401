"""The `pseudonymize` step handler (worker contract: omi_dsf/worker/api.py).

Site configuration, `ctx.site["pseudonymization"]`:
    domain       pseudonym domain (required)
    key_file     file with the site key (else $OMI_DEID_KEY_FILE / $OMI_DEID_KEY)
    store        SQLite file kept at the site (UID map, removed attributes, embedded pseudonyms)
    provider     {"kind": "embedded"} | {"kind": "gpas", "wsdl": …} | {"kind": "ttp-fhir", "url": …}
    options      list of option names (see profile.OPTION_NAMES)
    source       {"kind": "folder", "path": ".../{study_uid}"} | {"kind": "dicomweb", "url": …}
                 (WADO-RS; url defaults to the site's gateway_url) | a kind another part registered
    sink         {"kind": "folder", "path": ".../{business_key}"} | {"kind": "dicomweb", "url": …}
Inputs: study-instance-uid (required), patient-identifier (optional; checked against the files).
Outputs: pseudonym, pseudonymized-study-instance-uid, instance-count, and where the work item
asks for them byte-count, output-location (only the work item's output items are answered).
"""

from __future__ import annotations

from omi_dsf.worker.api import Answers, StepContext, StepError

from . import instance_io
from .keys import KeyError_, load_key
from .leakcheck import LeakError
from .pipeline import DeidError, StudyPseudonymizer
from .profile import UnknownOptionError, parse_options
from .pseudonyms import UnknownPseudonymError, make_provider
from .pseudonyms.factory import ConfigError
from .store import SiteStore

IN_STUDY = "study-instance-uid"
IN_PATIENT = "patient-identifier"


def pseudonymize(inputs: Answers, ctx: StepContext) -> Answers:
    cfg = dict(ctx.site.get("pseudonymization") or {})
    study_uid = str(inputs.get(IN_STUDY, "") or "").strip()
    if not study_uid:
        raise StepError(f"input {IN_STUDY} is missing")
    patient_id = str(inputs.get(IN_PATIENT, "") or "").strip() or None
    if not cfg.get("domain"):
        raise StepError("site configuration pseudonymization.domain is missing")
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
                                 expect_study_uid=study_uid)
        written = 0
        # number the instances: file names may carry patient names, and errors go to the Task
        numbered = ((f"instance {n}", item) for n, (_, item) in enumerate(source, 1))
        for out in run.process(numbered):
            written += sink.write(out.dataset, out.data)
        if run.result.instances == 0:
            raise StepError("no instances of the study found in the source")
        store.sync()  # the UID map is durable before the step reports success
        location = sink.close()
    except FileNotFoundError:
        if sink is not None:
            sink.abort()
        raise StepError("the study was not found in the configured source") from None
    except (DeidError, LeakError, UnknownPseudonymError, ConfigError, ValueError,
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
    out = {
        "pseudonym": run.result.pseudonym,
        "pseudonymized-study-instance-uid": run.result.pseudo_study_uid,
        "instance-count": run.result.instances,
        "byte-count": written,
        "output-location": location,
    }
    return ctx.wanted(out)
