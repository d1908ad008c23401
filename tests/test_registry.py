"""The service registry in process, its entries in the session's FHIR store (HAPI, `fhir_store`):
registration, validation, duplicates, ownership, search parameters, transactions, health states, the
ImagingStudy link. Authentication is by real bearer JWTs (pyjwt, RSA keys made here); mutual TLS is in
test_registry_integration.py. Each test starts with no registry entries in the store."""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.testclient import TestClient

from omi_dsf.errors import UserError
from omi_dsf.registry import definitions as d
from omi_dsf.registry.app import create_app
from omi_dsf.registry.config import load_config, parse_config
from omi_dsf.registry.entries import service_bundle
from omi_dsf.registry.health import HealthSettings, assess, effective
from omi_dsf.registry.store import ServiceState, Store

ISSUER = "https://idp.omi.test"
AI = "ai.omi.test"
LUNG = ("http://snomed.info/sct", "39607008")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (folder / "idp.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return folder, key, other


def token(key, org: str | None = AI, exp: int = 300, iss: str = ISSUER) -> str:
    claims = {"iss": iss, "exp": int(time.time()) + exp, "sub": "svc", "aud": "omi-registry"}
    if org:
        claims["organization"] = org
    return jwt.encode(claims, key, algorithm="RS256")


def hdr(key, org=AI, **kw) -> dict:
    return {"Authorization": f"Bearer {token(key, org, **kw)}", "Content-Type": "application/fhir+json"}


@pytest.fixture
def reg(tmp_path, keys, fhir_store):
    folder, key, _ = keys
    cfg = parse_config({"fhir_store": {"url": fhir_store.state().base_url}, "health": {"interval": 0},
                        "auth": {"jwt": [{"issuer": ISSUER, "key_file": str(folder / "idp.pem"),
                                          "audience": "omi-registry"}]}}, tmp_path)
    app = create_app(cfg, run_checks=False)
    with TestClient(app, base_url="http://registry.test") as c:
        app.state.store.clear()
        c.app_state = app.state
        yield c


def bundle(service_id="lung-seg", org=AI, modality=("CT",), oip="http://127.0.0.1:9/", **kw) -> dict:
    return service_bundle(org, service_id, name=f"Service {service_id}", model="lung-seg", model_version="0.1.0",
                          oip_url=oip, modality=list(modality), body_site=[LUNG], **kw)


def register(c, key, b=None, org=AI):
    r = c.post("/fhir", content=json.dumps(b or bundle()), headers=hdr(key, org))
    assert r.status_code == 200, r.text
    return r.json()


def diagnostics(r) -> str:
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"][0]["diagnostics"]


def ids(r) -> list[str]:
    return sorted(e["resource"]["id"] for e in r.json().get("entry", []) if e["search"]["mode"] == "match")


def count_all(c) -> int:
    return sum(c.get(f"/fhir/{t}").json()["total"] for t in d.RESOURCE_TYPES)


# -- registration ------------------------------------------------------------------------------


@pytest.mark.integration   # the session's FHIR store
def test_register_service_then_read_and_search(reg, keys):
    out = register(reg, keys[1])
    assert [e["response"]["status"] for e in out["entry"]] == ["201 Created"] * 3
    # the session's FHIR store keeps counting versions of an id whose resource an earlier test deleted
    version = int(out["entry"][0]["resource"]["meta"]["versionId"])
    hs = reg.get("/fhir/HealthcareService/lung-seg").json()
    health = next(e for e in hs["extension"] if e["url"] == d.EXT_HEALTH)
    assert {"url": "status", "valueCode": "unknown"} in health["extension"]
    r = reg.get("/fhir/HealthcareService", params=[("modality", "CT"), ("_include", "HealthcareService:endpoint"),
                                                  ("_include", "HealthcareService:algorithm")])
    assert r.status_code == 200
    kinds = sorted((e["search"]["mode"], e["resource"]["resourceType"]) for e in r.json()["entry"])
    assert kinds == [("include", "Device"), ("include", "Endpoint"), ("match", "HealthcareService")]
    # registering again updates (PUT), nothing is duplicated; an unchanged resource keeps its
    # version (the FHIR store makes no new version of what did not change), a changed one goes up
    again = register(reg, keys[1])
    assert [e["response"]["status"] for e in again["entry"]] == ["200 OK"] * 3
    assert again["entry"][0]["resource"]["meta"]["versionId"] == str(version)
    again = register(reg, keys[1], bundle(min_slices=3))
    assert again["entry"][0]["resource"]["meta"]["versionId"] == str(version + 1)
    assert count_all(reg) == 3


@pytest.mark.integration   # the session's FHIR store
def test_search_parameters(reg, keys):
    register(reg, keys[1])
    register(reg, keys[1], bundle("brain-mr", modality=("MR",)), AI)
    other = bundle("chest-xr", org="ai2.omi.test", modality=("DX", "CR"), service_type="diagnostics")
    register(reg, keys[1], other, "ai2.omi.test")
    q = lambda **p: ids(reg.get("/fhir/HealthcareService", params={k.replace("_", "-"): v for k, v in p.items()}))
    assert q(modality="CT") == ["lung-seg"]
    assert q(modality="MR,CR") == ["brain-mr", "chest-xr"]
    assert q(modality="http://dicom.nema.org/resources/ontology/DCM|DX") == ["chest-xr"]
    assert q(modality="http://wrong.system|DX") == []
    assert q(body_site="39607008") == ["brain-mr", "chest-xr", "lung-seg"]
    assert q(service_type="diagnostics") == ["chest-xr"]
    assert q(service_type=f"{d.CS_OMI_SERVICE_TYPE}|segmentation") == ["brain-mr", "lung-seg"]
    assert q(organization="ai2.omi.test") == ["chest-xr"]
    assert q(organization=f"{d.ORG_SID}|{AI}") == ["brain-mr", "lung-seg"]
    assert q(health="unknown") == ["brain-mr", "chest-xr", "lung-seg"] and q(health="up") == []
    assert ids(reg.get("/fhir/HealthcareService?name:contains=BRAIN")) == ["brain-mr"]
    # repeated parameter = AND
    assert ids(reg.get("/fhir/HealthcareService?modality=CT,MR&organization=ai.omi.test&modality=MR")) == ["brain-mr"]
    assert ids(reg.get("/fhir/Device?modality=MR")) == ["brain-mr-algorithm"]
    assert ids(reg.get(f"/fhir/Endpoint?connection-type={d.OIP_V2}")) == ["brain-mr-oip", "chest-xr-oip", "lung-seg-oip"]
    page = reg.get("/fhir/HealthcareService?_count=2&organization=ai.omi.test,ai2.omi.test").json()
    assert page["total"] == 3 and len(page["entry"]) == 2
    nxt = next(l["url"] for l in page["link"] if l["relation"] == "next")
    assert "organization=" in nxt and "_offset=2" in nxt
    rest = reg.get(nxt.replace("http://registry.test", "")).json()
    assert len(rest["entry"]) == 1


@pytest.mark.integration   # the session's FHIR store
@pytest.mark.parametrize("query, named", [
    ("colour=red", "'colour'"),
    ("modality:exact=CT", "':exact'"),
    ("_include=Device:owner", "_include"),
    ("_count=0", "_count"),
    ("modality=", "empty value"),
    ("_format=xml", "_format"),
])
def test_bad_search_is_400_naming_the_parameter(reg, query, named):
    r = reg.get(f"/fhir/HealthcareService?{query}")
    assert r.status_code == 400
    assert named in diagnostics(r)


@pytest.mark.integration   # the session's FHIR store
def test_unsupported_interactions_answer_with_operation_outcome(reg, keys):
    register(reg, keys[1])
    r = reg.delete("/fhir/HealthcareService/lung-seg", headers=hdr(keys[1]))
    assert r.status_code == 405 and "DELETE /fhir/HealthcareService/lung-seg" in diagnostics(r)
    r = reg.get("/fhir/HealthcareService/lung-seg/_history")
    assert r.status_code == 404 and "_history" in diagnostics(r)
    # a client cannot store a health status of its own
    b = bundle()
    b["entry"][2]["resource"]["extension"].append(
        {"url": d.EXT_HEALTH, "extension": [{"url": "status", "valueCode": "up"}]})
    stored = register(reg, keys[1], b)["entry"][2]["resource"]
    assert [e["url"] for e in stored["extension"]] == [d.EXT_ALGORITHM]
    assert ids(reg.get("/fhir/HealthcareService?health=up")) == []


@pytest.mark.integration   # the session's FHIR store
def test_capability_statement_declares_the_search_parameters(reg):
    cs = reg.get("/fhir/metadata").json()
    hs = next(r for r in cs["rest"][0]["resource"] if r["type"] == "HealthcareService")
    names = {p["name"] for p in hs["searchParam"]}
    assert {"modality", "body-site", "service-type", "organization", "health"} <= names


@pytest.mark.integration   # the session's FHIR store
def test_invalid_fhir_is_refused_and_nothing_is_stored(reg, keys):
    b = bundle()
    b["entry"][2]["resource"]["active"] = "maybe"      # HealthcareService.active is a boolean
    r = reg.post("/fhir", content=json.dumps(b), headers=hdr(keys[1]))
    assert r.status_code == 400
    msg = diagnostics(r)
    assert "Bundle.entry[2]" in msg and "HealthcareService.active" in msg
    b = bundle()
    b["entry"][1]["resource"].pop("connectionType")    # Endpoint.connectionType is 1..1
    r = reg.post("/fhir", content=json.dumps(b), headers=hdr(keys[1]))
    assert r.status_code == 400 and "Endpoint.connectionType" in diagnostics(r)
    b = bundle()
    b["entry"][1]["resource"]["address"] = False       # fhir.resources raises AttributeError on it (was a 500)
    r = reg.post("/fhir", content=json.dumps(b), headers=hdr(keys[1]))
    assert r.status_code == 400 and "not valid FHIR R4 Endpoint" in diagnostics(r)
    r = reg.post("/fhir", content=b"{not json", headers=hdr(keys[1]))
    assert r.status_code == 400 and "not JSON" in diagnostics(r)
    r = reg.post("/fhir/Patient", content=json.dumps({"resourceType": "Patient"}), headers=hdr(keys[1]))
    assert r.status_code == 404
    device = bundle()["entry"][0]["resource"]
    r = reg.put("/fhir/Device/other-id", content=json.dumps(device), headers=hdr(keys[1]))
    assert r.status_code == 400 and "differs from request.url 'Device/other-id'" in diagnostics(r)
    r = reg.post("/fhir/Device", content=json.dumps(bundle()["entry"][1]["resource"]), headers=hdr(keys[1]))
    assert r.status_code == 400 and "expected a Device resource, got 'Endpoint'" in diagnostics(r)
    r = reg.post("/fhir", content=json.dumps([device]), headers=hdr(keys[1]))
    assert r.status_code == 400 and "expected a Bundle" in diagnostics(r)
    r = reg.post("/fhir", content=json.dumps(bundle()), headers={**hdr(keys[1]), "Content-Type": "text/plain"})
    assert r.status_code == 415
    assert count_all(reg) == 0


@pytest.mark.integration   # the session's FHIR store
def test_broken_link_rolls_back_the_whole_bundle(reg, keys):
    b = bundle()
    b["entry"][2]["resource"]["endpoint"].append({"reference": "Endpoint/nowhere"})
    r = reg.post("/fhir", content=json.dumps(b), headers=hdr(keys[1]))
    assert r.status_code == 422 and "HealthcareService.endpoint[1]" in diagnostics(r)
    b = bundle()
    b["entry"][2]["resource"]["extension"] = []
    r = reg.post("/fhir", content=json.dumps(b), headers=hdr(keys[1]))
    assert r.status_code == 422 and d.EXT_ALGORITHM in diagnostics(r)
    # the Device and Endpoint before the bad HealthcareService were not kept
    assert count_all(reg) == 0


@pytest.mark.integration   # the session's FHIR store
def test_duplicate_registration_is_409_and_stores_nothing(reg, keys):
    register(reg, keys[1])
    dup = copy.deepcopy(bundle())
    for e in dup["entry"]:   # same identifiers, new ids
        e["resource"]["id"] = "x" + e["resource"]["id"]
        e["request"]["url"] = f"{e['resource']['resourceType']}/{e['resource']['id']}"
    dup["entry"][2]["resource"]["extension"][0]["valueReference"]["reference"] = "Device/xlung-seg-algorithm"
    dup["entry"][2]["resource"]["endpoint"] = [{"reference": "Endpoint/xlung-seg-oip"}]
    r = reg.post("/fhir", content=json.dumps(dup), headers=hdr(keys[1]))
    assert r.status_code == 409
    assert "duplicate" in diagnostics(r) and "already registered as Device/lung-seg-algorithm" in diagnostics(r)
    assert count_all(reg) == 3


@pytest.mark.integration   # the session's FHIR store
def test_post_with_urn_uuid_references(reg, keys):
    import uuid

    b = bundle()
    # urn:uuid: with a UUID (RFC 4122, lowercase): a FHIR server refuses 'urn:uuid:lung-seg-algorithm'
    urn = {e["resource"]["id"]: f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, e['resource']['id'])}" for e in b["entry"]}
    for e in b["entry"]:
        e["fullUrl"] = urn[e["resource"]["id"]]
        e["request"] = {"method": "POST", "url": e["resource"]["resourceType"]}
    hs = b["entry"][2]["resource"]
    hs["extension"][0]["valueReference"]["reference"] = urn["lung-seg-algorithm"]
    hs["endpoint"] = [{"reference": urn["lung-seg-oip"]}]
    out = register(reg, keys[1], b)
    # a urn:uuid that is no UUID: the FHIR server's 4xx, with its words
    bad = bundle("other")
    bad["entry"][0]["fullUrl"] = "urn:uuid:other-algorithm"
    bad["entry"][0]["request"] = {"method": "POST", "url": "Device"}
    bad["entry"][2]["resource"]["extension"][0]["valueReference"]["reference"] = "urn:uuid:other-algorithm"
    r = reg.post("/fhir", content=json.dumps(bad), headers=hdr(keys[1]))
    assert 400 <= r.status_code < 500 and "UUID" in diagnostics(r), r.text
    stored = out["entry"][2]["resource"]
    device_id = out["entry"][0]["resource"]["id"]
    assert stored["extension"][0]["valueReference"]["reference"] == f"Device/{device_id}"
    assert device_id != "lung-seg-algorithm"   # the server assigns ids on POST


