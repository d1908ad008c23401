"""Validate a whole plugin (folder or jar): each file on its own, then the references between them."""

from __future__ import annotations

from pathlib import Path

from omi_dsf.spec.model import process_id, resource_version
from omi_dsf.validate.bpmn import INSTANTIATES_RE, BpmnModel, check_bpmn
from omi_dsf.validate.fhir import AD_URL_RE, FhirResource, check_fhir
from omi_dsf.validate.findings import Finding
from omi_dsf.validate.source import DEFINITION_SERVICES, PluginSource, SourceError, load_source

def _resource_version(src: PluginSource) -> str | None:
    """a.b of the plugin version, where the plugin says it (our index); None if unknown."""
    for path, data in src.files.items():
        if path.endswith("omi-plugin.properties"):
            for line in data.decode("utf-8").splitlines():
                if line.startswith("version="):
                    return resource_version(line.split("=", 1)[1].strip())
    return None


def _check_definition(src: PluginSource) -> tuple[str, list[Finding]]:
    """A jar must name exactly one ProcessPluginDefinition through ServiceLoader."""
    found = [(p, api) for p, api in DEFINITION_SERVICES.items() if p in src.files]
    if not src.is_jar:
        return (found[0][1] if found else "v1"), []
    if not found:
        return "v1", [Finding(src.name, "META-INF/services", "dsf-plugin-definition",
                              "no plugin definition: needs META-INF/services/dev.dsf.bpe.v1.ProcessPluginDefinition (or .v2.)")]
    out = []
    path, api = found[0]
    classes = [l.strip() for l in src.files[path].decode("utf-8").splitlines() if l.strip() and not l.startswith("#")]
    if len(classes) != 1:
        out.append(Finding(src.name, path, "dsf-plugin-definition", f"exactly one definition class must be listed, found {len(classes)}"))
    for c in classes:
        if c.replace(".", "/") + ".class" not in src.files:
            out.append(Finding(src.name, path, "dsf-plugin-definition", f"definition class {c} is not in the jar"))
    return api, out


