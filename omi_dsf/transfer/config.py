"""The transfer steps' site settings (send and return, `steps:` in the site YAML), typed
(omi_dsf.config): the provider gateways, batching, the result modalities and where the FHIR
result goes."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from omi_dsf.config import ExistingFile, FilePath, HttpUrl, Name, PeerSettings, Section


class ProviderSettings(PeerSettings):
    """A provider organization's DICOMweb gateway (`steps.providers.<organization>`)."""
    gateway_url: str = Field(pattern=r"^https://[^/\s]+", description="the provider gateway's DICOMweb base (https)")
    ca_file: ExistingFile = Field(description="the CA that signs that gateway's server certificate (only this CA "
                                              "counts)")
    timeout: float | None = Field(120.0, gt=0, description="seconds per HTTP request")


class SendSettings(Section):
    batch_mb: float = Field(32.0, gt=0, description="MiB per STOW-RS request at most")
    batch_instances: int = Field(64, ge=1, description="instances per STOW-RS request at most")

    @property
    def batch_bytes(self) -> int:
        return int(self.batch_mb * (1 << 20))


class ReturnSettings(Section):
    modalities: list[Name] = Field(default_factory=lambda: ["SEG", "SR"],
                                   description="modalities of the result series to fetch", min_length=1)


class FhirResultsSettings(PeerSettings):
    """A folder (`<folder>/<business key>.json`, also written as just the path) or the DIC's FHIR store
    (one transaction, every write conditional on an identifier, so that a retry updates instead of
    duplicating; omi_dsf/transfer/fhir_store.py)."""
    folder: FilePath | None = Field(None, description="the folder")
    url: HttpUrl | None = Field(None, description="the FHIR base")
    patient_identifier_system: str | None = Field(
        None, description="system of the patient identifier the Patient is found or created by (default: "
                          "consent.identifier_system)")
    wado_url: HttpUrl | None = Field(
        None, description="address of the ImagingStudy's Endpoint (dicom-wado-rs): the DICOMweb gateway the "
                          "results are read from (default: gateway_url)")

    @model_validator(mode="before")
    @classmethod
    def _path_alone(cls, data: Any) -> Any:
        return {"folder": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_place(self) -> "FhirResultsSettings":
        if (self.folder is None) == (self.url is None):
            raise ValueError("give a folder or a url (one of them)")
        return self
