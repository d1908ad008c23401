"""The DIC's FHIR store (omi_dsf.fhirstore + fhir-store/): the launcher's settings and errors, and a
real HAPI FHIR JPA server answering FHIR R4 (conditional create, search, paging, transactions)."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from helpers_cli import run_cli
from omi_dsf.errors import UserError
from omi_dsf.fhirstore import FhirStore, State
from omi_dsf.processes import port_free
from conftest import free_port


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli("fhir-store", *args, timeout=120)


def test_settings_file_names_files_not_secrets(tmp_path):
    pw = tmp_path / "db.pw"
    pw.write_text("s3cret\n")
    store = FhirStore(tmp_path / "s", db_url="jdbc:postgresql://127.0.0.1:5432/fhir", db_user="fhir",
                      db_password_file=str(pw), validate=True)
    store.dir.mkdir()
    path, st = store._settings(18123)
    text = path.read_text()
    assert "s3cret" not in text
    assert f"db.password.file={pw}" in text and "db.url=jdbc:postgresql://127.0.0.1:5432/fhir" in text
    assert "validation.requests=true" in text and "host=127.0.0.1" in text
    assert st.base_url == "http://127.0.0.1:18123/fhir" and st.database == "PostgreSQL"


def test_default_database_is_h2_in_the_folder(tmp_path):
    store = FhirStore(tmp_path / "s")
    store.dir.mkdir()
    path, st = store._settings(18124)
    assert f"db.url=jdbc:h2:file:{tmp_path / 's' / 'db' / 'fhir'}" in path.read_text()
    assert st.database == "H2" and not st.tls


def _server_cert(tmp_path):
    from omi_dsf.testbed.certs import TestCA

    ca = TestCA(tmp_path / "pki")
    ca.ensure()
    files = ca.issue("fhir-store", "localhost", server=True, client=False)
    return ca, files


def test_tls_keystore_from_pem(tmp_path):
    from cryptography.hazmat.primitives.serialization import pkcs12

    ca, files = _server_cert(tmp_path)
    store = FhirStore(tmp_path / "s", tls_cert=str(files.cert), tls_key=str(files.key),
                      tls_key_password_file=str(files.key) + ".password", tls_ca=str(ca.cert_path))
    store.dir.mkdir()
    path, st = store._settings(18125)
    text = path.read_text()
    assert st.base_url == "https://127.0.0.1:18125/fhir" and st.tls and st.ca_file == str(ca.cert_path)
    pw = (store.dir / "tls" / "keystore.password").read_text().strip()
    assert pw not in text and "tls.keystore.password.file=" in text
    key, cert, _ = pkcs12.load_key_and_certificates((store.dir / "tls" / "keystore.p12").read_bytes(), pw.encode())
    assert cert.subject.rfc4514_string() .endswith("CN=localhost") or "localhost" in cert.subject.rfc4514_string()
    assert (store.dir / "tls" / "keystore.p12").stat().st_mode & 0o077 == 0
    with pytest.raises(UserError, match="cannot read the PEM certificate and key"):
        FhirStore(tmp_path / "t", tls_cert=str(files.cert), tls_key=str(files.key))._settings(1)


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="--tls-cert and --tls-key go together"):
        FhirStore(tmp_path, tls_cert="c.pem")
    with pytest.raises(UserError, match="--db-url must be"):
        FhirStore(tmp_path, db_url="mysql://x")
    r = _cli("up", "--dir", str(tmp_path), "--db-url", "oracle:x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--db-url must be" in r.stderr


def test_status_of_a_folder_without_store(tmp_path):
    r = _cli("status", "--dir", str(tmp_path))
    assert r.returncode == 1 and "no FHIR store" in r.stdout
    r = _cli("down", "--dir", str(tmp_path))
    assert r.returncode == 0 and "nothing to stop" in r.stdout


@pytest.mark.integration
def test_up_twice_is_safe_and_port_in_use_is_refused(fhir_store, tmp_path):
    st = fhir_store.state()
    again = FhirStore(fhir_store.dir, out=lambda *_: None).up()
    assert again.pid == st.pid                     # the running one, not a second JVM
    assert not port_free(st.port)
    with pytest.raises(UserError, match=rf"port {st.port} on 127.0.0.1 is in use"):
        FhirStore(tmp_path / "other", port=st.port, out=lambda *_: None).up()
    r = _cli("up", "--dir", str(tmp_path / "other2"), "--port", str(st.port))
    assert r.returncode == 2 and f"port {st.port} on 127.0.0.1 is in use" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("status", "--dir", str(fhir_store.dir))
    assert r.returncode == 0 and st.base_url in r.stdout


@pytest.mark.integration
def test_fhir_r4_conditional_create_search_and_paging(fhir_store):
    system = f"urn:test:{uuid.uuid4()}"
    with fhir_store.client() as c:
        meta = c.get("/metadata").json()
        assert meta["fhirVersion"].startswith("4.0")
        body = {"resourceType": "Patient", "identifier": [{"system": system, "value": "p1"}]}
        first = c.put("/Patient", params={"identifier": f"{system}|p1"}, json=body,
                      headers={"Content-Type": "application/fhir+json"})
        assert first.status_code == 201
        again = c.put("/Patient", params={"identifier": f"{system}|p1"}, json=body,
                      headers={"Content-Type": "application/fhir+json"})
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Patient", "identifier": [{"system": system, "value": f"q{i}"}]},
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={system}|q{i}"}}
            for i in range(25)]}
        r = c.post("", json=tx, headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 200, r.text
        seen, url, params = [], "/Patient", {"identifier": system + "|", "_count": "10"}
        page = c.get(url, params={"identifier": ",".join(f"{system}|q{i}" for i in range(25)), "_count": "10"}).json()
        while True:
            seen += [e["resource"]["identifier"][0]["value"] for e in page.get("entry", [])]
            nxt = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
            if not nxt:
                break
            page = c.get(nxt).json()
        assert sorted(seen) == sorted(f"q{i}" for i in range(25))


@pytest.mark.integration
def test_validating_store_refuses_invalid_resources_and_warns_on_unloaded_profiles(fhir_store):
    """The session store runs with --validate --unknown-profiles warning: a resource that breaks R4
    is refused (422, the OperationOutcome says where); one that only claims a profile the store
    does not hold is stored."""
    system = f"urn:test:{uuid.uuid4()}"
    headers = {"Content-Type": "application/fhir+json"}
    with fhir_store.client() as c:
        bad = {"resourceType": "Observation", "identifier": [{"system": system, "value": "o1"}],
               "status": "no-such-status", "code": {"text": "lung volume"}}
        r = c.post("/Observation", json=bad, headers=headers)
        assert r.status_code == 422, r.text
        issues = [i for i in r.json()["issue"] if i["severity"] == "error"]
        assert any("Observation.status" in " ".join(i.get("location") or i.get("expression") or []) for i in issues)
        good = {**bad, "status": "final",
                "meta": {"profile": ["https://example.org/fhir/StructureDefinition/not-loaded-here"]}}
        assert c.post("/Observation", json=good, headers=headers).status_code == 201
        assert c.get("/Observation", params={"identifier": f"{system}|o1"}).json()["total"] == 1


def test_unknown_profiles_setting(tmp_path):
    store = FhirStore(tmp_path / "s", validate=True, unknown_profiles="warning")
    store.dir.mkdir()
    assert "validation.unknown_profiles=warning" in store._settings(18126)[0].read_text()
    assert "validation.unknown_profiles=error" in FhirStore(tmp_path / "s")._settings(18126)[0].read_text()
    with pytest.raises(UserError, match="--unknown-profiles must be error or warning"):
        FhirStore(tmp_path, unknown_profiles="ignore")


def test_state_round_trip(tmp_path):
    st = State(pid=123, port=1, base_url="http://127.0.0.1:1/fhir", database="H2")
    st.save(tmp_path)
    assert State.load(tmp_path) == st


@pytest.mark.integration
def test_store_on_postgresql_over_tls(postgres, tmp_path):
    """The options in one store (each start costs a minute): PostgreSQL, where HAPI creates its schema
    in an empty database, and TLS, HTTPS only and trusted only with the CA."""
    from urllib.parse import urlsplit

    import httpx

    url = urlsplit(postgres.new_database())
    pw = tmp_path / "db.password"
    pw.write_text(url.password + "\n")
    ca, files = _server_cert(tmp_path)
    store = FhirStore(tmp_path / "pg-store", port=free_port(), db_url=f"jdbc:postgresql://{url.hostname}:{url.port}{url.path}",
                      db_user=url.username, db_password_file=str(pw), tls_cert=str(files.cert), tls_key=str(files.key),
                      tls_key_password_file=str(files.key) + ".password", tls_ca=str(ca.cert_path),
                      heap="512m", out=lambda *_: None)
    st = store.up(timeout=600)
    try:
        assert st.database == "PostgreSQL" and st.base_url.startswith("https://")
        with store.client() as c:
            body = {"resourceType": "Patient", "identifier": [{"system": "urn:test", "value": "pg-1"}]}
            assert c.post("/Patient", json=body, headers={"Content-Type": "application/fhir+json"}).status_code == 201
            assert c.get("/Patient", params={"identifier": "urn:test|pg-1"}).json()["total"] == 1
        tables = postgres.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'hfj_resource';", db=url.path[1:])
        assert tables.strip() == "1"
        with pytest.raises(httpx.ConnectError):       # not trusted without the CA
            httpx.get(f"{st.base_url}/metadata", timeout=10)
        with pytest.raises(httpx.HTTPError):          # no plain HTTP on that port
            httpx.get(f"http://127.0.0.1:{st.port}/fhir/metadata", timeout=10).raise_for_status()
    finally:
        store.down()
    assert not store.running() and port_free(st.port)
