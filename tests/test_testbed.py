"""The DSF test bed: unit tests for its generated parts, integration tests on running DSF servers.

The integration tests use the session's two-site test bed (fixture `dsf_testbed` in
tests/conftest.py): requester DIC and AI provider, each with a DSF FHIR and BPE server, once per
DSF version found (/opt/dsf-1.9.0, /opt/dsf-2.1.0, DSF_HOME). They skip when no DSF distribution
is found.
"""

from __future__ import annotations

import datetime as dt
import ssl
import time
import uuid
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from lxml import etree

from omi_dsf.errors import UserError
from omi_dsf.testbed import allowlist
from omi_dsf.dsf.workitem import WorkItem
from omi_dsf.testbed.bed import (
    REPO,
    State,
    TestBed,
    activity_definition_urls,
    client,
    plugin_problems,
    ssl_context,
)
from omi_dsf.testbed.distribution import Distribution
from omi_dsf.testbed.certs import TestCA, thumbprint

FHIR = "http://hl7.org/fhir"
NS = {"f": FHIR}
SID_ORG = "http://dsf.dev/sid/organization-identifier"
BPMN_MESSAGE = "http://dsf.dev/fhir/CodeSystem/bpmn-message"



# ------------------------------------------------------------------------------------------
# unit tests: no servers


def test_certificates_and_thumbprint(tmp_path):
    ca = TestCA(tmp_path)
    ca.ensure()
    server = ca.issue("srv", "localhost", server=True, client=False)
    cl = ca.issue("cl", "dic client", server=False, client=True)
    cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert len(thumbprint(cl.cert)) == 128  # SHA-512 hex, what DSF stores
    # the encrypted key loads with its password, and a TLS context accepts the pair
    ctx = ssl_context(str(ca.cert_path), str(cl.cert), str(cl.key), cl.password)
    assert isinstance(ctx, ssl.SSLContext)
    # issuing again reuses the files
    assert ca.issue("cl", "dic client", server=False, client=True).thumbprint == cl.thumbprint


def test_allow_list_bundle_structure():
    entries = [
        allowlist.AllowListEntry("dic.omi.test", "Test_DIC", "ab" * 64, "dic-fhir",
                                 "https://localhost:8201/fhir", ["DIC"]),
        allowlist.AllowListEntry("ai.omi.test", "Test_AI", "cd" * 64, "ai-fhir",
                                 "https://localhost:8221/fhir", ["DMS"]),
    ]
    root = etree.fromstring(allowlist.build_bundle(entries, "medizininformatik-initiative.de"))
    assert root.find("f:type", NS).get("value") == "transaction"
    orgs = root.findall(".//f:Organization", NS)
    assert len(orgs) == 3
    thumbs = [e.get("value") for e in root.findall(
        ".//f:Organization/f:extension[@url='%s']/f:valueString" % allowlist.EXT_THUMBPRINT, NS)]
    assert thumbs == ["ab" * 64, "cd" * 64]
    affs = root.findall(".//f:OrganizationAffiliation", NS)
    assert [a.find("f:code/f:coding/f:code", NS).get("value") for a in affs] == ["DIC", "DMS"]
    addresses = [e.get("value") for e in root.findall(".//f:Endpoint/f:address", NS)]
    assert addresses == ["https://localhost:8201/fhir", "https://localhost:8221/fhir"]


def test_missing_distribution_is_a_clear_error(tmp_path):
    with pytest.raises(UserError) as exc:
        Distribution.find(tmp_path / "nowhere")
    msg = str(exc.value)
    assert "fhir/dsf_fhir.jar" in msg and "does not serve the DSF" in msg and "\n" not in msg


def _fake_distribution(root: Path, version: str, class_major: int) -> Path:
    """A folder with a distribution's layout whose server jar holds one class of the given version."""
    import zipfile

    for kind in ("fhir", "bpe"):
        (root / kind / "lib").mkdir(parents=True)
        (root / kind / f"dsf_{kind}.jar").write_bytes(b"")
        with zipfile.ZipFile(root / kind / "lib" / f"dsf-{kind}-server-{version}.jar", "w") as zf:
            zf.writestr("dev/dsf/X.class", b"\xca\xfe\xba\xbe\x00\x00" + class_major.to_bytes(2, "big"))
    return root


