"""The allow list: a FHIR transaction Bundle that every test bed FHIR server loads at start-up.

DSF 1.9 reads `dev.dsf.fhir.server.init.bundle` (default `conf/bundle.xml`) after its built-in
bundle, resolves `${...}` placeholders against its configuration and executes it as a
transaction. We write every value out explicitly, so the same file serves every site:

- per site an Organization (profile `organization`) with the SHA-512 thumbprint of the site's
  client certificate (extension `extension-certificate-thumbprint`) and an Endpoint (profile
  `endpoint`, address = the site's FHIR base URL);
- one parent Organization (profile `organization-parent`) and, per site, an
  OrganizationAffiliation (parent -> site) carrying the site's organization-role code(s).

Everything carries the read-access tag ALL, as in the DSF test set-ups.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from lxml import etree

FHIR_NS = "http://hl7.org/fhir"
SID_ORG = "http://dsf.dev/sid/organization-identifier"
SID_ENDPOINT = "http://dsf.dev/sid/endpoint-identifier"
CS_ROLE = "http://dsf.dev/fhir/CodeSystem/organization-role"
EXT_THUMBPRINT = "http://dsf.dev/fhir/StructureDefinition/extension-certificate-thumbprint"
SD = "http://dsf.dev/fhir/StructureDefinition/"


@dataclass
class AllowListEntry:
    identifier: str  # DSF organization identifier, e.g. dic.omi.test
    name: str
    thumbprint: str
    endpoint_identifier: str
    endpoint_address: str  # https://localhost:<port>/fhir
    roles: list[str] = field(default_factory=list)


def _uuid(*parts: str) -> str:
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, "omi-testbed:" + ":".join(parts)))


def _el(parent, tag: str, value: str | None = None, **attrs):
    e = etree.SubElement(parent, f"{{{FHIR_NS}}}{tag}", **attrs)
    if value is not None:
        e.set("value", value)
    return e


def _meta(res, profile: str) -> None:
    meta = _el(res, "meta")
    _el(meta, "profile", SD + profile)
    tag = _el(meta, "tag")
    _el(tag, "system", "http://dsf.dev/fhir/CodeSystem/read-access-tag")
    _el(tag, "code", "ALL")


def _ref(parent, tag: str, ref: str, rtype: str) -> None:
    r = _el(parent, tag)
    _el(r, "reference", ref)
    _el(r, "type", rtype)


def _entry(bundle, full_url: str, rtype: str):
    entry = _el(bundle, "entry")
    _el(entry, "fullUrl", full_url)
    holder = _el(entry, "resource")
    res = _el(holder, rtype)
    req = etree.Element(f"{{{FHIR_NS}}}request")
    return entry, res, req


def build_bundle(entries: list[AllowListEntry], parent_identifier: str) -> bytes:
    """The transaction Bundle (XML bytes) for the given sites."""
    bundle = etree.Element(f"{{{FHIR_NS}}}Bundle", nsmap={None: FHIR_NS})
    _el(bundle, "type", "transaction")

    parent_url = _uuid("org", parent_identifier)
    for e in entries:
        org_url, ep_url = _uuid("org", e.identifier), _uuid("endpoint", e.endpoint_identifier)

        entry, org, req = _entry(bundle, org_url, "Organization")
        _meta(org, "organization")
        ext = _el(org, "extension", url=EXT_THUMBPRINT)
        _el(ext, "valueString", e.thumbprint)
        ident = _el(org, "identifier")
        _el(ident, "system", SID_ORG)
        _el(ident, "value", e.identifier)
        _el(org, "active", "true")
        _el(org, "name", e.name)
        _ref(org, "endpoint", ep_url, "Endpoint")
        entry.append(req)
        _el(req, "method", "PUT")
        _el(req, "url", f"Organization?identifier={SID_ORG}|{e.identifier}")

        entry, ep, req = _entry(bundle, ep_url, "Endpoint")
        _meta(ep, "endpoint")
        ident = _el(ep, "identifier")
        _el(ident, "system", SID_ENDPOINT)
        _el(ident, "value", e.endpoint_identifier)
        _el(ep, "status", "active")
        ct = _el(ep, "connectionType")
        _el(ct, "system", "http://terminology.hl7.org/CodeSystem/endpoint-connection-type")
        _el(ct, "code", "hl7-fhir-rest")
        _el(ep, "name", f"{e.name} FHIR")
        _ref(ep, "managingOrganization", org_url, "Organization")
        pt = _el(_el(ep, "payloadType"), "coding")
        _el(pt, "system", "http://hl7.org/fhir/resource-types")
        _el(pt, "code", "Task")
        _el(ep, "payloadMimeType", "application/fhir+json")
        _el(ep, "payloadMimeType", "application/fhir+xml")
        _el(ep, "address", e.endpoint_address)
        entry.append(req)
        _el(req, "method", "PUT")
        _el(req, "url", f"Endpoint?identifier={SID_ENDPOINT}|{e.endpoint_identifier}")

    entry, parent, req = _entry(bundle, parent_url, "Organization")
    _meta(parent, "organization-parent")
    ident = _el(parent, "identifier")
    _el(ident, "system", SID_ORG)
    _el(ident, "value", parent_identifier)
    _el(parent, "active", "true")
    entry.append(req)
    _el(req, "method", "PUT")
    _el(req, "url", f"Organization?identifier={SID_ORG}|{parent_identifier}")

    for e in entries:
        if not e.roles:
            continue
        entry, aff, req = _entry(bundle, _uuid("affiliation", parent_identifier, e.identifier),
                                 "OrganizationAffiliation")
        _meta(aff, "organization-affiliation")
        _el(aff, "active", "true")
        _ref(aff, "organization", parent_url, "Organization")
        _ref(aff, "participatingOrganization", _uuid("org", e.identifier), "Organization")
        for role in e.roles:
            coding = _el(_el(aff, "code"), "coding")
            _el(coding, "system", CS_ROLE)
            _el(coding, "code", role)
        _ref(aff, "endpoint", _uuid("endpoint", e.endpoint_identifier), "Endpoint")
        entry.append(req)
        _el(req, "method", "POST")
        _el(req, "url", "OrganizationAffiliation")
        _el(req, "ifNoneExist",
            f"primary-organization:identifier={SID_ORG}|{parent_identifier}"
            f"&participating-organization:identifier={SID_ORG}|{e.identifier}")

    return etree.tostring(bundle, pretty_print=True, xml_declaration=True, encoding="UTF-8")
