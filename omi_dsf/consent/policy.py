"""Which MII Broad Consent policy codes a purpose needs.

Purpose "external-ai-service": a pseudonymized imaging study leaves the site for inference by an
AI service run by another organization, for research. That is scientific use of medical data by
a (possibly external) recipient under EU GDPR level protection: policy
`2.16.840.1.113883.3.1937.777.24.5.3.8` "MDAT wissenschaftlich nutzen EU DSGVO NIVEAU". We do not
also require `.7` (MDAT speichern, verarbeiten) or `.6` (MDAT erheben): in the Broad Consent those
are limited to five years for collection, while use of data already collected runs with `.8`.
A provider outside EU GDPR level needs `.49` (MDAT wissenschaftlich nutzen ohne EU DSGVO Niveau)
instead: purpose "external-ai-service-non-eu". Sites may override the codes in their configuration.
"""

from __future__ import annotations

MII_POLICY_SYSTEM = "urn:oid:2.16.840.1.113883.3.1937.777.24.5.3"
MII_CONSENT_PROFILE = ("https://www.medizininformatik-initiative.de/fhir/modul-consent/"
                       "StructureDefinition/mii-pr-consent-einwilligung")
_OID = "2.16.840.1.113883.3.1937.777.24.5.3."

MDAT_COLLECT = _OID + "6"
MDAT_STORE_PROCESS = _OID + "7"
MDAT_SCIENTIFIC_USE = _OID + "8"
MDAT_LINK_THIRD_PARTY = _OID + "9"
MDAT_SCIENTIFIC_USE_NON_EU = _OID + "49"

DISPLAY = {
    MDAT_COLLECT: "MDAT erheben",
    MDAT_STORE_PROCESS: "MDAT speichern, verarbeiten",
    MDAT_SCIENTIFIC_USE: "MDAT wissenschaftlich nutzen EU DSGVO NIVEAU",
    MDAT_LINK_THIRD_PARTY: "MDAT zusammenfuehren Dritte",
    MDAT_SCIENTIFIC_USE_NON_EU: "MDAT wissenschaftlich nutzen ohne EU DSGVO NIVEAU",
}

PURPOSES: dict[str, tuple[str, ...]] = {
    "external-ai-service": (MDAT_SCIENTIFIC_USE,),
    "external-ai-service-non-eu": (MDAT_SCIENTIFIC_USE_NON_EU,),
}


class UnknownPurposeError(ValueError):
    pass


def codes_for(purpose: str, override: list[str] | tuple[str, ...] | None = None) -> tuple[str, ...]:
    if override:
        return tuple(override)
    try:
        return PURPOSES[purpose]
    except KeyError:
        raise UnknownPurposeError(f"unknown consent purpose {purpose!r} (known: {', '.join(PURPOSES)})") from None


def label(code: str) -> str:
    short = code.rsplit(".", 1)[-1] if code.startswith(_OID) else code
    return f"{DISPLAY.get(code, code)} (.{short})" if code.startswith(_OID) else code