def test_distribution_version_java_and_settings(tmp_path):
    old = Distribution.find(_fake_distribution(tmp_path / "a", "1.9.0", 61))
    assert (old.version, old.major, old.label, old.java_release) == ("1.9.0", 1, "1.9", 17)
    assert old.unlisted_client_status == 401 and old.bpe_engine_user_key().endswith(".camunda")
    new_home = _fake_distribution(tmp_path / "b", "2.1.0", 69)
    with pytest.raises(UserError, match="bpe/api/v1, bpe/api/v2"):
        Distribution.find(new_home)
    for v in ("v1", "v2"):
        (new_home / "bpe" / "api" / v).mkdir(parents=True)
    new = Distribution.find(new_home)
    assert (new.version, new.major, new.java_release) == ("2.1.0", 2, 25)
    assert new.unlisted_client_status == 403 and new.bpe_engine_user_key().endswith(".engine")
    assert old.log_config("fhir") == old.home / "fhir" / "conf" / "log4j2.xml" and new.log_config("fhir") is None
    bpe = new.settings("bpe", "/ca.pem")
    assert bpe["dev.dsf.server.certificate.chain"] == "/ca.pem"
    assert bpe["dev.dsf.bpe.process.api.directory"] == str(new.home / "bpe" / "api")
    assert bpe["dev.dsf.bpe.fhir.client.connections.config.default.trust.server.certificate.cas"] == "/ca.pem"
    assert "dev.dsf.bpe.process.api.directory" not in new.settings("fhir", "/ca.pem")


def test_site_dsf_home_must_name_a_site(tmp_path):
    home = _fake_distribution(tmp_path / "a", "1.9.0", 61)
    bed = TestBed(tmp_path / "tb", dsf_home=str(home), site_dsf_homes={"lab": str(home)}, out=lambda *_: None)
    with pytest.raises(UserError, match="names no site of this test bed: lab"):
        bed.distributions()
    bed = TestBed(tmp_path / "tb", dsf_home=str(home), site_dsf_homes={"ai": str(tmp_path / "none")},
                  out=lambda *_: None)
    with pytest.raises(UserError, match="no DSF distribution at"):
        bed.distributions()


def test_plugin_problems_include_jar_level_and_run_time_lines(tmp_path):
    log = tmp_path / "bpe.log"
    log.write_text("\n".join([
        "INFO  ProcessPluginLoaderImpl - Loaded plugin omi-0.1.0.jar",
        "WARN  ProcessPluginLoaderImpl - Ignoring /bpe/process/omi-0.1.0.jar: Unable to load process plugin: "
        "java.lang.NoSuchMethodError - x",
        "WARN  AbstractProcessPlugin - Ignoring process plugin omi-0.1 from x.jar: No valid processes",
        "WARN  ProcessPluginImpl - Unable to create org.operaton.bpm.engine.delegate.ExecutionListener for "
        "de.medizininformatik_initiative.omi.dsf.WorkItemAnswers: java.lang.NoClassDefFoundError - y",
        "WARN  QuestionnaireResponseHandler - Unable to complete UserTask: java.lang.NoClassDefFoundError - "
        "org/operaton/bpm/model/xml/instance/ModelElementInstance",
        "WARN  QuestionnaireResponseHandler - Unable to complete UserTask: org.camunda.bpm.engine.exception."
        "NullValueException - Cannot find task with id 6e387dae: task is null",   # its instance is gone
        # DSF 1.9 at DEBUG: a bare line, the stack trace after it, then the WARN line above (restarted BPE)
        "DEBUG dev.dsf.bpe.subscription.QuestionnaireResponseHandler - Unable to complete UserTask",
        "org.camunda.bpm.engine.exception.NullValueException: Cannot find task with id 4e966594: task is null",
        "DEBUG Something - fine",
    ]))
    assert len(plugin_problems(log)) == 4
    assert plugin_problems(log, since=log.stat().st_size) == []   # only what came after the offset


def test_port_in_use_is_a_clear_error(tmp_path):
    import socket

    try:
        home = Distribution.find().home
    except UserError as exc:
        pytest.skip(str(exc))
    with socket.socket() as s:
        for port in range(9150, 9700, 7):  # 4-digit ports: DSF 1.9 Endpoint addresses need them
            try:
                s.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        s.listen()
        base = port - 99  # PostgreSQL sits on base+99
        bed = TestBed(tmp_path / "tb", base_port=base, dsf_home=str(home), plugins=[],
                      out=lambda *_: None)
        with pytest.raises(UserError, match=f"port {port} .* in use"):
            bed.up(timeout=30)


# ------------------------------------------------------------------------------------------
# integration: a running test bed