@pytest.mark.integration   # the session's FHIR store
def test_providers_change_only_their_own_entries(reg, keys):
    version = register(reg, keys[1])["entry"][2]["resource"]["meta"]["versionId"]
    # another provider claiming the entry in the resource
    r = reg.post("/fhir", content=json.dumps(bundle()), headers=hdr(keys[1], "evil.omi.test"))
    assert r.status_code == 403 and "authenticated as 'evil.omi.test'" in diagnostics(r)
    # another provider overwriting the entry with its own ownership
    r = reg.post("/fhir", content=json.dumps(bundle(org="evil.omi.test")), headers=hdr(keys[1], "evil.omi.test"))
    assert r.status_code == 403 and "belongs to organization 'ai.omi.test'" in diagnostics(r)
    # its heartbeat for a foreign service
    r = reg.post("/fhir/HealthcareService/lung-seg/$heartbeat", headers=hdr(keys[1], "evil.omi.test"))
    assert r.status_code == 403
    hs = reg.get("/fhir/HealthcareService/lung-seg").json()
    assert hs["providedBy"]["identifier"]["value"] == AI and hs["meta"]["versionId"] == version


@pytest.mark.integration   # the session's FHIR store
def test_authentication_errors(reg, keys):
    _, key, other = keys
    body = json.dumps(bundle())
    ct = {"Content-Type": "application/fhir+json"}
    assert reg.post("/fhir", content=body, headers=ct).status_code == 401
    for bad in (token(other), token(key, exp=-120), token(key, iss="https://elsewhere")):
        r = reg.post("/fhir", content=body, headers={**ct, "Authorization": f"Bearer {bad}"})
        assert r.status_code == 401 and "bearer token refused" in diagnostics(r)
    r = reg.post("/fhir", content=body, headers={**ct, "Authorization": f"Bearer {token(key, org=None)}"})
    assert r.status_code == 403 and "organization claim" in diagnostics(r)
    r = reg.post("/fhir", content=body, headers={**ct, "Authorization": "Basic dXNlcjpwdw=="})
    assert r.status_code == 401
    assert count_all(reg) == 0


