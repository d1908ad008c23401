"""The plugin build: spec checks, rendering, the validator's rules (one broken variant each), the jar."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from helpers_cli import run_cli
from omi_dsf.generate.build import BuildError, build, check, stale_files, write_tree
from omi_dsf.generate.render import render
from omi_dsf.spec.model import DEFAULT_SPEC, SpecError, load_spec, parse_spec
from omi_dsf.validate.plugin import validate_path

ROOT = Path(__file__).resolve().parent.parent
RAW = yaml.safe_load(DEFAULT_SPEC.read_text())


def rules(findings) -> set[str]:
    return {f.rule for f in findings}


@pytest.fixture(scope="module")
def rendered():
    return render(load_spec())


@pytest.fixture
def tree(tmp_path, rendered):
    write_tree(rendered, tmp_path)
    return tmp_path


# -- spec -----------------------------------------------------------------------------------


def test_spec_describes_both_processes_and_their_steps():
    spec = load_spec()
    names = {p.name: p for p in spec.processes}
    assert set(names) == {"omiInferenceRequest", "omiInferenceExecute"}
    request = names["omiInferenceRequest"]
    assert [s.name for s in request.all_steps() if s.kind == "work_item"] == ["consent", "prepare", "send", "return"]
    # the provider is asked before the study is sent, and the answer is awaited while it is being sent
    kinds = [s.kind for s in request.steps]
    assert kinds.index("send") < kinds.index("parallel")
    parallel = request.steps[kinds.index("parallel")]
    assert [[(s.kind, s.name) for s in b] for b in parallel.branches] == [
        [("work_item", "send")], [("receive", "omiInferenceResult")]]
    assert [s.name for s in names["omiInferenceExecute"].steps if s.kind == "work_item"] == ["infer"]
    assert spec.process_id(names["omiInferenceRequest"]) == "medizininformatik-initiativede_omiInferenceRequest"


def _parallel(raw) -> list:
    """The branches of the request process's parallel step in a raw spec."""
    return next(st["parallel"] for st in raw["processes"][0]["steps"] if "parallel" in st)


def _broken(mutate) -> list[str]:
    raw = copy.deepcopy(RAW)
    mutate(raw)
    with pytest.raises(SpecError) as exc:
        parse_spec(raw)
    return exc.value.findings


@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r["plugin"].update(version="1.0"), r"plugin\.version: '1\.0' is not a DSF plugin version"),
    (lambda r: r["processes"][0]["steps"][2].update(send="executeSomethingElse"), r"message 'executeSomethingElse' is not defined.*dangling"),
    (lambda r: r["processes"][0]["steps"].pop(3), r"omiInferenceResult: no receive step waits for it \(dangling message\)"),
    (lambda r: r["processes"][0]["steps"][0]["inputs"].append("pseudonym"), r"Questionnaire item 'pseudonym' has no value at this point"),
    (lambda r: r["processes"][0]["steps"][1]["outputs"].append("no-such-code"), r"unknown code 'no-such-code'"),
    (lambda r: r["plugin"]["roles"].update(provider="AI"), r"plugin\.roles\.provider: 'AI' is not a DSF organization-role code"),
    (lambda r: r["processes"][0]["steps"][0].update(timeout="1 hour"), r"timeout: '1 hour' is not an ISO 8601 duration"),
    (lambda r: r["processes"][1]["start"]["recipient"].__setitem__(0, {"code": "REMOTE_ALL"}), r"recipient\[0\]\.code: 'REMOTE_ALL' is not allowed"),
    (lambda r: r["processes"][1]["start"]["inputs"].update({"stored-study-instance-uid": "1..1"}), r"Task input 'stored-study-instance-uid' \(min 1\) has no value"),
    # parallel steps: a branch cannot use what another sets, both cannot set one variable, no nesting
    (lambda r: _parallel(r)[1].insert(1, {"work_item": "peek", "inputs": ["instance-count"]}),
     r"parallel\[1\]\[1\].*Questionnaire item 'instance-count' has no value at this point"),
    (lambda r: _parallel(r)[1].append({"work_item": "twice", "outputs": ["pseudonym"]}),
     r"'pseudonym' is set by more than one branch"),
    (lambda r: _parallel(r)[1].append({"parallel": [[{"work_item": "a"}], [{"work_item": "b"}]]}),
     r"a parallel step cannot be inside another one"),
    (lambda r: _parallel(r).pop(), r"parallel: a list of at least two branches"),
    (lambda r: _parallel(r)[0].append({"end_send": "omiInferenceResult", "role": "requester"}),
     r"a message end must be the last step"),
])
def test_broken_spec_names_the_problem(mutate, expected):
    findings = _broken(mutate)
    assert any(re.search(expected, f) for f in findings), findings
    assert all("\n" not in f for f in findings)


