"""The registry's entries in a real FHIR server (the session's HAPI FHIR JPA store): the registry's
SearchParameters loaded, whole-or-nothing registrations, duplicates refused even when two
registrations race, entries of other data in the same server not seen, health history in memory."""

from __future__ import annotations

import threading

import pytest

from conftest import free_port
from omi_dsf.peer import Peer
from omi_dsf.registry.entries import service_bundle
from omi_dsf.registry.errors import FhirError
from omi_dsf.registry.registrations import Registry
from omi_dsf.registry.store import SEARCH_PARAMETERS, Store

AI = "ai.omi.test"


def _bundle(service_id: str, ident: str | None = None) -> dict:
    b = service_bundle(AI, service_id, name=service_id, model="lung-seg", model_version="1", oip_url="http://127.0.0.1:9",
                       modality=["CT"], body_site=[("http://snomed.info/sct", "39607008")])
    if ident:   # same business identifiers as service `ident`, other ids: a duplicate registration
        for e in b["entry"]:
            r = e["resource"]
            for i in r["identifier"]:
                i["value"] = i["value"].replace(service_id, ident, 1)
    return b


@pytest.mark.integration
def test_fhir_store(fhir_store):
    store = Store(Peer(url=fhir_store.state().base_url))
    store.install_search_parameters()
    store.clear()
    with fhir_store.client() as http:   # the SearchParameters are resources of the server
        for sp in SEARCH_PARAMETERS:
            assert http.get(f"/SearchParameter/{sp['id']}").json()["code"] == sp["code"]
        # data that is not the registry's, in the same server: not seen, its id not taken over
        r = http.put("/Endpoint/not-a-registry-entry", json={
            "resourceType": "Endpoint", "id": "not-a-registry-entry", "status": "active", "address": "https://x.test",
            "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                               "code": "dicom-wado-rs"}, "payloadType": [{"text": "DICOM"}]},
            headers={"Content-Type": "application/fhir+json"})
        assert r.status_code in (200, 201), r.text
    reg = Registry(store)
    assert store.read("Endpoint", "not-a-registry-entry") is None
    reg.transaction(_bundle("a"), AI)
    assert {r["id"] for r in store.search_all("Endpoint")} == {"a-oip"}
    taken = _bundle("b")
    taken["entry"][1]["resource"]["id"] = "not-a-registry-entry"
    taken["entry"][1]["request"]["url"] = "Endpoint/not-a-registry-entry"
    with pytest.raises(FhirError) as exc:
        reg.transaction(taken, AI)
    assert exc.value.status == 409 and "is not a registry entry" in exc.value.message
    # a broken second bundle leaves nothing behind
    broken = _bundle("b")
    broken["entry"][2]["resource"]["endpoint"] = [{"reference": "Endpoint/missing"}]
    with pytest.raises(FhirError) as exc:
        reg.transaction(broken, AI)
    assert exc.value.status == 422
    assert [r["id"] for r in store.search_all("Device")] == ["a-algorithm"]
    # two registrations of the same service race: exactly one wins, the other is a 409
    results: list[object] = []
    barrier = threading.Barrier(2)

    def register(sid: str) -> None:
        barrier.wait()
        try:
            reg.transaction(_bundle(sid, ident="race"), AI)
            results.append("ok")
        except FhirError as e:
            results.append(e.status)

    threads = [threading.Thread(target=register, args=(sid,)) for sid in ("race-1", "race-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(map(str, results)) == ["409", "ok"]
    assert len(store.search_all("HealthcareService")) == 2
    assert store.clear() == 6
    store.close()


def test_health_history_in_memory():
    store = Store(Peer(url="http://127.0.0.1:9/fhir"))   # not asked
    store.record_check("a", "down", 12.5, "unreachable")
    store.record_check("a", "down", 11.0, "unreachable")
    store.record_heartbeat("a", "alive")
    st = store.state("a")
    assert (st.status, st.failures, st.heartbeat_note) == ("down", 2, "alive")
    store.record_check("a", "up", 3.0, "ok")
    assert store.state("a").failures == 0 and len(store.recent_checks("a")) == 3
    assert store.state("a").since == store.recent_checks("a")[0]["checked_at"]


def test_unreachable_fhir_store_is_one_line(tmp_path, capsys):
    from omi_dsf.cli import main

    cfg = tmp_path / "registry.yaml"
    cfg.write_text(f"fhir_store: {{url: 'http://127.0.0.1:{free_port()}/fhir'}}\n")
    assert main(["registry", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cfg}: fhir_store http://127.0.0.1:") and "does not answer" in err
    assert err.count("\n") == 1
    cfg.write_text("port: 8700\n")
    assert main(["registry", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {cfg}: fhir_store: required")