@pytest.fixture(scope="module")
def bed(dsf_testbed) -> State:
    """The session's test bed (tests/conftest.py): one DSF test bed for every module that needs it."""
    return dsf_testbed


def _plugin_deployed(state: State) -> None:
    if not state.plugins:
        pytest.skip("no OMI plugin jar in dist/ (python -m omi_dsf build); BPEs run without it")
    if not activity_definition_urls():
        pytest.skip("no fhir_profiles/ActivityDefinition/*.xml in the repository")


@pytest.mark.integration
def test_fhir_servers_answer_over_mtls(bed):
    for site in bed.sites:
        with client(bed, site) as c:
            r = c.get("/metadata")
        assert r.status_code == 200, r.text
        assert r.json()["resourceType"] == "CapabilityStatement"
    # without any client certificate the TLS handshake itself fails (Jetty needs client auth)
    with pytest.raises((httpx.ConnectError, httpx.ReadError, ssl.SSLError)):
        httpx.get(bed.sites[0].fhir_url + "/metadata", verify=ssl_context(bed.ca_cert))


@pytest.mark.integration
def test_each_dic_has_a_fhir_store_of_its_own(bed, capsys):
    """`up` starts a HAPI FHIR server per requester site (not for the provider); `status` and
    `logs` know it; it validates what it is sent."""
    dic, ai = bed.site("dic"), bed.site("ai")
    assert dic.fhir_store_url and not ai.fhir_store_url
    r = httpx.get(dic.fhir_store_url + "/metadata", timeout=30)
    assert r.status_code == 200 and r.json()["fhirVersion"].startswith("4.0")
    bad = httpx.post(dic.fhir_store_url + "/Observation", json={"resourceType": "Observation", "status": "nope"},
                     headers={"Content-Type": "application/fhir+json"}, timeout=30)
    assert bad.status_code == 422
    assert bed.bed.status() == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "dic-store" in x]
    assert " running " in line and dic.fhir_store_url in line
    assert bed.bed.log_path("dic-store") == [Path(dic.fhir_store_dir) / "fhir-store.log"]


@pytest.mark.integration
def test_allow_list_is_loaded(bed):
    with client(bed, bed.sites[0]) as c:
        orgs = c.get("/Organization", params={"_count": 50}).json()
        affs = c.get("/OrganizationAffiliation", params={"_count": 50}).json()
    by_id = {e["resource"]["identifier"][0]["value"]: e["resource"]
             for e in orgs.get("entry", [])}
    assert bed.parent_organization in by_id
    for site in bed.sites:
        ext = by_id[site.identifier]["extension"][0]
        assert ext["valueString"] == thumbprint(Path(site.client_cert))
    roles = sorted(cc["coding"][0]["code"] for e in affs["entry"] for cc in e["resource"]["code"])
    assert roles == sorted(s.role_code for s in bed.sites)


@pytest.mark.integration
def test_unlisted_client_certificate_is_refused(bed):
    # signed by the trusted test CA, so TLS succeeds, but the thumbprint is neither a known
    # organization nor a configured local user: DSF 1.9 answers 401, DSF 2.x 403
    for site in bed.sites:
        want = _dist(bed, site).unlisted_client_status
        with client(bed, site, unlisted=True) as c:
            assert c.get("/metadata").status_code == want, site.dsf_version
            assert c.get("/Organization").status_code == want
            r = c.post("/Task", json={"resourceType": "Task", "status": "requested"},
                       headers={"Content-Type": "application/fhir+json"})
            assert r.status_code == want


@pytest.mark.integration
def test_omi_activity_definitions_are_active_everywhere(bed):
    _plugin_deployed(bed)
    urls = activity_definition_urls()
    for site in bed.sites:
        with client(bed, site) as c:
            for url in urls:
                b = c.get("/ActivityDefinition", params={"url": url, "status": "active"}).json()
                assert b.get("total", 0) >= 1, f"{url} not active on {site.key}"


# --- Task based tests: the start Task is built from the generated draft Task ---------------


def _start_draft() -> tuple[Path, etree._Element]:
    """The draft start Task of the requester process (fhir_profiles/Task/*.xml)."""
    folder = REPO / "fhir_profiles" / "Task"
    candidates = []
    for f in sorted(folder.glob("*.xml")):
        root = etree.parse(str(f)).getroot()
        canon = root.find("f:instantiatesCanonical", NS)
        msg = [i for i in root.findall("f:input", NS)
               if i.find("f:type/f:coding/f:code", NS).get("value") == "message-name"]
        if canon is not None and msg:
            candidates.append((f, root, msg[0].find("f:valueString", NS).get("value")))
    if not candidates:
        pytest.skip(f"no draft Task in {folder}")
    # the requester's start message: a draft whose process is not started by a remote role
    for f, root, message in candidates:
        if message.startswith("start"):
            return f, root
    return candidates[0][0], candidates[0][1]