def test_unreadable_spec_is_one_clear_error(tmp_path):
    bad = tmp_path / "spec.yaml"
    bad.write_text("plugin: [unclosed\n")
    with pytest.raises(SpecError) as exc:
        load_spec(bad)
    assert str(bad) in exc.value.findings[0]


# -- render / check -------------------------------------------------------------------------


def test_render_is_deterministic(rendered):
    assert render(load_spec()) == rendered


def test_committed_files_match_the_spec():
    assert check() == []


def test_check_reports_stale_missing_and_extra_files(tree, rendered):
    (tree / "bpmn/omi-inference-request.bpmn").write_text("<stale/>")
    (tree / "fhir_profiles/CodeSystem/omi.xml").unlink()
    (tree / "fhir_profiles/CodeSystem/hand-made.xml").write_text("<x/>")
    found = "\n".join(stale_files(rendered, tree))
    assert "omi-inference-request.bpmn: differs" in found
    assert "CodeSystem/omi.xml: missing" in found
    assert "hand-made.xml: not generated by the spec" in found


def test_build_check_cli_fails_on_stale_tree(tmp_path):
    shutil.copytree(ROOT / "bpmn", tmp_path / "bpmn")
    shutil.copytree(ROOT / "fhir_profiles", tmp_path / "fhir_profiles")
    assert check(root=tmp_path) == []
    p = tmp_path / "fhir_profiles/ValueSet/omi.xml"
    p.write_text(p.read_text().replace("All codes", "Some codes"))
    assert len(check(root=tmp_path)) == 1


def test_generated_resources_validate_clean(tree):
    assert validate_path(tree) == []


BPMN_NS = {"bpmn": "http://www.omg.org/spec/BPMN/20100524/MODEL", "camunda": "http://camunda.org/schema/1.0/bpmn"}
CAMUNDA = "{http://camunda.org/schema/1.0/bpmn}"
# read by the DSF's AbstractTaskMessageSend itself, not by a setter of ours
DSF_SEND_FIELDS = {"instantiatesCanonical", "messageName", "profile"}


def _bpmn_models(tree):
    import xml.etree.ElementTree as ET
    return {p.name: ET.parse(p).getroot() for p in sorted((tree / "bpmn").glob("*.bpmn"))}


def test_every_injected_field_has_a_setter_in_its_glue_class(tree):
    """The DSF linter calls the glue's own fields "unknown field injections" (it knows only the DSF's
    three): each one must be taken by a FixedValue setter of the class that the element names, or the
    engine would reject it when the element first runs."""
    src = ROOT / "plugin/src/main/java"
    seen = 0
    for name, root in _bpmn_models(tree).items():
        for holder in root.iter():
            cls = holder.get(f"{CAMUNDA}class")
            ext = holder.find("bpmn:extensionElements", BPMN_NS)
            if not cls or ext is None:
                continue
            java = (src / (cls.replace(".", "/") + ".java")).read_text()
            for f in ext.findall("camunda:field", BPMN_NS):
                field_name = f.get("name")
                seen += 1
                if field_name in DSF_SEND_FIELDS and "extends AbstractTaskMessageSend" in java:
                    continue
                setter = f"public void set{field_name[0].upper()}{field_name[1:]}(FixedValue "
                assert setter in java, f"{name}: field {field_name} of {cls} has no setter"
    assert seen >= 10


