"""The requester's `send` step: the study from the site's source, instance by instance, through
de-identification and pseudonymization (omi_dsf.deid) and the leak check, to the provider's
gateway by STOW-RS over TLS (omi_dsf.transfer.stow) as the instances come → study-location.

Before the first instance is read, the source lists the study's original UIDs (an instance-level
QIDO-RS of the site's gateway, a C-FIND at its PACS; for a folder, every UID in the files'
headers), so that the leak check of the first instance already looks for the UIDs of the last.
Each instance's Part 10 bytes are checked as they will be sent (the patient's and the study's
identifying values of the instances read so far, every listed original UID and every original
UID of the instances read so far; the de-identification flags) and only then handed to the
STOW-RS stream, which posts batches on a thread of its own while the next instances are read and
de-identified. The site store (UID map, removed attributes, embedded pseudonyms) is made durable
before each batch leaves; the pseudonym and every replacement UID are derived from the site key,
so a retried step sends the same instances, and the gateway's QIDO-RS listing (on a thread of its
own while the source lists and the first instances are read; in before the first is added to the
stream) lets it skip what an earlier attempt already stored (exactly once at the provider).

Last, once the gateway holds every instance, the study's manifest (omi_dsf.transfer.manifest: a Key
Object Selection Document listing every instance the provider got, sent now or already there; its UIDs
derived from the site key, so a retry skips it like any instance) goes through the same leak check
and the same stream. The provider's infer step, started while the send runs, takes it as the sign
that the study is complete. The pseudonymized study UID and the study's location are derived as the
`prepare` step derives them (omi_dsf.steps.prepare.destination).

Site configuration, `ctx.site`: pseudonymization (domain, key_file, store, provider, options,
source, on_refused_instance, pixel_recipes), gateway_url (the default URL of a dicomweb source),
providers, send (batching), actor, audit.
Inputs: study-instance-uid, patient-identifier (checked against the instances),
provider-organization. Outputs: pseudonym, pseudonymized-study-instance-uid, instance-count,
refused-instance-count, refused-instances, study-location, and where the work item asks for it
byte-count. A refused instance (policy send-rest) is reported in the outputs, the audit trail and
the log. With policy refuse-study, a refused instance fails the step; instances posted before it
stay at the provider's gateway (each passed the leak check), and no manifest is stored: the provider's
infer step never takes the study as complete and runs no model (it fails after its
study_arrival_timeout_s).

The request may end while the step runs (the provider's error answer, awaited alongside): the
worker then sees the work item withdrawn and the step stops before the next instance, without a
manifest.

Nothing identifying goes into logs, errors or the audit: counts, pseudonymized UIDs, organization
identifiers and URLs of the provider's gateway only.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from copy import copy

from omi_dsf.audit import trail
from omi_dsf.deid import instance_io
from omi_dsf.deid.leakcheck import LeakError, check_outgoing, text_of
from omi_dsf.deid.pipeline import StudyPseudonymizer
from omi_dsf.deid.profile import parse_options
from omi_dsf.deid.pseudonyms import UnknownPseudonymError, make_provider
from omi_dsf.deid.pseudonyms.factory import ConfigError
from omi_dsf.deid.refusal import Refused
from omi_dsf.deid.store import SiteStore
from omi_dsf.steps.api import Answers, StepContext, StepError, Timings, audit, step_errors, text_input
from omi_dsf.steps.prepare import destination
from omi_dsf.transfer import manifest
from omi_dsf.transfer.errors import TransferError
from omi_dsf.transfer.stow import StowStream

IN_STUDY = "study-instance-uid"
IN_PATIENT = "patient-identifier"
IN_PROVIDER = "provider-organization"


@step_errors(TransferError)
def send(inputs: Answers, ctx: StepContext) -> Answers:
    t = Timings()
    study_uid = text_input(inputs, IN_STUDY)
    patient_id = text_input(inputs, IN_PATIENT, required=False) or None
    organization = text_input(inputs, IN_PROVIDER)
    dest = destination(ctx.site, study_uid, organization)    # config errors before anything is read
    cfg, key, gw, pseudo_uid = dest.cfg, dest.key, dest.gateway, dest.pseudo_study_uid
    if cfg.source is None:
        gw.close()
        raise StepError("site configuration steps.pseudonymization needs source")
    batching = ctx.site.send
    params = {"study_uid": study_uid, "business_key": ctx.business_key, "gateway_url": ctx.site.gateway_url or ""}
    contents = manifest.Contents()      # what the manifest will list: every instance the provider gets
    store = SiteStore(cfg.store)
    stream = None
    total = 0
    # what the provider's gateway already holds is asked on a thread of its own meanwhile
    pool = ThreadPoolExecutor(1, thread_name_prefix="omi-send")
    opening = None
    try:
        provider = make_provider(cfg.provider, key, store)
        source = instance_io.open_source(cfg.source, params)
        run = StudyPseudonymizer(key=key, domain=cfg.domain, provider=provider, store=store,
                                 options=parse_options(cfg.options), expect_patient_id=patient_id,
                                 expect_study_uid=study_uid, policy=cfg.on_refused_instance,
                                 pixel_recipes=cfg.pixel_recipes)
        opening = pool.submit(t.background, "gateway listing", StowStream, gw, pseudo_uid, alongside="reading",
                              batch_bytes=batching.batch_bytes, batch_instances=batching.batch_instances,
                              before_send=store.sync)
        with t.phase("list"):       # every instance is checked against all of them
            run.identity.add_uids(_study_uids(source, study_uid))
        # number the instances: file names may carry patient names, and errors go to the Task
        numbered = ((f"instance {n}", item) for n, (_, item) in enumerate(t.timed("read", source), 1))
        for out in t.timed("deid", run.process(numbered)):
            ctx.check_withdrawn()   # the request ended meanwhile (e.g. the provider answered an error)
            with t.phase("stow"):
                if stream is None:
                    stream = opening.result()
                stream.add(text_of(out.dataset, 0x00080018), out.data)
            contents.add(out.dataset)
            total += len(out.data)
        refused = [str(r) for r in run.result.refused]
        if run.result.instances == 0:
            if refused:
                raise StepError(f"no instance of the study could be sent: {len(refused)} refused; "
                                f"the first: {refused[0]}")
            raise StepError("no instances of the study found in the source")
        with t.phase("stow"):
            outcome = copy(stream.finish())    # the instances' (the manifest is not counted)
        with t.phase("manifest"):   # last: the provider's infer step knows the study is complete by it
            _store_manifest(stream, contents, key, cfg.domain, run.identity)
        with t.phase("sync"):
            store.sync()
    except FileNotFoundError:
        raise StepError("the study was not found in the configured source") from None
    except (Refused, UnknownPseudonymError, ConfigError, ValueError, instance_io.SourceError) as exc:
        raise StepError(str(exc)) from None
    finally:
        pool.shutdown(wait=True)    # the gateway's listing ends by itself (the client's timeout)
        if stream is None and opening is not None and opening.done() and opening.exception() is None:
            stream = opening.result()
        if stream is not None:
            stream.close()
        store.close()
        gw.close()
    if run.result.pseudo_study_uid != pseudo_uid:   # the stream's study is the one pseudonymized
        raise StepError("the study's instances name another study")
    t.seconds["deid"] = t.seconds.get("deid", 0.0) - t.seconds.get("read", 0.0)  # waiting for the source apart
    t.finish()
    instances = run.result.instances
    ctx.log.info("send %s: %d instances (%d bytes) to %s (%d sent now, %d already there)", ctx.business_key,
                 instances, total, organization, outcome.sent, outcome.skipped)
    ctx.log.info("send %s: timings %s", ctx.business_key, t.summary())
    _report_refused(ctx, refused, pseudo_uid)
    audit(ctx, "sent", gw.client_cert, pseudonymized_study_uid=pseudo_uid, instances=instances,
          sent_now=outcome.sent, already_there=outcome.skipped,
          bytes=total, target=gw.base_url, organization=organization, pseudonym_domain=cfg.domain)
    return ctx.wanted({
        "pseudonym": run.result.pseudonym,
        "pseudonymized-study-instance-uid": pseudo_uid,
        "instance-count": instances,
        "refused-instance-count": len(refused),
        "refused-instances": refused_text(refused) or None,
        "study-location": dest.study_location,
        "byte-count": total,
    })


def _store_manifest(stream: StowStream, contents: manifest.Contents, key: bytes, domain: str, identity) -> None:
    """The study's manifest (every instance now at the provider's gateway), through the same leak check as
    every instance, stored after them by the same stream: a retry that finds it there skips it."""
    ds, data = manifest.make_manifest(contents, key, domain)
    try:
        check_outgoing(ds, identity, data)
    except LeakError as exc:
        raise StepError(f"the study's manifest did not pass the leak check: {exc}") from None
    stream.add(str(ds.SOPInstanceUID), data)
    stream.finish()


REFUSED_LINES_MAX = 50   # the work item's answer stays readable; the audit trail has every line


def refused_text(refused: list[str]) -> str:
    """One line per refused instance (at most REFUSED_LINES_MAX, then how many more)."""
    lines = refused[:REFUSED_LINES_MAX]
    if len(refused) > REFUSED_LINES_MAX:
        lines.append(f"... and {len(refused) - REFUSED_LINES_MAX} more (see the site's audit trail)")
    return "\n".join(lines)


def _study_uids(source, study_uid: str) -> set[str]:
    """The study's original UIDs at the source; FileNotFoundError when the study is not there."""
    originals = source.uids()
    if study_uid not in originals:
        raise FileNotFoundError(study_uid)
    return originals


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