@pytest.mark.integration   # the session's FHIR store
def test_heartbeat_and_page(reg, keys):
    register(reg, keys[1])
    r = reg.post("/fhir/HealthcareService/lung-seg/$heartbeat", headers=hdr(keys[1]),
                 content=json.dumps({"resourceType": "Parameters", "parameter": [{"name": "note", "valueString": "ok"}]}))
    assert r.status_code == 200
    hs = reg.get("/fhir/HealthcareService/lung-seg").json()
    health = next(e for e in hs["extension"] if e["url"] == d.EXT_HEALTH)["extension"]
    assert any(e["url"] == "heartbeat" for e in health)
    assert reg.post("/fhir/HealthcareService/nope/$heartbeat", headers=hdr(keys[1])).status_code == 404
    page = reg.get("/")
    assert page.status_code == 200 and 'data-service="lung-seg"' in page.text and "unknown" in page.text


@pytest.mark.integration   # the session's FHIR store
def test_health_check_marks_unreachable_service_down_without_deleting(reg, keys):
    register(reg, keys[1])   # its OIP endpoint is 127.0.0.1:9, where nothing listens
    states = reg.app_state.checker.check_all()
    assert states["lung-seg"].status == "down" and "unreachable" in states["lung-seg"].detail
    states = reg.app_state.checker.check_all()
    assert states["lung-seg"].failures == 2
    assert ids(reg.get("/fhir/HealthcareService?health=down")) == ["lung-seg"]
    assert reg.get("/fhir/HealthcareService/lung-seg").status_code == 200
    assert len(reg.app_state.store.recent_checks("lung-seg")) == 2


