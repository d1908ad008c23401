"""The requester's `send` and `return` step handlers (worker contract: omi_dsf/worker/api.py).

send:   the pseudonymize step's output → leak check of every object → STOW-RS over TLS to the
        provider's gateway (only instances it does not hold yet) → study-location.
return: result SEG/SR by WADO-RS from the provider's gateway → re-identified with the site's
        pseudonym store → C-STORE into the legacy PACS → FHIR result to the configured place.

Site settings read (`steps:` in the site YAML, `ctx.site` here):
  pseudonymization   the pseudonymize step's settings (domain, store, sink, key_file, provider)
  providers          {<provider organization>: {gateway_url, ca_file, client_cert, client_key,
                     token_file, timeout}}          (transfer_provider.py)
  send               optional {batch_mb: 32, batch_instances: 64}
  return             optional {modalities: [SEG, SR]}
  pacs               {host, port, ae_title, calling_ae, timeout}   (transfer_pacs.py)
  fhir_results       folder path | {url, ca_file, client_cert, client_key, token_file}  (transfer_fhir.py)
  gateway_url        the site's own gateway (only to resolve {gateway_url} in a sink path)
  actor              who the audit names (default: subject of the client certificate, else "omi-worker")
  audit              path of the site's audit trail (set by the worker)

Nothing identifying goes into logs, errors or the audit: counts, pseudonymized UIDs, AE titles,
organization identifiers and URLs of the provider's gateway only.
"""

from __future__ import annotations

from typing import Any, Mapping

from omi_dsf.audit import AuditTrail, certificate_subject
from omi_dsf.deid.keys import KeyError_, load_key
from omi_dsf.deid.pseudonyms import make_provider
from omi_dsf.deid.pseudonyms.factory import ConfigError
from omi_dsf.deid.reidentify import Reidentifier
from omi_dsf.deid.store import SiteStore
# highdicom and friends take most of a second to import: at worker start, not in the first return
from omi_dsf.inference.results import fhir_bundle_from_report
from omi_dsf.worker.api import Answers, StepContext, StepError, Timings
from omi_dsf.worker.transfer_fhir import write_fhir_result
from omi_dsf.worker.transfer_outgoing import collect
from omi_dsf.worker.transfer_pacs import store_in_pacs
from omi_dsf.worker.transfer_provider import ProviderGateway, gateway_for_location, open_gateway
from omi_dsf.worker.transfer_results import RESULT_MODALITIES, fetch_results, reidentify_all
from omi_dsf.worker.transfer_stow import BATCH_INSTANCES, stow_study

SR_MODALITY = "SR"


def _text(inputs: Answers, code: str, required: bool = True) -> str:
    value = str(inputs.get(code, "") or "").strip()
    if required and not value:
        raise StepError(f"input {code} is missing")
    return value


def _pseudonymization(site: Mapping[str, Any]) -> tuple[dict, str]:
    cfg = dict(site.get("pseudonymization") or {})
    if not cfg.get("domain"):
        raise StepError("site configuration pseudonymization.domain is missing")
    return cfg, str(cfg["domain"])


def _audit(ctx: StepContext, action: str, gw: ProviderGateway | None, **details) -> None:
    path = ctx.site.get("audit")
    if not path:
        return
    actor = ctx.site.get("actor")
    if not actor and gw is not None and gw.client_cert:
        actor = certificate_subject(gw.client_cert)
    AuditTrail(path).record(ctx.business_key, action, str(actor or "omi-worker"), item_id=ctx.item_id or None,
                            attempt=ctx.attempt, **details)


def _sent_to(ctx: StepContext) -> str | None:
    """The provider organization this request's study was sent to, from the site's audit trail."""
    path = ctx.site.get("audit")
    if not path:
        return None
    sent = [e for e in AuditTrail(path).events(ctx.business_key) if e.action == "sent"]
    return sent[-1].details.get("organization") if sent else None