def _cross_check(models: list[BpmnModel], resources: list[FhirResource], examples: list[FhirResource]) -> list[Finding]:
    out: list[Finding] = []
    by_type: dict[str, dict[str, FhirResource]] = {}
    for r in resources:
        if r.url:
            if r.url in by_type.setdefault(r.type, {}):
                out.append(Finding(r.file, f"{r.type}.url", "xref-duplicate", f"{r.url} is defined twice (also {by_type[r.type][r.url].file})"))
            by_type[r.type][r.url] = r
    sds, ads, qs, vss = (by_type.get(t, {}) for t in ("StructureDefinition", "ActivityDefinition", "Questionnaire", "ValueSet"))
    css = by_type.get("CodeSystem", {})

    def bare(url: str) -> str:
        return url.split("|")[0]

    authorized = {(a.message_name, bare(a.task_profile)): ad for ad in ads.values() for a in ad.authorizations}
    authorized_names = {name for name, _ in authorized}
    for ad in ads.values():
        for a in ad.authorizations:
            if bare(a.task_profile) not in sds and not a.task_profile.startswith("http://dsf.dev/"):
                out.append(Finding(ad.file, f"process-authorization[{a.message_name}]", "xref-task-profile",
                                   f"task-profile {a.task_profile} is not a StructureDefinition of the plugin"))

    process_ids = {}
    for m in models:
        if m.process_id in process_ids:
            out.append(Finding(m.file, f"process#{m.process_id}", "dsf-duplicate-process", f"process id also in {process_ids[m.process_id]}"))
        process_ids[m.process_id] = m.file
        # exactly one ActivityDefinition whose URL converts to this process id
        matching = [ad for ad in ads.values() if (mm := AD_URL_RE.match(ad.url))
                    and process_id(mm['domain'], mm['name']) == m.process_id]
        if len(matching) != 1:
            out.append(Finding(m.file, f"process#{m.process_id}", "dsf-activity-definition",
                               f"needs exactly one ActivityDefinition with url http(s)://<domain>/bpe/Process/<name> "
                               f"converting to '{m.process_id}', found {len(matching)}"))
        for name in m.start_messages + m.catch_messages:
            if name not in authorized_names:
                out.append(Finding(m.file, f"message {name}", "xref-message-authorization",
                                   f"message '{name}' has no process-authorization block (message-name + task-profile) in any ActivityDefinition"))
        for s in m.sends:
            name, prof = s.fields.get("messageName", ""), s.fields.get("profile", "")
            if prof and not prof.startswith("${") and bare(prof) not in sds:
                out.append(Finding(m.file, s.element, "xref-task-profile", f"profile {prof} is not a StructureDefinition of the plugin"))
            if name and (name, bare(prof)) not in authorized:
                out.append(Finding(m.file, s.element, "xref-message-authorization",
                                   f"no ActivityDefinition authorizes message '{name}' with profile {prof}"))
            ic = INSTANTIATES_RE.match(s.fields.get("instantiatesCanonical", ""))
            if ic and ic["url"] not in ads:
                out.append(Finding(m.file, s.element, "xref-instantiates",
                                   f"instantiatesCanonical {ic['url']} is not an ActivityDefinition of the plugin"))
        for element, key in m.form_keys:
            if key and bare(key) not in qs:
                out.append(Finding(m.file, f"userTask#{element}", "xref-questionnaire", f"formKey {key} has no Questionnaire"))

    for sd in sds.values():
        for vs in sd.bindings:
            if not vs.startswith("http://dsf.dev/") and not vs.startswith("http://hl7.org/") and bare(vs) not in vss:
                out.append(Finding(sd.file, "binding", "xref-value-set", f"ValueSet {vs} is not part of the plugin"))
    for vs in vss.values():
        for system in vs.includes:
            if system and not system.startswith(("http://dsf.dev/", "http://hl7.org/", "http://terminology.hl7.org/")) and system not in css:
                out.append(Finding(vs.file, "compose.include", "xref-code-system", f"CodeSystem {system} is not part of the plugin"))

    for task in [r for r in resources if r.type == "Task"] + examples:
        for p in task.profiles:
            if bare(p) not in sds:
                out.append(Finding(task.file, "Task.meta.profile", "xref-task-profile", f"profile {p} is not a StructureDefinition of the plugin"))
        ic = INSTANTIATES_RE.match(task.instantiates)
        if ic:
            if ic["url"] not in ads:
                out.append(Finding(task.file, "Task.instantiatesCanonical", "xref-instantiates", f"{ic['url']} is not an ActivityDefinition of the plugin"))
            elif task in resources and not task.identifier.startswith(f"{ic['url']}/{ic['version']}/"):
                out.append(Finding(task.file, "Task.identifier", "dsf-draft-task-identifier",
                                   f"identifier must start with {ic['url']}/{ic['version']}/"))
        if task.message_name and task.message_name not in authorized_names:
            out.append(Finding(task.file, "Task.input:message-name", "xref-message-authorization",
                               f"message '{task.message_name}' is not authorized by any ActivityDefinition"))
    return out


def validate_source(src: PluginSource) -> list[Finding]:
    api, findings = _check_definition(src)
    version = _resource_version(src)
    models, resources, examples = [], [], []
    if not src.bpmn_files:
        findings.append(Finding(src.name, "", "dsf-process-models", "no BPMN model (*.bpmn) found"))
    for path in src.bpmn_files:
        try:
            root = src.parse_xml(path)
        except Exception as exc:  # noqa: BLE001 - lxml syntax errors
            findings.append(Finding(path, "", "xml-parse", f"malformed XML: {exc}"))
            continue
        model, f = check_bpmn(path, root, version)
        models.append(model)
        findings += f
    if not src.fhir_files:
        findings.append(Finding(src.name, "", "dsf-fhir-resources", "no FHIR resources found (fhir/ or fhir_profiles/)"))
    for path in src.fhir_files:
        res, f = check_fhir(path, src.files[path], version, api)
        findings += f
        if res:
            resources.append(res)
    for path in src.example_files:
        res, f = check_fhir(path, src.files[path], version, api, example=True)
        findings += f
        if res:
            examples.append(res)
    return findings + _cross_check(models, resources, examples)


def validate_path(path: Path) -> list[Finding]:
    try:
        return validate_source(load_source(path))
    except SourceError as exc:
        return [Finding(str(path), "", "source", str(exc))]
