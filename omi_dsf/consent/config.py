"""The consent step's site settings (`steps.consent` in the site YAML), typed (omi_dsf.config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from omi_dsf.config import FilePath, HttpUrl, Name, Section

from .policy import UnknownPurposeError, codes_for

_NEEDS = {"fhir": ("url", "identifier_system"), "gics": ("url", "domain", "identifier_system"), "folder": ("path",)}


class ConsentSettings(Section):
    kind: Literal["fhir", "folder", "gics"] = Field(
        description="fhir: MII Consent resources on a FHIR server; folder: JSON files; gics: the TTP-FHIR "
                    "gateway's $isConsented")
    url: HttpUrl | None = Field(None, description="fhir: the FHIR base; gics: the gateway's gICS base "
                                                  "…/ttp-fhir/fhir/gics")
    path: FilePath | None = Field(None, description="folder: the folder of `<patient-id>.json`")
    identifier_system: Name | None = Field(None, description="fhir, gics: the system of the patient identifier")
    domain: Name | None = Field(None, description="gics: the consent domain, e.g. MII")
    purpose: Name = Field("external-ai-service", description="the purpose whose policy codes must be permitted")
    codes: list[Name] | None = Field(None, description="policy codes instead of the purpose's")
    timeout: float = Field(10.0, gt=0, description="fhir, gics: seconds per request")

    @model_validator(mode="after")
    def _complete(self) -> "ConsentSettings":
        missing = [k for k in _NEEDS[self.kind] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"{missing[0]}: required for kind {self.kind}")
        try:
            codes_for(self.purpose, self.codes)
        except UnknownPurposeError as exc:
            raise ValueError(f"purpose: {exc}") from None
        return self
