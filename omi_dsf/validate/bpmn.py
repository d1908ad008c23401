"""BPMN 2.0 models: schema validity (the XSDs SpiffWorkflow ships) and the DSF's load rules."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import xmlschema
from lxml import etree

from omi_dsf.validate.findings import Finding

BPMN = "http://www.omg.org/spec/BPMN/20100524/MODEL"
CAMUNDA = "http://camunda.org/schema/1.0/bpmn"
NS = {"bpmn": BPMN, "camunda": CAMUNDA}

PROCESS_ID_RE = re.compile(r"^(?P<domain>[a-zA-Z0-9-]+)_(?P<name>[a-zA-Z0-9-]+)$")
INSTANTIATES_RE = re.compile(r"^(?P<url>https?://(?P<domain>[^/]+)/bpe/Process/(?P<name>[a-zA-Z0-9-]+))\|(?P<version>#\{version\}|\d+\.\d+)$")
VERSIONED_URL_RE = re.compile(r"^https?://\S+\|(#\{version\}|\d+\.\d+)$")
PLACEHOLDER_RE = re.compile(r"#\{([^}]*)\}")
KNOWN_PLACEHOLDERS = {"version", "date", "organization"}
SEND_FIELDS = ("instantiatesCanonical", "messageName", "profile")


@dataclass
class SendInfo:
    element: str
    fields: dict[str, str]


@dataclass
class BpmnModel:
    """What the cross checks need to know about one model."""
    file: str
    process_id: str = ""
    version_tag: str = ""
    start_messages: list[str] = field(default_factory=list)
    catch_messages: list[str] = field(default_factory=list)
    sends: list[SendInfo] = field(default_factory=list)
    form_keys: list[tuple[str, str]] = field(default_factory=list)   # (element id, formKey)
    classes: list[tuple[str, str]] = field(default_factory=list)     # (element id, class name)


@lru_cache(maxsize=1)
def bpmn_schema() -> xmlschema.XMLSchema:
    import SpiffWorkflow

    xsd = Path(SpiffWorkflow.__file__).parent / "bpmn" / "parser" / "schema" / "BPMN20.xsd"
    return xmlschema.XMLSchema(str(xsd))


def _eid(el: etree._Element) -> str:
    return f"{etree.QName(el).localname}#{el.get('id', '?')}"


def check_bpmn(file: str, root: etree._Element, resource_version: str | None) -> tuple[BpmnModel, list[Finding]]:
    out: list[Finding] = []
    model = BpmnModel(file)

    def bad(element: str, rule: str, msg: str) -> None:
        out.append(Finding(file, element, rule, msg))

    if etree.QName(root).namespace != BPMN or etree.QName(root).localname != "definitions":
        bad("", "bpmn-root", "root element is not bpmn:definitions")
        return model, out
    for err in bpmn_schema().iter_errors(root):
        path = err.path or ""
        bad(path, "bpmn-xsd", f"BPMN 2.0 schema: {err.reason}")
        if len(out) > 20:
            break

    processes = root.findall("bpmn:process", NS)
    if len(processes) != 1:
        bad("", "dsf-one-process", f"exactly one <bpmn:process> per file is required, found {len(processes)}")
        if not processes:
            return model, out
    proc = processes[0]
    pid = proc.get("id", "")
    model.process_id = pid
    if not PROCESS_ID_RE.match(pid):
        bad(_eid(proc), "dsf-process-id", f"process id '{pid}' must match <domain-without-dots>_<name> ({PROCESS_ID_RE.pattern})")
    if proc.get("isExecutable") != "true":
        bad(_eid(proc), "dsf-executable", "process must be isExecutable=\"true\"")
    tag = proc.get(f"{{{CAMUNDA}}}versionTag", "")
    model.version_tag = tag
    if tag != "#{version}" and (resource_version is None or tag != resource_version):
        bad(_eid(proc), "dsf-version-tag", f"camunda:versionTag is '{tag}', must be '#{{version}}'"
            + (f" or '{resource_version}'" if resource_version else ""))

    messages = {m.get("id"): m.get("name", "") for m in root.findall("bpmn:message", NS)}
    for mid, name in messages.items():
        if not name:
            bad(f"message#{mid}", "bpmn-message-name", "message has no name")

    starts = proc.findall("bpmn:startEvent", NS)
    for s in starts:
        med = s.find("bpmn:messageEventDefinition", NS)
        if med is None:
            bad(_eid(s), "dsf-message-start", "every DSF process starts with a message start event")
            continue
        ref = med.get("messageRef")
        if ref not in messages:
            bad(_eid(s), "bpmn-message-ref", f"messageRef '{ref}' names no <bpmn:message>")
        else:
            model.start_messages.append(messages[ref])
    if not starts:
        bad(_eid(proc), "dsf-message-start", "process has no start event")

    for ev in proc.iter(f"{{{BPMN}}}intermediateCatchEvent", f"{{{BPMN}}}boundaryEvent"):
        med = ev.find("bpmn:messageEventDefinition", NS)
        if med is not None:
            ref = med.get("messageRef")
            if ref not in messages:
                bad(_eid(ev), "bpmn-message-ref", f"messageRef '{ref}' names no <bpmn:message>")
            else:
                model.catch_messages.append(messages[ref])

    # Java hooks: each must name a class; senders need the three message fields
    for el in proc.iter(f"{{{BPMN}}}serviceTask", f"{{{BPMN}}}sendTask"):
        cls = el.get(f"{{{CAMUNDA}}}class")
        if not cls:
            bad(_eid(el), "dsf-class-missing", "camunda:class is required (the DSF has no external tasks)")
        else:
            model.classes.append((el.get("id", ""), cls))
        if etree.QName(el).localname == "sendTask":
            _check_send(el, el, model, bad)
    for ev in proc.iter(f"{{{BPMN}}}intermediateThrowEvent", f"{{{BPMN}}}endEvent"):
        med = ev.find("bpmn:messageEventDefinition", NS)
        if med is None:
            continue
        cls = med.get(f"{{{CAMUNDA}}}class")
        if not cls:
            bad(_eid(ev), "dsf-class-missing", "message throw/end event needs camunda:class on its messageEventDefinition")
        else:
            model.classes.append((ev.get("id", ""), cls))
        _check_send(ev, med, model, bad)
    for listener in proc.iter(f"{{{CAMUNDA}}}executionListener", f"{{{CAMUNDA}}}taskListener"):
        if not listener.get("class"):
            bad(_eid(listener.getparent().getparent()), "dsf-listener-class", "listeners must name a class (camunda:class)")
        else:
            model.classes.append((listener.getparent().getparent().get("id", ""), listener.get("class")))
    for ut in proc.iter(f"{{{BPMN}}}userTask"):
        key = ut.get(f"{{{CAMUNDA}}}formKey", "")
        if not key:
            bad(_eid(ut), "dsf-user-task-form", "user task needs camunda:formKey = Questionnaire url|version")
        elif not VERSIONED_URL_RE.match(key):
            bad(_eid(ut), "dsf-user-task-form", f"formKey '{key}' must be a Questionnaire URL with |#{{version}}")
        model.form_keys.append((ut.get("id", ""), key))

    # placeholders: unknown #{x} fails the BPE's placeholder resolution unless an env var exists
    text = etree.tostring(root, encoding="unicode")
    for name in sorted(set(PLACEHOLDER_RE.findall(text)) - KNOWN_PLACEHOLDERS):
        if not re.match(r"^[a-z][a-z0-9]*(\.[a-z0-9]+)+$", name):
            bad("", "dsf-placeholder", f"unknown placeholder #{{{name}}} (known: #{{version}}, #{{date}}, #{{organization}}, #{{property.name}})")
    return model, out


def _check_send(owner: etree._Element, holder: etree._Element, model: BpmnModel, bad) -> None:
    fields = {}
    for f in holder.findall("bpmn:extensionElements/camunda:field", NS):
        s = f.find("camunda:string", NS)
        e = f.find("camunda:expression", NS)
        value = (s.text if s is not None else f.get("stringValue")) or (e.text if e is not None else f.get("expression")) or ""
        fields[f.get("name")] = value.strip()
    for name in SEND_FIELDS:
        if not fields.get(name):
            bad(_eid(owner), "dsf-send-fields", f"message send needs the field '{name}'")
    ic = fields.get("instantiatesCanonical", "")
    if ic and not ic.startswith("${") and not INSTANTIATES_RE.match(ic):
        bad(_eid(owner), "dsf-instantiates-canonical", f"instantiatesCanonical '{ic}' must be http(s)://<domain>/bpe/Process/<name>|#{{version}}")
    prof = fields.get("profile", "")
    if prof and not prof.startswith("${") and not VERSIONED_URL_RE.match(prof):
        bad(_eid(owner), "dsf-send-profile", f"profile '{prof}' must be a StructureDefinition URL with |#{{version}}")
    model.sends.append(SendInfo(owner.get("id", ""), fields))
