"""FHIR metadata resources of a plugin: structure (fhir.resources) and the DSF's load rules."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from lxml import etree

from omi_dsf.validate.findings import Finding
from omi_dsf.validate.source import XML_PARSER

FHIR = "http://hl7.org/fhir"
SUPPORTED = {"ActivityDefinition", "CodeSystem", "Library", "Measure", "NamingSystem", "Questionnaire",
             "StructureDefinition", "Task", "ValueSet"}
DSF_PROFILES = {
    "ActivityDefinition": "http://dsf.dev/fhir/StructureDefinition/activity-definition",
    "StructureDefinition": "http://dsf.dev/fhir/StructureDefinition/structure-definition",
    "CodeSystem": "http://dsf.dev/fhir/StructureDefinition/code-system",
    "ValueSet": "http://dsf.dev/fhir/StructureDefinition/value-set",
    "Questionnaire": "http://dsf.dev/fhir/StructureDefinition/questionnaire",
}
AD_URL_RE = re.compile(r"^https?://(?P<domain>[^/]+)/bpe/Process/(?P<name>[a-zA-Z0-9-]+)$")
INSTANTIATES_RE = re.compile(r"^(?P<url>https?://[^/]+/bpe/Process/[a-zA-Z0-9-]+)\|(?P<version>#\{version\}|\d+\.\d+)$")
AUTH_EXT = "http://dsf.dev/fhir/StructureDefinition/extension-process-authorization"
BPMN_MESSAGE = "http://dsf.dev/fhir/CodeSystem/bpmn-message"
ORG_SID = "http://dsf.dev/sid/organization-identifier"
TASK_SID = "http://dsf.dev/sid/task-identifier"
# what the BPE substitutes at load time, for structural parsing only
SAMPLE_VALUES = {"#{version}": "1.0", "#{date}": "2026-01-01", "#{organization}": "example.org"}


@dataclass
class Authorization:
    message_name: str
    task_profile: str


@dataclass
class FhirResource:
    file: str
    type: str
    url: str = ""
    version: str = ""
    profiles: list[str] = field(default_factory=list)
    authorizations: list[Authorization] = field(default_factory=list)      # ActivityDefinition
    instantiates: str = ""                                                   # Task
    message_name: str = ""                                                   # Task
    identifier: str = ""                                                     # Task
    status: str = ""
    bindings: list[str] = field(default_factory=list)                       # StructureDefinition valueSets
    includes: list[str] = field(default_factory=list)                       # ValueSet compose systems


def _v(el, path: str) -> str:
    found = el.find(path, {"f": FHIR})
    return found.get("value", "") if found is not None else ""


def _all(el, path: str) -> list[etree._Element]:
    return el.findall(path, {"f": FHIR})


def parse_resource(file: str, data: bytes) -> tuple[etree._Element | None, str | None]:
    """The resource as an XML element (JSON is converted through fhir.resources), or an error."""
    if file.endswith(".json"):
        try:
            obj = json.loads(data)
            from fhir.resources.R4B import construct_fhir_element

            xml = construct_fhir_element(obj["resourceType"], obj).model_dump_xml()
            return etree.fromstring(xml.encode(), XML_PARSER), None
        except Exception as exc:   # noqa: BLE001 - any parse failure is a finding
            return None, f"not a FHIR JSON resource: {exc}"
    try:
        return etree.fromstring(data, XML_PARSER), None
    except etree.XMLSyntaxError as exc:
        return None, f"malformed XML: {exc}"


def check_structure(file: str, data: bytes, rtype: str) -> list[Finding]:
    """Parse with fhir.resources (FHIR R4B models, the nearest to R4 the package ships)."""
    if not file.endswith(".xml"):
        return []
    text = data.decode("utf-8")
    for k, v in SAMPLE_VALUES.items():
        text = text.replace(k, v)
    try:
        import importlib

        module = importlib.import_module(f"fhir.resources.R4B.{rtype.lower()}")
        getattr(module, rtype).model_validate_xml(text.encode())
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).replace("\n", " ")
        return [Finding(file, rtype, "fhir-structure", f"not a valid FHIR {rtype}: {msg[:300]}")]
    return []


def check_fhir(file: str, data: bytes, resource_version: str | None, api: str, example: bool = False) -> tuple[FhirResource | None, list[Finding]]:
    out: list[Finding] = []

    def bad(element: str, rule: str, msg: str) -> None:
        out.append(Finding(file, element, rule, msg))

    root, err = parse_resource(file, data)
    if root is None:
        bad("", "fhir-parse", err)
        return None, out
    if etree.QName(root).namespace != FHIR:
        bad("", "fhir-namespace", f"root element is not in the FHIR namespace {FHIR}")
        return None, out
    rtype = etree.QName(root).localname
    res = FhirResource(file, rtype, _v(root, "f:url"), _v(root, "f:version"),
                       [p.get("value", "") for p in _all(root, "f:meta/f:profile")], status=_v(root, "f:status"))
    if rtype not in SUPPORTED:
        bad(rtype, "dsf-resource-type", f"{rtype} is not a supported plugin resource type {sorted(SUPPORTED)}")
        return res, out
    out += check_structure(file, data, rtype)

    if rtype == "Task":
        _check_task(root, res, bad, example)
        return res, out

    if not res.url:
        bad(f"{rtype}.url", "dsf-url", "url is required")
    if not res.version:
        bad(f"{rtype}.version", "dsf-version", "version is required")
    elif res.version != "#{version}" and res.version != resource_version:
        bad(f"{rtype}.version", "dsf-version", f"version '{res.version}' must be '#{{version}}' (the plugin's resource version)")
    if api == "v2" and rtype in DSF_PROFILES and not any(p.split("|")[0] == DSF_PROFILES[rtype] for p in res.profiles):
        bad(f"{rtype}.meta.profile", "dsf-profile", f"API v2 resources must declare {DSF_PROFILES[rtype]}")
    if res.status not in ("unknown", "draft", "active", "retired"):
        bad(f"{rtype}.status", "dsf-status", f"status '{res.status}' (use 'unknown': the BPE manages it)")

    if rtype == "ActivityDefinition":
        m = AD_URL_RE.match(res.url)
        if not m:
            bad("ActivityDefinition.url", "dsf-activity-definition-url", f"'{res.url}' must be http(s)://<domain>/bpe/Process/<name>")
        if _v(root, "f:kind") != "Task":
            bad("ActivityDefinition.kind", "dsf-activity-definition-kind", "kind must be 'Task'")
        blocks = [e for e in _all(root, "f:extension") if e.get("url") == AUTH_EXT]
        if not blocks:
            bad("ActivityDefinition.extension", "dsf-process-authorization", f"no {AUTH_EXT} block: no Task may start this process")
        for i, b in enumerate(blocks):
            subs = {s.get("url"): s for s in _all(b, "f:extension")}
            name, prof = _v(subs.get("message-name", b), "f:valueString"), _v(subs.get("task-profile", b), "f:valueCanonical")
            for k in ("message-name", "task-profile", "requester", "recipient"):
                if k not in subs:
                    bad(f"process-authorization[{i}]", "dsf-process-authorization", f"sub-extension '{k}' is missing")
            if prof and "|" not in prof:
                bad(f"process-authorization[{i}].task-profile", "dsf-process-authorization", f"task-profile '{prof}' needs |#{{version}}")
            for s in _all(b, "f:extension"):
                if s.get("url") in ("requester", "recipient"):
                    code = _v(s, "f:valueCoding/f:code")
                    if s.get("url") == "recipient" and code not in ("LOCAL_ALL", "LOCAL_ORGANIZATION", "LOCAL_ROLE"):
                        bad(f"process-authorization[{i}].recipient", "dsf-process-authorization", f"'{code}' is not a recipient code")
            res.authorizations.append(Authorization(name, prof))
    elif rtype == "Questionnaire":
        links = []
        for item in root.iter(f"{{{FHIR}}}item"):
            link, typ = _v(item, "f:linkId"), _v(item, "f:type")
            links.append(link)
            if typ != "display" and item.find("f:required", {"f": FHIR}) is None:
                bad(f"Questionnaire.item[{link}]", "dsf-questionnaire-required", "item needs 'required'")
        for needed in ("business-key", "user-task-id"):
            if needed not in links:
                bad("Questionnaire.item", "dsf-questionnaire-items", f"item '{needed}' is required by the DSF")
    elif rtype == "StructureDefinition":
        for b in root.iter(f"{{{FHIR}}}valueSet"):
            vs = b.get("value", "")
            res.bindings.append(vs)
            if vs.startswith("http://dsf.dev/") and vs.endswith(("|1.0.0", "|2.0.0")):
                bad("StructureDefinition.binding", "dsf-binding-version", f"DSF ValueSet binding '{vs}' must not pin 1.0.0/2.0.0")
        base = _v(root, "f:baseDefinition")
        if api == "v2" and base.endswith("/task-base"):
            bad("StructureDefinition.baseDefinition", "dsf-task-base", "API v2 plugins must derive from …/task, not task-base")
    elif rtype == "ValueSet":
        res.includes = [_v(i, "f:system") for i in _all(root, "f:compose/f:include")]
    elif rtype == "NamingSystem" and not _v(root, "f:name"):
        bad("NamingSystem.name", "dsf-naming-system", "name is required")
    return res, out


def _check_task(root, res: FhirResource, bad, example: bool) -> None:
    res.instantiates = _v(root, "f:instantiatesCanonical")
    res.identifier = _v(root, "f:identifier/f:value")
    for inp in _all(root, "f:input"):
        if _v(inp, "f:type/f:coding/f:system") == BPMN_MESSAGE and _v(inp, "f:type/f:coding/f:code") == "message-name":
            res.message_name = _v(inp, "f:valueString")
    if not res.profiles:
        bad("Task.meta.profile", "dsf-task-profile", "a Task needs meta.profile (its Task profile |#{version})")
    if not INSTANTIATES_RE.match(res.instantiates):
        bad("Task.instantiatesCanonical", "dsf-instantiates-canonical",
            f"'{res.instantiates}' must be http(s)://<domain>/bpe/Process/<name>|#{{version}}")
    names = [i for i in _all(root, "f:input") if _v(i, "f:type/f:coding/f:code") == "message-name"
             and _v(i, "f:type/f:coding/f:system") == BPMN_MESSAGE]
    if len(names) != 1:
        bad("Task.input:message-name", "dsf-task-message-name", f"exactly one message-name input is required, found {len(names)}")
    if example:
        return
    # draft Tasks: the start templates the BPE installs
    if _v(root, "f:identifier/f:system") != TASK_SID:
        bad("Task.identifier", "dsf-draft-task-identifier", f"draft Task needs an identifier with system {TASK_SID}")
    elif "|" in res.identifier:
        bad("Task.identifier", "dsf-draft-task-identifier", "identifier value must not contain '|'")
    if res.status != "draft":
        bad("Task.status", "dsf-draft-task-status", f"status is '{res.status}', a plugin Task must be 'draft'")
    for who in ("f:requester", "f:restriction/f:recipient"):
        if _v(root, f"{who}/f:identifier/f:system") != ORG_SID or _v(root, f"{who}/f:identifier/f:value") != "#{organization}" \
                or _v(root, f"{who}/f:type") != "Organization":
            bad(f"Task.{who[2:].replace('/f:', '.')}", "dsf-draft-task-organization",
                "requester and recipient must be the local organization (Organization, organization-identifier #{organization})")
    if _all(root, "f:output"):
        bad("Task.output", "dsf-draft-task-output", "a draft Task must not have outputs")
