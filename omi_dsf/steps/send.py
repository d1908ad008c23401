"""The requester's `send` step: the pseudonymize step's output → leak check of every object →
STOW-RS over TLS to the provider's gateway (only instances it does not hold yet) → study-location.

Inputs: pseudonymized-study-instance-uid, pseudonymized-study-location (where pseudonymize wrote
the study), provider-organization.

Site settings read (`steps:` in the site YAML, `ctx.site` here, omi_dsf.steps.settings):
pseudonymization (domain, store, sink), providers, send (batching), actor, audit.

Nothing identifying goes into logs, errors or the audit: counts, pseudonymized UIDs, organization
identifiers and URLs of the provider's gateway only.
"""

from __future__ import annotations

from omi_dsf.deid.store import SiteStore
from omi_dsf.steps.api import Answers, StepContext, Timings, audit, step_errors, text_input
from omi_dsf.steps.pseudonymize import pseudonymization_settings
from omi_dsf.transfer.errors import TransferError
from omi_dsf.transfer.outgoing import collect
from omi_dsf.transfer.provider import open_gateway
from omi_dsf.transfer.stow import stow_study


@step_errors(TransferError)
def send(inputs: Answers, ctx: StepContext) -> Answers:
    t = Timings()
    pseudo_uid = text_input(inputs, "pseudonymized-study-instance-uid")
    location = text_input(inputs, "pseudonymized-study-location")
    organization = text_input(inputs, "provider-organization")
    cfg = pseudonymization_settings(ctx.site)
    domain, batching = cfg.domain, ctx.site.send
    gw = open_gateway(ctx.site.providers, organization)     # config errors before any file is read
    store = SiteStore(cfg.store)
    try:
        with t.phase("leak_check"):
            study = collect(cfg, store, pseudo_uid, location)
    finally:
        store.close()
    try:
        with t.phase("stow"):
            outcome = stow_study(gw, pseudo_uid, study.files, study.sop_uids,
                                 batch_bytes=batching.batch_bytes, batch_instances=batching.batch_instances)
    finally:
        study.close()
        gw.close()
    ctx.log.info("send %s: %d instances to %s (%d sent now, %d already there)", ctx.business_key,
                 len(study.sop_uids), organization, outcome.sent, outcome.skipped)
    audit(ctx, "sent", gw.client_cert, pseudonymized_study_uid=pseudo_uid, instances=len(study.sop_uids),
          sent_now=outcome.sent, already_there=outcome.skipped,
          bytes=study.bytes, target=gw.base_url, organization=organization, pseudonym_domain=domain)
    t.finish()
    ctx.log.info("send %s: timings %s", ctx.business_key, t.summary())
    return ctx.wanted({"study-location": f"{gw.base_url}/studies/{pseudo_uid}",
                       "instance-count": len(study.sop_uids), "byte-count": study.bytes})