def send(inputs: Answers, ctx: StepContext) -> Answers:
    t = Timings()
    pseudo_uid = _text(inputs, "pseudonymized-study-instance-uid")
    organization = _text(inputs, "provider-organization")
    cfg, domain = _pseudonymization(ctx.site)
    batching = ctx.site.get("send") or {}
    gw = open_gateway(ctx.site, organization)     # config errors before any file is read
    store = SiteStore(cfg.get("store", "omi-site.sqlite"))
    try:
        with t.phase("leak_check"):
            study = collect(cfg, store, pseudo_uid, ctx.business_key, str(ctx.site.get("gateway_url", "")))
    finally:
        store.close()
    try:
        with t.phase("stow"):
            outcome = stow_study(gw, pseudo_uid, study.files, study.sop_uids,
                                 batch_bytes=int(float(batching.get("batch_mb", 32)) * (1 << 20)),
                                 batch_instances=int(batching.get("batch_instances", BATCH_INSTANCES)))
    finally:
        study.close()
        gw.close()
    ctx.log.info("send %s: %d instances to %s (%d sent now, %d already there)", ctx.business_key,
                 len(study.sop_uids), organization, outcome.sent, outcome.skipped)
    _audit(ctx, "sent", gw, pseudonymized_study_uid=pseudo_uid, instances=len(study.sop_uids),
           sent_now=outcome.sent, already_there=outcome.skipped,
           bytes=study.bytes, target=gw.base_url, organization=organization, pseudonym_domain=domain)
    t.finish()
    ctx.log.info("send %s: timings %s", ctx.business_key, t.summary())
    return ctx.wanted({"study-location": f"{gw.base_url}/studies/{pseudo_uid}",
                       "instance-count": len(study.sop_uids), "byte-count": study.bytes})


def return_results(inputs: Answers, ctx: StepContext) -> Answers:
    t = Timings()
    location = _text(inputs, "result-location")
    result_uid = _text(inputs, "result-study-instance-uid")
    pseudonym = _text(inputs, "pseudonym")
    patient_id = _text(inputs, "patient-identifier", required=False)
    study_uid = _text(inputs, "study-instance-uid")
    cfg, domain = _pseudonymization(ctx.site)
    modalities = tuple((ctx.site.get("return") or {}).get("modalities") or RESULT_MODALITIES)
    store = SiteStore(cfg.get("store", "omi-site.sqlite"))
    try:
        # the results must belong to a study this site sent: its UID maps back to the request's study
        if store.original_uid(domain, result_uid) != study_uid:
            raise StepError("result-study-instance-uid is not the pseudonymized UID of the requested study; "
                            "this site never sent it")
        try:
            provider = make_provider(cfg.get("provider"), load_key(cfg.get("key_file")), store)
        except (KeyError_, ConfigError) as exc:
            raise StepError(str(exc)) from None
        gw = gateway_for_location(ctx.site, location, _sent_to(ctx), result_uid)
        try:
            with t.phase("wado"):
                results = fetch_results(gw, result_uid, pseudonym, modalities)
        finally:
            gw.close()
        _audit(ctx, "received", gw, result_study_uid=result_uid, instances=len(results.datasets),
               bytes=results.bytes, source=gw.base_url, organization=gw.organization,
               series_uids=",".join(results.series_uids), pseudonym_domain=domain)
        with t.phase("reidentify"):
            reidentify_all(results.datasets, Reidentifier(store, provider, domain), patient_id, study_uid)
    finally:
        store.close()

    reports = [ds for ds in results.datasets if str(ds.get("Modality", "")) == SR_MODALITY]
    bundle = None
    if ctx.site.get("fhir_results"):
        if not reports:
            raise StepError("the results hold no SR, so no FHIR result can be made")
        try:
            with t.phase("fhir"):
                bundle = fhir_bundle_from_report(reports[0])
        except (ValueError, AttributeError, KeyError, IndexError, TypeError) as exc:
            # the type only: after re-identification a message could quote an original UID
            raise StepError(f"the result SR is not a report this site can turn into FHIR "
                            f"({type(exc).__name__})") from None

    with t.phase("c_store"):
        pacs = store_in_pacs(ctx.site, results.datasets)
    fhir_target = write_fhir_result(ctx.site, bundle, ctx.business_key) if bundle is not None else None
    ctx.log.info("return %s: %d result objects stored in %s%s", ctx.business_key, len(results.datasets), pacs,
                 ", FHIR result written" if fhir_target else "")
    _audit(ctx, "stored", gw, result_study_uid=result_uid, instances=len(results.datasets), target=pacs,
           series_uids=",".join(results.series_uids), pseudonym_domain=domain)
    t.finish()
    ctx.log.info("return %s: timings %s", ctx.business_key, t.summary())
    return ctx.wanted({"stored-study-instance-uid": study_uid})