def test_gateway_flows_are_named_and_processes_state_their_history_time_to_live(tree):
    """What the DSF linter asks of the model (docs/operators.md, "DSF linter")."""
    branching = []
    for name, root in _bpmn_models(tree).items():
        for proc in root.findall("bpmn:process", BPMN_NS):
            assert proc.get(f"{CAMUNDA}historyTimeToLive") == "P30D", name
            flows = proc.findall("bpmn:sequenceFlow", BPMN_NS)
            sources = [f.get("sourceRef") for f in flows]
            branching += [f for f in flows if sources.count(f.get("sourceRef")) > 1]
    assert len(branching) >= 10         # an error gateway after each work item, and more
    assert all(f.get("name") for f in branching), [f.get("id") for f in branching if not f.get("name")]


def test_the_request_awaits_the_answer_while_sending_and_any_failure_ends_it(tree):
    """The parallel step in BPMN: a parallel gateway into the send work item and the wait for the
    answer, one out of both; every failure end terminates the process (a failed send must not leave the
    wait for the answer open for 12 hours, nor an error answer the send running)."""
    root = _bpmn_models(tree)["omi-inference-request.bpmn"]
    proc = root.find("bpmn:process", BPMN_NS)
    flows = proc.findall("bpmn:sequenceFlow", BPMN_NS)
    gateways = {g.get("id") for g in proc.findall("bpmn:parallelGateway", BPMN_NS)}
    assert len(gateways) == 2
    out_of = {gw: {f.get("targetRef") for f in flows if f.get("sourceRef") == gw} for gw in gateways}
    into = {gw: {f.get("sourceRef") for f in flows if f.get("targetRef") == gw} for gw in gateways}
    split = next(gw for gw in gateways if len(out_of[gw]) == 2)
    join = next(gw for gw in gateways if len(into[gw]) == 2)
    assert out_of[split] == {"WorkItem_send", "Await_omiInferenceResult"}
    assert into[join] == {"Gateway_send_ok", "Gateway_omiInferenceResult_ok"}
    assert into[split] == {"Send_executeOmiInference"} and out_of[join] == {"WorkItem_return"}
    # the join waits asynchronously: a work item answered and the answer received at the same moment
    # must not join in two transactions at once (the engine refused one: OptimisticLockingException)
    joins = {g.get("id"): g for g in proc.findall("bpmn:parallelGateway", BPMN_NS)}
    assert joins[join].get(f"{CAMUNDA}asyncBefore") == "true" and joins[split].get(f"{CAMUNDA}asyncBefore") is None
    ends = proc.findall("bpmn:endEvent", BPMN_NS)
    plain = [e.get("id") for e in ends if len(e) == len(e.findall("bpmn:incoming", BPMN_NS))]
    assert plain == ["End"]    # the one normal end, after the join; every other end terminates
    assert all(e.find("bpmn:terminateEventDefinition", BPMN_NS) is not None for e in ends if e.get("id") != "End")


def test_broken_spec_writes_nothing(tmp_path):
    for d in ("bpmn", "fhir_profiles"):
        shutil.copytree(ROOT / d, tmp_path / d)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    raw = copy.deepcopy(RAW)
    raw["plugin"]["version"] = "x"
    spec_file = tmp_path / "broken.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError):
        build(spec_file, root=tmp_path, package=False)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != spec_file}
    assert after == before
    assert not (tmp_path / "dist").exists()


def test_cli_build_with_broken_spec_exits_nonzero_with_one_line_per_finding(tmp_path):
    raw = copy.deepcopy(RAW)
    raw["processes"][0]["steps"][0]["timeout"] = "1 hour"
    raw["processes"][0]["steps"][1]["outputs"].append("no-such-code")
    spec_file = tmp_path / "broken.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    proc = run_cli("build", "--no-package", "--spec", str(spec_file))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and "nothing was written" in lines[-1]


# -- validator rules: one broken variant each --------------------------------------------------

REQ = "bpmn/omi-inference-request.bpmn"
EXE = "bpmn/omi-inference-execute.bpmn"
AD = "fhir_profiles/ActivityDefinition/omi-inference-request.xml"
DRAFT = "fhir_profiles/Task/task-start-omi-inference.xml"
Q = "fhir_profiles/Questionnaire/omi-consent.xml"
SD = "fhir_profiles/StructureDefinition/task-execute-omi-inference.xml"

