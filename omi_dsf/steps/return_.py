"""The requester's `return` step: result SEG/SR by WADO-RS from the provider's gateway →
re-identified with the site's pseudonym store → STOW-RS to the site's own gateway, which stores
them in the legacy PACS → FHIR result to the configured place.

Inputs: result-location, result-study-instance-uid, pseudonym, patient-identifier (optional: checked
after re-identification), study-instance-uid, provider-organization (the provider the study went to).

Site settings read (`steps:` in the site YAML, `ctx.site` here, omi_dsf.steps.settings):
pseudonymization (domain, store, key_file, provider), providers (the gateways results may be fetched
from), return (modalities), gateway_url and gateway_ca_file (the site's own gateway, in front of its
PACS: omi_dsf/transfer/archive.py), fhir_results (a FHIR store also gets the ImagingStudy with an
Endpoint at gateway_url, and the Patient by consent.identifier_system), actor, audit.

Nothing identifying goes into logs, errors or the audit: counts, pseudonymized UIDs, AE titles,
organization identifiers and URLs of the gateways only.
"""

from __future__ import annotations

from omi_dsf.deid.keys import KeyError_, load_key
from omi_dsf.deid.pseudonyms import make_provider
from omi_dsf.deid.pseudonyms.factory import ConfigError
from omi_dsf.deid.reidentify import Reidentifier
from omi_dsf.deid.store import SiteStore
# highdicom and friends take most of a second to import: at worker start, not in the first return
from omi_dsf.inference.results import fhir_bundle_from_report
from omi_dsf.steps.api import Answers, StepContext, StepError, Timings, audit, step_errors, text_input
from omi_dsf.steps.prepare import pseudonymization_settings
from omi_dsf.transfer.errors import TransferError
from omi_dsf.transfer.fhir import write_fhir_result
from omi_dsf.transfer.archive import store_results
from omi_dsf.transfer.provider import gateway_for_location
from omi_dsf.transfer.results import fetch_results, reidentify_all

SR_MODALITY = "SR"


@step_errors(TransferError)
def return_results(inputs: Answers, ctx: StepContext) -> Answers:
    t = Timings()
    location = text_input(inputs, "result-location")
    result_uid = text_input(inputs, "result-study-instance-uid")
    pseudonym = text_input(inputs, "pseudonym")
    patient_id = text_input(inputs, "patient-identifier", required=False)
    study_uid = text_input(inputs, "study-instance-uid")
    organization = text_input(inputs, "provider-organization")
    cfg = pseudonymization_settings(ctx.site)
    domain, modalities = cfg.domain, tuple(ctx.site.return_.modalities)
    store = SiteStore(cfg.store)
    try:
        # the results must belong to a study this site sent: its UID maps back to the request's study
        if store.original_uid(domain, result_uid) != study_uid:
            raise StepError("result-study-instance-uid is not the pseudonymized UID of the requested study; "
                            "this site never sent it")
        try:
            provider = make_provider(cfg.provider, load_key(cfg.key_file), store)
        except (KeyError_, ConfigError) as exc:
            raise StepError(str(exc)) from None
        gw = gateway_for_location(ctx.site.providers, location, organization, result_uid)
        try:
            with t.phase("wado"):
                results = fetch_results(gw, result_uid, pseudonym, modalities)
        finally:
            gw.close()
        audit(ctx, "received", gw.client_cert, result_study_uid=result_uid, instances=len(results.datasets),
               bytes=results.bytes, source=gw.base_url, organization=gw.organization,
               series_uids=",".join(results.series_uids), pseudonym_domain=domain)
        with t.phase("reidentify"):
            reidentify_all(results.datasets, Reidentifier(store, provider, domain), patient_id, study_uid)
    finally:
        store.close()

    reports = [ds for ds in results.datasets if str(ds.get("Modality", "")) == SR_MODALITY]
    bundle = None
    if ctx.site.fhir_results is not None:
        if not reports:
            raise StepError("the results hold no SR, so no FHIR result can be made")
        try:
            with t.phase("fhir"):
                bundle = fhir_bundle_from_report(reports[0])
        except (ValueError, AttributeError, KeyError, IndexError, TypeError) as exc:
            # the type only: after re-identification a message could quote an original UID
            raise StepError(f"the result SR is not a report this site can turn into FHIR "
                            f"({type(exc).__name__})") from None

    with t.phase("stow"):
        pacs = store_results(ctx.site.gateway_url, ctx.site.gateway_ca_file, results.datasets)
    fhir_target = (write_fhir_result(ctx.site.fhir_results, bundle, ctx.business_key, results.datasets,
                                     gateway_url=ctx.site.gateway_url,
                                     patient_system=ctx.site.consent.identifier_system if ctx.site.consent else None)
                   if bundle is not None else None)
    ctx.log.info("return %s: %d result objects stored in %s%s", ctx.business_key, len(results.datasets), pacs,
                 ", FHIR result written" if fhir_target else "")
    audit(ctx, "stored", gw.client_cert, result_study_uid=result_uid, instances=len(results.datasets), target=pacs,
           series_uids=",".join(results.series_uids), pseudonym_domain=domain)
    t.finish()
    ctx.log.info("return %s: timings %s", ctx.business_key, t.summary())
    return ctx.wanted({"stored-study-instance-uid": study_uid})
