"""The registry's storage on SQLite and on a real PostgreSQL (the session's cluster of Debian's
PostgreSQL on 127.0.0.1): whole-or-nothing registrations, duplicates refused even when two
registrations race, health history."""

from __future__ import annotations

import threading

import pytest

from conftest import free_port
from omi_dsf.registry.entries import service_bundle
from omi_dsf.registry.errors import FhirError
from omi_dsf.registry.registrations import Registry
from omi_dsf.registry.store import Store

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


def _exercise(store: Store) -> None:
    reg = Registry(store)
    reg.transaction(_bundle("a"), AI)
    # a broken second bundle leaves nothing behind
    broken = _bundle("b")
    broken["entry"][2]["resource"]["endpoint"] = [{"reference": "Endpoint/missing"}]
    with pytest.raises(FhirError) as exc:
        reg.transaction(broken, AI)
    assert exc.value.status == 422
    assert [r["id"] for r in store.all("Device")] == ["a-algorithm"]
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
        finally:
            store.close()

    threads = [threading.Thread(target=register, args=(sid,)) for sid in ("race-1", "race-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(map(str, results)) == ["409", "ok"]
    assert len(store.all("HealthcareService")) == 2
    # health history and heartbeats
    store.record_check("a", "down", 12.5, "unreachable")
    store.record_check("a", "down", 11.0, "unreachable")
    store.record_heartbeat("a", "alive")
    st = store.state("a")
    assert (st.status, st.failures, st.heartbeat_note) == ("down", 2, "alive")
    store.record_check("a", "up", 3.0, "ok")
    assert store.state("a").failures == 0 and len(store.recent_checks("a")) == 3


def test_sqlite_store(tmp_path):
    _exercise(Store(str(tmp_path / "registry.db")))


@pytest.mark.integration
def test_postgresql_store(postgres):
    store = Store(postgres.new_database())
    _exercise(store)
    # the data is in PostgreSQL: a new store on the same URL sees it
    again = Store(store.url)
    assert {r["id"] for r in again.all("HealthcareService")} >= {"a"}
    again.close()
    store.close()


def test_unreachable_database_is_one_line_without_the_password(tmp_path, capsys):
    from omi_dsf.cli import main

    cfg = tmp_path / "registry.yaml"
    cfg.write_text(f"database: postgresql://omi:s3cret-pw@127.0.0.1:{free_port()}/registry\n")
    assert main(["registry", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: database 127.0.0.1:") and "s3cret-pw" not in err and err.count("\n") == 1