MUTATIONS = [
    # (file, old, new, rule)
    (REQ, '<bpmn:exclusiveGateway id="Gateway_consent_ok"', '<bpmn:exclusiveGatewayX id="Gateway_consent_ok"', "xml-parse"),
    (REQ, 'isExecutable="true"', 'isExecutable="maybe"', "bpmn-xsd"),
    (REQ, "</bpmn:process>", '</bpmn:process><bpmn:process id="a_b" isExecutable="true" />', "dsf-one-process"),
    (REQ, 'id="medizininformatik-initiativede_omiInferenceRequest"', 'id="omiInferenceRequest"', "dsf-process-id"),
    (REQ, 'camunda:versionTag="#{version}"', 'camunda:versionTag="1.0.0"', "dsf-version-tag"),
    (REQ, ' camunda:class="de.medizininformatik_initiative.omi.dsf.ReadTaskInputs"', "", "dsf-class-missing"),
    (REQ, '<camunda:field name="messageName">', '<camunda:field name="messageNameX">', "dsf-send-fields"),
    (REQ, "/bpe/Process/omiInferenceExecute|#{version}", "/Process/omiInferenceExecute", "dsf-instantiates-canonical"),
    (EXE, '<bpmn:messageEventDefinition id="Start_message" messageRef="Message_executeOmiInference" />', "", "dsf-message-start"),
    (REQ, 'camunda:formKey="http://medizininformatik-initiative.de/fhir/Questionnaire/omi-consent|#{version}"', "", "dsf-user-task-form"),
    (REQ, "<bpmn:documentation>", "<bpmn:documentation>#{Unknown}", "dsf-placeholder"),
    (REQ, "fhir/Questionnaire/omi-consent|", "fhir/Questionnaire/omi-missing|", "xref-questionnaire"),
    (REQ, "<camunda:string>executeOmiInference</camunda:string>", "<camunda:string>executeOther</camunda:string>", "xref-message-authorization"),
    (REQ, "StructureDefinition/task-execute-omi-inference|", "StructureDefinition/task-nowhere|", "xref-task-profile"),
    (AD, "<url value=\"http://medizininformatik-initiative.de/bpe/Process/omiInferenceRequest\" />",
     "<url value=\"http://medizininformatik-initiative.de/Process/omiInferenceRequest\" />", "dsf-activity-definition-url"),
    (AD, "<url value=\"http://medizininformatik-initiative.de/bpe/Process/omiInferenceRequest\" />",
     "<url value=\"http://medizininformatik-initiative.de/bpe/Process/somethingElse\" />", "dsf-activity-definition"),
    (AD, '<extension url="message-name">', '<extension url="message-nam">', "dsf-process-authorization"),
    (AD, "<kind value=\"Task\" />", "<kind value=\"ServiceRequest\" />", "dsf-activity-definition-kind"),
    (AD, '<version value="#{version}" />', '<version value="9.9" />', "dsf-version"),
    (Q, '<required value="true" />\n  </item>\n  <item>\n    <linkId value="patient-identifier" />',
     '\n  </item>\n  <item>\n    <linkId value="patient-identifier" />', "dsf-questionnaire-required"),
    (Q, '<linkId value="user-task-id" />', '<linkId value="user-task" />', "dsf-questionnaire-items"),
    (DRAFT, '<status value="draft" />', '<status value="requested" />', "dsf-draft-task-status"),
    (DRAFT, "</Task>", "<output><type><text value=\"x\" /></type><valueString value=\"y\" /></output></Task>", "dsf-draft-task-output"),
    (DRAFT, '<value value="#{organization}" />', '<value value="other.org" />', "dsf-draft-task-organization"),
    (DRAFT, "<value value=\"http://medizininformatik-initiative.de/bpe/Process/omiInferenceRequest/#{version}/",
     "<value value=\"http://elsewhere/", "dsf-draft-task-identifier"),
    (DRAFT, '<code value="message-name" />', '<code value="message-nom" />', "dsf-task-message-name"),
    (DRAFT, "<authoredOn value=\"#{date}\" />", "<authoredOn value=\"yesterday\" />", "fhir-structure"),
    (SD, "http://medizininformatik-initiative.de/fhir/ValueSet/omi|#{version}", "http://dsf.dev/fhir/ValueSet/bpmn-message|1.0.0", "dsf-binding-version"),
    (SD, "http://medizininformatik-initiative.de/fhir/ValueSet/omi|#{version}", "http://medizininformatik-initiative.de/fhir/ValueSet/gone|#{version}", "xref-value-set"),
]