def test_assess_and_heartbeat_staleness():
    assert assess(True, True, 20, 1000)[0] == "up"
    assert assess(True, True, 2000, 1000)[0] == "degraded"
    assert assess(True, False, 20, 1000)[0] == "degraded"
    assert assess(False, False, 20, 1000)[0] == "down"
    now = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone.utc)
    s = ServiceState("x", status="up", heartbeat_at="2026-11-28T11:50:00.000Z")
    assert effective(s, HealthSettings(heartbeat_timeout=300), now).status == "degraded"
    assert effective(s, HealthSettings(heartbeat_timeout=900), now).status == "up"
    assert effective(ServiceState("y", status="up"), HealthSettings(), now).status == "up"


def test_store_keeps_a_bounded_check_history():
    from omi_dsf.peer import Peer
    from omi_dsf.registry import store as st
    s = Store(Peer(url="http://127.0.0.1:9/fhir"))   # health is in memory: the FHIR store is not asked
    for i in range(st.KEEP_CHECKS + 7):
        s.record_check("svc", "down" if i % 2 else "up", float(i), "x", at=f"2026-11-28T00:00:{i:02d}.000Z"
                       if i < 60 else f"2026-11-28T00:01:{i - 60:02d}.000Z")
    rows = s.recent_checks("svc", 1000)
    assert len(rows) == st.KEEP_CHECKS
    assert rows[0]["latency_ms"] == st.KEEP_CHECKS + 6