def _resource_version(state: State, site, process_url: str) -> str:
    with client(state, site) as c:
        b = c.get("/ActivityDefinition", params={"url": process_url, "status": "active"}).json()
    return b["entry"][0]["resource"]["version"]


def _start_task(state: State, requester, recipient, *, drop_input: str | None = None) -> bytes:
    """A requested start Task (XML) from the draft: placeholders resolved, inputs filled."""
    _, draft = _start_draft()
    text = etree.tostring(draft).decode()
    canon = draft.find("f:instantiatesCanonical", NS).get("value")
    process_url = canon.split("|")[0]
    version = _resource_version(state, recipient, process_url)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    text = (text.replace("#{version}", version).replace("#{date}", now[:10])
            .replace("#{organization}", recipient.identifier))
    task = etree.fromstring(text.encode())
    for e in task.findall("f:identifier", NS) + task.findall("f:id", NS):
        task.remove(e)  # draft-only identifier; a requested Task must not carry it
    task.find("f:status", NS).set("value", "requested")
    task.find("f:authoredOn", NS).set("value", now)
    task.find("f:requester/f:identifier/f:value", NS).set("value", requester.identifier)
    # fill the non-message inputs; provider-organization names the provider site
    provider = next((s for s in state.sites if s.role == "provider"), state.sites[-1])
    for inp in task.findall("f:input", NS):
        code = inp.find("f:type/f:coding/f:code", NS).get("value")
        if code == "message-name":
            continue
        if code == drop_input:
            task.remove(inp)
            continue
        value = {"provider-organization": provider.identifier,
                 "study-instance-uid": "1.2.826.0.1.3680043.8.498." + str(uuid.uuid4().int)[:20],
                 "patient-identifier": "PAT-TESTBED-1",
                 "ai-service-identifier": "omi-reference-lung-seg"}.get(code, f"test-{code}")
        vs = inp.find("f:valueString", NS)
        if vs is None:
            vs = etree.SubElement(inp, f"{{{FHIR}}}valueString")
        if code in ("provider-organization", "study-instance-uid") or not vs.get("value") \
                or "#{" in vs.get("value", ""):
            vs.set("value", value)
    return etree.tostring(task)


def _post_task(state: State, as_site, to_site, body: bytes) -> httpx.Response:
    ctx = ssl_context(state.ca_cert, as_site.client_cert, as_site.client_key, as_site.key_password)
    with httpx.Client(base_url=to_site.fhir_url, verify=ctx, timeout=60) as c:
        return c.post("/Task", content=body, headers={"Content-Type": "application/fhir+xml",
                                                      "Accept": "application/fhir+json"})


def _requester(state: State):
    return next(s for s in state.sites if s.role == "requester")


def _provider(state: State):
    return next(s for s in state.sites if s.role == "provider")


@pytest.mark.integration
def test_start_task_reaches_first_work_item_and_its_answer_the_next(bed):
    """The first work item appears, and answering it moves the process on to the next one: on DSF
    2.x the answer goes through the plugin's listener classes as its class loader rewrote them."""
    _plugin_deployed(bed)
    dic = _requester(bed)
    r = _post_task(bed, dic, dic, _start_task(bed, dic, dic))
    assert r.status_code == 201, r.text
    task_id = r.json()["id"]
    bpe = next(s for s in bed.servers if s.site == dic.key and s.kind == "bpe")
    log_size = bpe.log_file.stat().st_size
    first = WorkItem(_wait_for_work_item(bed, dic, task_id))
    outputs = {i: f"test-{i}" for i in first.item_ids if i != "error" and i not in first.inputs}
    time.sleep(1)   # as a worker settles: the BPE may show the item before its user task is committed
    with client(bed, dic) as c:
        put = c.put(f"/QuestionnaireResponse/{first.id}", json=first.completed(outputs),
                    headers={"Content-Type": "application/fhir+json"})
        assert put.status_code == 200, put.text
    second = WorkItem(_wait_for_work_item(bed, dic, task_id, not_questionnaire=first.questionnaire))
    assert second.business_key == first.business_key and second.id != first.id
    assert plugin_problems(bpe.log_file, since=log_size) == []
    with client(bed, dic) as c:   # the first answer stays answered (DSF 2.x: amended)
        assert WorkItem(c.get(f"/QuestionnaireResponse/{first.id}").json()).answered


