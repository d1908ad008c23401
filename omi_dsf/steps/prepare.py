"""The requester's `prepare` step: where the study will go, before anything is read → the
pseudonymized study UID and the study's location at the provider's gateway, for the message that
starts the provider's process while the `send` step is still streaming the study there.

`destination` is the one derivation of both (the send step uses it too): the site's pseudonymization
settings and key, the provider's gateway from steps.providers, the pseudonymized study UID
(`uid_for(key, domain, study UID)`, as the de-identification maps it) and
`<gateway URL>/studies/<pseudonymized study UID>`. It reads nothing from the PACS: the step is on the
request's critical path; `send` finds out whether the study is there.

Site configuration, `ctx.site`: pseudonymization (domain, key_file), providers.
Inputs: study-instance-uid, provider-organization. Outputs: pseudonymized-study-instance-uid,
study-location. A configuration the site must fix (no pseudonymization, a key that does not load, an
unknown provider, a gateway the peer settings cannot reach) is a StepError naming the key; nothing
identifying goes into logs or errors (the pseudonymized UID and the gateway's URL only).
"""

from __future__ import annotations

from dataclasses import dataclass

from omi_dsf.deid.config import PseudonymizationSettings
from omi_dsf.deid.deidentify import uid_for
from omi_dsf.deid.keys import KeyError_, load_key
from omi_dsf.steps.api import Answers, StepContext, StepError, step_errors, text_input
from omi_dsf.steps.settings import StepSettings
from omi_dsf.transfer.errors import TransferError
from omi_dsf.transfer.provider import ProviderGateway, open_gateway

IN_STUDY = "study-instance-uid"
IN_PROVIDER = "provider-organization"


def pseudonymization_settings(site: StepSettings) -> PseudonymizationSettings:
    """The site's `pseudonymization` settings (send and return read them too)."""
    if site.pseudonymization is None:
        raise StepError("site configuration steps.pseudonymization is missing")
    return site.pseudonymization


@dataclass
class Destination:
    """Where a study goes: the site's pseudonymization settings and key, the provider's gateway
    (open: the caller closes it), the pseudonymized study UID and its location there."""
    cfg: PseudonymizationSettings
    key: bytes
    gateway: ProviderGateway
    pseudo_study_uid: str

    @property
    def study_location(self) -> str:
        return f"{self.gateway.base_url}/studies/{self.pseudo_study_uid}"


def destination(site: StepSettings, study_uid: str, organization: str) -> Destination:
    """The one derivation of the pseudonymized study UID and its location (prepare, send).
    StepError or TransferError (a configuration to fix) before anything is read."""
    cfg = pseudonymization_settings(site)
    try:
        key = load_key(cfg.key_file)
    except KeyError_ as exc:
        raise StepError(str(exc)) from None
    gateway = open_gateway(site.providers, organization)
    return Destination(cfg, key, gateway, uid_for(key, cfg.domain, study_uid.strip()))


@step_errors(TransferError)
def prepare(inputs: Answers, ctx: StepContext) -> Answers:
    study_uid = text_input(inputs, IN_STUDY)
    organization = text_input(inputs, IN_PROVIDER)
    dest = destination(ctx.site, study_uid, organization)
    dest.gateway.close()    # nothing is asked of it here
    ctx.log.info("prepare %s: the study goes to %s as %s", ctx.business_key, organization, dest.pseudo_study_uid)
    return ctx.wanted({
        "pseudonymized-study-instance-uid": dest.pseudo_study_uid,
        "study-location": dest.study_location,
    })
