"""The site settings the steps read: the `steps:` block of the site YAML, typed (omi_dsf.config).

The worker validates it whole at start (with the rest of the site file, omi_dsf.worker.config) and
hands it to every handler as `ctx.site`; each block is the model of the part it configures. Relative
paths are relative to the site file's folder, as at the top level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pydantic import Field

from omi_dsf.config import Database, ExistingFile, FilePath, HttpUrl, Name, Section, parse
from omi_dsf.consent.config import ConsentSettings
from omi_dsf.deid.config import PseudonymizationSettings
from omi_dsf.inference.config import DEFAULT_MODEL, AiServiceSettings
from omi_dsf.transfer.config import FhirResultsSettings, ProviderSettings, ReturnSettings, SendSettings

# which blocks a topic's step cannot do without (checked at worker start for the topics it serves)
NEEDS: dict[str, tuple[str, ...]] = {
    "consent": ("consent",),
    "prepare": ("pseudonymization", "providers"),
    "send": ("pseudonymization", "pseudonymization.source", "providers"),
    "return": ("pseudonymization", "providers", "gateway_url"),
}


class StepSettings(Section):
    """`steps:` of the site YAML. At the requester (DIC): consent, pseudonymization, gateway_url,
    gateway_ca_file, providers, send, return, fhir_results; at the provider: gateway_url, gateway_ca_file and the
    AI service(s)."""
    consent: ConsentSettings | None = Field(None, description="consent: where consent is looked up "
                                                              "(docs/pseudonymization.md)")
    pseudonymization: PseudonymizationSettings | None = Field(
        None, description="send, return: domain, key, site store, pseudonym provider, source")
    gateway_url: HttpUrl | None = Field(None, description="send, return: the site's own OMI gateway in "
                                                          "front of the legacy PACS (default URL of a dicomweb source; "
                                                          "return stores the results there by STOW-RS, and "
                                                          "the gateway C-STOREs them into its PACS); infer: the "
                                                          "provider's own gateway")
    gateway_ca_file: ExistingFile | None = Field(None, description="return, infer: the CA of that gateway's server "
                                                                   "certificate (default: the system CAs)")
    providers: dict[Name, ProviderSettings] = Field(
        default_factory=dict, description="send, return: per provider organization (the DSF organization identifier "
                                          "the request names), its gateway")
    send: SendSettings = Field(default_factory=SendSettings, description="send: STOW-RS batching")
    return_: ReturnSettings = Field(default_factory=ReturnSettings, alias="return",
                                    description="return: the result series to fetch")
    fhir_results: FhirResultsSettings | None = Field(None, description="return: where the FHIR result goes")
    ai_service_url: HttpUrl | None = Field(None, description="infer: the Open Inference Protocol v2 server")
    ai_model: Name = Field(DEFAULT_MODEL, description="infer: the model on ai_service_url")
    ai_services: dict[Name, AiServiceSettings] = Field(
        default_factory=dict, description="infer: per ai-service-identifier a service, overriding the two above")
    ai_timeout_s: float = Field(600.0, gt=0, description="infer: seconds for one inference")
    study_arrival_timeout_s: float = Field(900.0, gt=0, description="infer: seconds the study may go without a new "
                                                                    "instance at the gateway before it counts as "
                                                                    "not arriving complete (the step fails)")
    actor: Name | None = Field(None, description="who the audit events name (default: the subject of the site's "
                                                 "client certificate)")
    audit: Database | None = Field(None, description="the audit trail the steps write (default: the site's `audit`)")
    demo_journal: FilePath | None = Field(None, description="demo handler (tests): a file it appends each execution to")
    demo_fail_topics: list[Name] = Field(default_factory=list, description="demo handler: topics it fails "
                                                                           "(transiently)")
    demo_deny_topics: list[Name] = Field(default_factory=list, description="demo handler: topics it denies")
    demo_delay: float = Field(0.0, ge=0, description="demo handler: seconds each step takes")
    demo_deny_patients: dict[Name, list[str]] = Field(default_factory=dict, description="demo handler: per topic, "
                                                      "the patient identifiers whose items it denies")

    def missing_for(self, topics: list[str] | tuple[str, ...]) -> list[str]:
        """What the steps of `topics` need and this site lacks, one line each naming the key."""
        missing = []
        for topic in topics:
            for key in NEEDS.get(topic, ()):
                node: Any = self
                for part in key.split("."):
                    node = getattr(node, part, None) if node is not None else None
                parent_missing = any(line.startswith(f"steps.{key.split('.')[0]}:") for line in missing)
                if not node and not parent_missing:
                    missing.append(f"steps.{key}: required for the {topic} step")
        if "infer" in topics and not self.ai_service_url and not self.ai_services:
            missing.append("steps.ai_service_url (or steps.ai_services): required for the infer step")
        return missing


def step_settings(data: Mapping[str, Any] | None, base: Path | None = None, where: str = "steps") -> StepSettings:
    """`steps:` settings from a mapping (a caller outside the worker: tests, tools); relative paths
    are relative to `base` (default: the working directory)."""
    return parse(StepSettings, dict(data or {}), base or Path.cwd(), where)