def _dist(state: State, site) -> Distribution:
    server = next(s for s in state.servers if s.site == site.key)
    return server.distribution


def _wait_for_work_item(state: State, site, task_id: str, timeout: float = 120,
                        not_questionnaire: str | None = None) -> dict:
    """Wait until the process instance started by Task/<task_id> on `site` waits at a work item
    (an in-progress QuestionnaireResponse carrying the Task's business key, for another
    Questionnaire than `not_questionnaire`); return that QR."""
    deadline = time.monotonic() + timeout
    business_key = None
    with client(state, site) as c:
        while time.monotonic() < deadline:
            task = c.get(f"/Task/{task_id}").json()
            if task["status"] == "failed":
                errors = [o.get("valueString") for o in task.get("output", [])]
                bpe = next(s for s in state.servers if s.site == site.key and s.kind == "bpe")
                log_lines = [ln for ln in Path(bpe.log_file).read_text().splitlines()
                             if " ERROR " in ln or "Exception" in ln][:6]
                pytest.fail(f"Task/{task_id} failed: outputs {errors}; {bpe.name} log "
                            f"{bpe.log_file}: " + " | ".join(log_lines))
            for inp in task.get("input", []):
                if inp["type"]["coding"][0]["code"] == "business-key":
                    business_key = inp["valueString"]
            if business_key:
                qrs = c.get("/QuestionnaireResponse",
                            params={"status": "in-progress", "_count": 100}).json()
                for e in qrs.get("entry", []):
                    items = {i["linkId"]: i for i in e["resource"].get("item", [])}
                    bk = items.get("business-key", {}).get("answer", [{}])[0].get("valueString")
                    if bk == business_key and e["resource"].get("questionnaire") != not_questionnaire:
                        return e["resource"]  # the work item is waiting for a worker
            time.sleep(1)
    pytest.fail(f"no in-progress QuestionnaireResponse for Task/{task_id} on {site.key} "
                f"(business key {business_key}) within {timeout:.0f} s")


@pytest.mark.integration
def test_task_breaking_the_profile_is_rejected(bed):
    _plugin_deployed(bed)
    dic = _requester(bed)
    _, draft = _start_draft()
    inputs = [i.find("f:type/f:coding/f:code", NS).get("value")
              for i in draft.findall("f:input", NS)]
    required = next(c for c in inputs if c != "message-name")
    r = _post_task(bed, dic, dic, _start_task(bed, dic, dic, drop_input=required))
    # DSF answers a profile violation with 403 and the validator's OperationOutcome, issue code
    # "processing": 1.9 "Profile …, Element 'Task.input:x': minimum required = 1", 2.x
    # "Task.input: minimum required = 5, but only found 4 (from …|0.1)"
    assert r.status_code == 403, r.text
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome"
    errors = [i for i in oo["issue"] if i.get("severity") in ("error", "fatal")]
    assert errors and all(i.get("code") == "processing" for i in errors), oo
    assert any("minimum required" in i.get("diagnostics", "") for i in errors), oo


@pytest.mark.integration
def test_task_from_unauthorised_provider_is_refused(bed):
    _plugin_deployed(bed)
    dic, ai = _requester(bed), _provider(bed)
    # the provider asks the DIC to start the requester process: the ActivityDefinition allows
    # only local requesters for the start message
    body = _start_task(bed, ai, dic)
    r = _post_task(bed, ai, dic, body)
    # DSF 1.9: 403 with issue code "forbidden" ("Operation create forbidden"); the FHIR server
    # logs which authorization rule refused it
    assert r.status_code == 403, r.text
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome"
    assert [i.get("code") for i in oo["issue"]] == ["forbidden"], oo


# --- role-based authorization between the sites (REMOTE_ROLE / LOCAL_ROLE on the allow list) --