@pytest.mark.parametrize("file, old, new, rule", MUTATIONS, ids=[m[3] for m in MUTATIONS])
def test_validator_catches_broken_variant(tree, file, old, new, rule):
    path = tree / file
    text = path.read_text()
    assert old in text, f"mutation does not apply to {file}"
    path.write_text(text.replace(old, new, 1))
    findings = validate_path(tree)
    assert rule in rules(findings), [f.render() for f in findings]
    hit = next(f for f in findings if f.rule == rule)
    assert hit.file and hit.message and "\n" not in hit.render()


def test_unsupported_resource_type_is_reported(tree):
    (tree / "fhir_profiles/Bundle").mkdir()
    (tree / "fhir_profiles/Bundle/b.xml").write_text('<Bundle xmlns="http://hl7.org/fhir"><type value="batch"/></Bundle>')
    assert "dsf-resource-type" in rules(validate_path(tree))


def test_entities_are_not_expanded(tree):
    secret = tree / "secret.txt"
    secret.write_text("TOPSECRET")
    (tree / "fhir_profiles/CodeSystem/evil.xml").write_text(
        f'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file://{secret}">]>'
        '<CodeSystem xmlns="http://hl7.org/fhir"><url value="http://x/&e;"/></CodeSystem>')
    findings = validate_path(tree)
    assert not any("TOPSECRET" in f.render() for f in findings)


def test_jar_without_plugin_definition(tmp_path, tree):
    jar = tmp_path / "plain.jar"
    with zipfile.ZipFile(jar, "w") as z:
        for p in tree.rglob("*"):
            if p.is_file():
                z.write(p, p.relative_to(tree).as_posix())
    assert "dsf-plugin-definition" in rules(validate_path(jar))


def test_not_a_plugin_at_all(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    assert rules(validate_path(f)) == {"source"}
    assert rules(validate_path(tmp_path / "missing")) == {"source"}


def test_validate_cli_exit_codes(tree):
    ok = run_cli("validate", str(tree))
    assert ok.returncode == 0, ok.stdout
    (tree / REQ).write_text((tree / REQ).read_text().replace('camunda:versionTag="#{version}"', ""))
    bad = run_cli("validate", str(tree))
    assert bad.returncode == 1
    assert "dsf-version-tag" in bad.stdout and REQ in bad.stdout


# -- the real Maven build --------------------------------------------------------------------


@pytest.mark.integration
def test_maven_build_produces_a_valid_plugin_jar():
    """Runs the whole build: Maven compiles the glue against dsf-bpe-process-api-v1 1.9.0 and runs
    the DSF's own validator (dsf-fhir-validation 1.9.0) over every resource and example Task."""
    proc = subprocess.run([sys.executable, "-m", "omi_dsf", "build"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = load_spec()
    jar = ROOT / "dist" / f"{spec.plugin.name}-{spec.plugin.version}.jar"
    assert jar.is_file()
    assert validate_path(jar) == []
    with zipfile.ZipFile(jar) as z:
        names = set(z.namelist())
        service = z.read("META-INF/services/dev.dsf.bpe.v1.ProcessPluginDefinition").decode().strip()
    assert service.replace(".", "/") + ".class" in names
    assert {"bpe/omi-inference-request.bpmn", "fhir/ActivityDefinition/omi-inference-execute.xml"} <= names
    assert not any(n.startswith("fhir/examples/") for n in names)
    report = next((ROOT / "plugin/target/surefire-reports").glob("*GeneratedResourcesValidTest.txt")).read_text()
    assert re.search(r"Tests run: 3, Failures: 0, Errors: 0, Skipped: 0", report), report
    assert check() == []