def test_config_errors_are_one_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("port: 1\nbogus: 2\n")
    with pytest.raises(UserError, match="bogus: unknown key"):
        load_config(p)
    p.write_text("tls: {certfile: nope.crt, keyfile: nope.key}\n")
    with pytest.raises(UserError, match="tls.certfile: file .*nope.crt does not exist"):
        load_config(p)
    p.write_text("auth: {cert_attribute: serialNumber}\n")
    with pytest.raises(UserError, match="auth.cert_attribute: "):
        load_config(p)
    with pytest.raises(UserError, match="No such file"):
        load_config(tmp_path / "missing.yaml")


def test_cli_refuses_bad_config_in_one_line(tmp_path, capsys):
    from omi_dsf.cli import main
    p = tmp_path / "r.yaml"
    p.write_text("port: [1]\n")
    assert main(["registry", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {p}: port: expected an integer, got [1]"


@pytest.mark.integration   # the session's FHIR store
def test_provider_registers_its_dicomweb_gateway_endpoint(reg, keys):
    from omi_dsf.client.registry_client import services_from_bundle
    from omi_dsf.dicomweb.config import parse_config as gateway_config
    from omi_dsf.dicomweb.endpoint import endpoint_resource

    gw = gateway_config({"auth": {"anonymous": True}, "base_url": "https://ai.omi.test/dicomweb",
                         "backends": {"INBOX": {"type": "store", "path": "/nonexistent-not-opened"}}})
    ep = endpoint_resource(gw, connection_type="dicom-stow-rs")
    register(reg, keys[1], bundle(dicomweb_endpoints=[ep]))
    r = reg.get("/fhir/Endpoint?connection-type=dicom-stow-rs&organization=ai.omi.test")
    assert ids(r) == [ep["id"]]
    found = reg.get("/fhir/HealthcareService?_include=HealthcareService:endpoint&_include=HealthcareService:algorithm")
    (svc,) = services_from_bundle(found.json())
    assert svc.dicomweb == [ep["address"]] and svc.oip_url == "http://127.0.0.1:9/"


# -- the FHIR↔DICOM link ------------------------------------------------------------------------


def test_imaging_study_links_the_gateway_endpoint(tmp_path):
    import pydicom

    from omi_dsf.dicomweb.app import create_app as gateway_app
    from omi_dsf.dicomweb.config import parse_config as gateway_config
    from omi_dsf.dicomweb.endpoint import endpoint_resource
    from omi_dsf.testkit.phantom import write_ct_study
    from omi_dsf.registry.imaging import MII_IMAGING_STUDY, QidoError, find_imaging_study
    from omi_dsf.registry.validation import check_fhir

    files = write_ct_study(tmp_path / "study", slices=3, seed=7, rows=32, cols=32)
    cfg = gateway_config({"auth": {"anonymous": True},
                          "backends": {"PACS": {"type": "store", "path": str(tmp_path / "store")}}})
    endpoint = endpoint_resource(cfg, connection_type="dicom-wado-rs")
    check_fhir(endpoint)   # the gateway's Endpoint is one the registry accepts
    with TestClient(gateway_app(cfg), base_url="http://gw.test") as gw:
        body = b"".join(b"--B\r\nContent-Type: application/dicom\r\n\r\n" + Path(f).read_bytes() + b"\r\n"
                        for f in files) + b"--B--\r\n"
        r = gw.post("/studies", content=body,
                    headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'})
        assert r.status_code == 200
        ds = pydicom.dcmread(files[0])
        study = find_imaging_study(gw, "http://gw.test", ds.StudyInstanceUID, f"Endpoint/{endpoint['id']}",
                                   "Patient/example")
        assert find_imaging_study(gw, "http://gw.test", "1.2.3.4", "Endpoint/x", "Patient/example") is None
        with pytest.raises(QidoError, match="HTTP 404"):
            find_imaging_study(gw, "http://gw.test/aets/NOPE", ds.StudyInstanceUID, "Endpoint/x", "Patient/example")
    assert study["meta"]["profile"] == [MII_IMAGING_STUDY]
    assert study["endpoint"] == [{"reference": f"Endpoint/{endpoint['id']}"}]
    assert study["identifier"][0]["value"] == f"urn:oid:{ds.StudyInstanceUID}"
    assert study["numberOfInstances"] == 3 and study["modality"][0]["code"] == "CT"
    (series,) = study["series"]
    assert series["uid"] == ds.SeriesInstanceUID and series["numberOfInstances"] == 3
    assert series["bodySite"]["code"] == "51185008"   # CHEST → SNOMED thoracic structure