def _message_task(state: State, process_file: str, requester, recipient) -> dict:
    """A Task (JSON) for the first message an ActivityDefinition authorises, with the inputs
    its Task profile requires (read from fhir_profiles, not hard-coded)."""
    ad = etree.parse(str(REPO / "fhir_profiles" / "ActivityDefinition" / process_file)).getroot()
    auth = ad.find("f:extension[@url='http://dsf.dev/fhir/StructureDefinition/"
                   "extension-process-authorization']", NS)
    message = auth.find("f:extension[@url='message-name']/f:valueString", NS).get("value")
    profile = auth.find("f:extension[@url='task-profile']/f:valueCanonical", NS).get("value")
    process_url = ad.find("f:url", NS).get("value")
    version = _resource_version(state, recipient, process_url)
    profile = profile.replace("#{version}", version)
    sd_name = profile.split("|")[0].rsplit("/", 1)[1]
    sd = etree.parse(str(REPO / "fhir_profiles" / "StructureDefinition" / f"{sd_name}.xml"))
    inputs = [{"type": {"coding": [{"system": BPMN_MESSAGE, "code": "message-name"}]},
               "valueString": message}]
    for el in sd.getroot().iter(f"{{{FHIR}}}element"):
        eid = el.get("id", "")
        if not eid.startswith("Task.input:") or "." in eid[len("Task.input:"):]:
            continue
        code = eid[len("Task.input:"):]
        mn = el.find("f:min", NS)
        if code in ("message-name", "business-key", "correlation-key") or mn is None \
                or int(mn.get("value")) < 1:
            continue
        system = sd.getroot().find(
            f".//f:element[@id='Task.input:{code}.type.coding.system']/f:fixedUri", NS).get("value")
        inputs.append({"type": {"coding": [{"system": system, "code": code}]},
                       "valueString": f"test-{code}"})
    org = {"system": SID_ORG}
    return {
        "resourceType": "Task", "meta": {"profile": [profile]},
        "instantiatesCanonical": f"{process_url}|{version}", "status": "requested",
        "intent": "order",
        "authoredOn": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "requester": {"type": "Organization", "identifier": {**org, "value": requester.identifier}},
        "restriction": {"recipient": [{"type": "Organization",
                                       "identifier": {**org, "value": recipient.identifier}}]},
        "input": inputs,
    }


def _post_json(state: State, as_site, to_site, task: dict) -> httpx.Response:
    ctx = ssl_context(state.ca_cert, as_site.client_cert, as_site.client_key, as_site.key_password)
    with httpx.Client(base_url=to_site.fhir_url, verify=ctx, timeout=60) as c:
        return c.post("/Task", json=task, headers={"Content-Type": "application/fhir+json",
                                                   "Accept": "application/fhir+json"})


@pytest.mark.integration
def test_role_based_message_between_sites(bed):
    _plugin_deployed(bed)
    if not (REPO / "fhir_profiles" / "ActivityDefinition" / "omi-inference-execute.xml").exists():
        pytest.skip("no omi-inference-execute ActivityDefinition")
    dic, ai = _requester(bed), _provider(bed)
    # a DIC (role DIC in the parent organization) may ask the provider (role DMS) to execute
    r = _post_json(bed, dic, ai, _message_task(bed, "omi-inference-execute.xml", dic, ai))
    assert r.status_code == 201, r.text
    # ... and the provider's BPE starts its process, which waits at its first work item
    _wait_for_work_item(bed, ai, r.json()["id"])
    # the provider itself is not a remote DIC: the same message from it is refused
    r = _post_json(bed, ai, ai, _message_task(bed, "omi-inference-execute.xml", ai, ai))
    assert r.status_code == 403, r.text
    assert [i.get("code") for i in r.json()["issue"]] == ["forbidden"]


def test_a_plugin_jar_of_another_version_than_the_spec_is_refused(tmp_path, monkeypatch):
    """A jar built before the spec changed would be deployed and answer every Task 403: the test
    bed (and so the demo and the e2e bench) refuses it and says how to build the right one."""
    from omi_dsf.spec.model import load_spec
    from omi_dsf.testbed import bed as bed_module
    spec = load_spec().plugin
    (tmp_path / "dist").mkdir()
    monkeypatch.setattr(bed_module, "REPO", tmp_path)
    assert bed_module.default_plugins() == []                      # none built: nothing to deploy
    (tmp_path / "dist" / f"{spec.name}-0.0.1.0.jar").write_bytes(b"PK")
    with pytest.raises(UserError, match=rf"{spec.name}-0\.0\.1\.0\.jar, not {spec.name}-{spec.version}\.jar.*"
                                        r"python -m omi_dsf build"):
        bed_module.default_plugins()
    current = tmp_path / "dist" / f"{spec.name}-{spec.version}.jar"
    current.write_bytes(b"PK")
    assert current in bed_module.default_plugins()
