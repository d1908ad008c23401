"""The send step's pseudonymization settings (`steps.pseudonymization` in the site YAML), typed
(omi_dsf.config): the pseudonym domain, key, site store, pseudonym provider and where the originals
come from. The return step reads them too."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, field_validator, model_validator

from omi_dsf.config import Database, ExistingFile, FilePath, HttpUrl, Name, PeerSettings, Section, tag

from .profile import UnknownOptionError, parse_options


class EmbeddedProvider(Section):
    """Pseudonyms made at the site from the key (no service)."""
    kind: Literal["embedded"] = Field("embedded", description="`embedded`")


class GpasProvider(PeerSettings):
    """The Greifswald gPAS (SOAP)."""
    kind: Literal["gpas"] = Field(description="`gpas`")
    wsdl: HttpUrl = Field(description="the service's WSDL URL, …/gpas/gpasService?wsdl")


class TtpFhirProvider(PeerSettings):
    """The THS TTP-FHIR gateway in front of gPAS."""
    kind: Literal["ttp-fhir"] = Field(description="`ttp-fhir`")
    url: HttpUrl = Field(description="the gateway's gPAS base, …/ttp-fhir/fhir/gpas")


def _provider_kind(value: Any) -> str | None:
    kind = value.get("kind", "embedded") if isinstance(value, dict) else getattr(value, "kind", None)
    return f"={kind}" if kind in ("embedded", "gpas", "ttp-fhir") else None


PseudonymProviderSettings = Annotated[
    Union[Annotated[EmbeddedProvider, tag("embedded")], Annotated[GpasProvider, tag("gpas")],
          Annotated[TtpFhirProvider, tag("ttp-fhir")]],
    Discriminator(_provider_kind, custom_error_type="invalid_kind", custom_error_message="kind: unknown",
                  custom_error_context={"key": "kind", "expected": "embedded, gpas, ttp-fhir"})]


class InstanceIoSettings(PeerSettings):
    """Where the study's original instances are read: a folder, or a DICOMweb store (QIDO-RS and
    WADO-RS, with the peer keys); other parts may register more kinds (omi_dsf.deid.instance_io)."""
    kind: Name = Field("folder", description="`folder`, `dicomweb`, or a kind another part registered")
    path: FilePath | None = Field(None, description="folder: its path; may name the study by `{study_uid}` or "
                                                    "`{business_key}`")
    url: Name | None = Field(None, description="dicomweb: the store's base URL (default: steps.gateway_url)")

    @model_validator(mode="after")
    def _kind_known(self) -> "InstanceIoSettings":
        from .instance_io import known_kinds
        if self.kind not in known_kinds():
            raise ValueError(f"kind: unknown kind {self.kind!r} (known: {', '.join(sorted(known_kinds()))})")
        if self.kind == "folder" and self.path is None:
            raise ValueError("path: required for kind folder")
        return self


class PseudonymizationSettings(Section):
    domain: Name = Field(description="the pseudonym domain (required)")
    key_file: ExistingFile | None = Field(None, description="file with the site key (else $OMI_DEID_KEY_FILE / "
                                                            "$OMI_DEID_KEY)")
    store: Database = Field("omi-site.sqlite", validate_default=True,
                            description="the site store, a database (Site state): UID map, removed attributes, "
                                        "embedded pseudonyms; never leaves the site")
    provider: PseudonymProviderSettings = Field(default_factory=EmbeddedProvider,
                                                description="`{kind: embedded}`, `{kind: gpas, wsdl: …}` or "
                                                            "`{kind: ttp-fhir, url: …}`, with the peer keys")
    options: list[Name] = Field(default_factory=list, description="de-identification options (profile.OPTION_NAMES)")
    source: InstanceIoSettings | None = Field(None, description="where the originals are read: `{kind: folder, "
                                                                "path: …/{study_uid}}` or `{kind: dicomweb, url: …}`")
    on_refused_instance: Literal["refuse-study", "send-rest"] = Field(
        "refuse-study", description="refuse-study: one instance that cannot be de-identified safely stops the "
                                    "study; send-rest: it is left out and reported, the rest is sent")
    pixel_recipes: list[ExistingFile] = Field(default_factory=list, description="extra pixel-cleaning recipe "
                                                                                "files besides the shipped one")

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: list[str]) -> list[str]:
        try:
            parse_options(options)
        except UnknownOptionError as exc:
            raise ValueError(str(exc)) from None
        return options
