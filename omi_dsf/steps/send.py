"""The requester's `send` step: the pseudonymize step's output → leak check of every object →
STOW-RS over TLS to the provider's gateway (only instances it does not hold yet) → study-location.

Inputs: pseudonymized-study-instance-uid, pseudonymized-study-location (where pseudonymize wrote
the study), provider-organization.

Site settings read (`steps:` in the site YAML, `ctx.site` here):
  pseudonymization   the pseudonymize step's settings (domain, store; sink: kind and TLS settings)
  providers          {<provider organization>: {gateway_url, ca_file, client_cert, client_key,
                     token_file, timeout}}          (omi_dsf/transfer/provider.py)
  send               optional {batch_mb: 32, batch_instances: 64}
  actor              who the audit names (default: subject of the client certificate, else "omi-worker")
  audit              path of the site's audit trail (set by the worker)

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
from omi_dsf.transfer.stow import BATCH_INSTANCES, stow_study


@step_errors(TransferError)
def send(inputs: Answers, ctx: StepContext) -> Answers:
    t = Timings()
    pseudo_uid = text_input(inputs, "pseudonymized-study-instance-uid")
    location = text_input(inputs, "pseudonymized-study-location")
    organization = text_input(inputs, "provider-organization")
    cfg, domain = pseudonymization_settings(ctx.site)
    batching = ctx.site.get("send") or {}
    gw = open_gateway(ctx.site, organization)     # config errors before any file is read
    store = SiteStore(cfg.get("store", "omi-site.sqlite"))
    try:
        with t.phase("leak_check"):
            study = collect(cfg, store, pseudo_uid, location)
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
    audit(ctx, "sent", gw.client_cert, pseudonymized_study_uid=pseudo_uid, instances=len(study.sop_uids),
          sent_now=outcome.sent, already_there=outcome.skipped,
          bytes=study.bytes, target=gw.base_url, organization=organization, pseudonym_domain=domain)
    t.finish()
    ctx.log.info("send %s: timings %s", ctx.business_key, t.summary())
    return ctx.wanted({"study-location": f"{gw.base_url}/studies/{pseudo_uid}",
                       "instance-count": len(study.sop_uids), "byte-count": study.bytes})
