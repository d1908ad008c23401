"""Site state shared by a site's workers (leases, the UID map, the audit trail) on each backend of
omi_dsf/database.py: a SQLite file, and a real PostgreSQL on 127.0.0.1 (session cluster, one fresh
database per test). Several processes write at once, as workers on several hosts do."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from conftest import free_port
from omi_dsf.audit import AuditTrail
from omi_dsf.database import resolve, safe_target
from omi_dsf.deid.store import SiteStore
from omi_dsf.errors import UserError
from omi_dsf.worker.lease import Leases, open_lease_store

# -- leases ---------------------------------------------------------------------------------------


def test_lease_is_exclusive_until_it_expires(site_db, monkeypatch):
    # the leases' clock, moved by the test: no sleep, and no race with a busy machine
    from types import SimpleNamespace

    from omi_dsf.worker import lease as lease_module
    now = [time.time()]
    monkeypatch.setattr(lease_module, "time", SimpleNamespace(time=lambda: now[0]))
    leases = Leases(site_db)
    assert leases.claim("a", "w1", ttl=0.3) == 1
    assert leases.claim("a", "w2", ttl=10) is None
    now[0] += 0.2
    assert leases.renew("a", "w1", ttl=0.3)              # renewed before it ran out: until +0.5
    now[0] += 0.2
    assert leases.claim("a", "w2", ttl=10) is None        # still held thanks to the renewal
    now[0] += 0.2
    assert leases.claim("a", "w2", ttl=10) == 2          # taken over: the second attempt
    assert not leases.renew("a", "w1", ttl=10)            # w1 learns it lost the lease
    assert leases.claim("a", "w2", ttl=10) == 3          # the holder may claim again (a retry)


def test_released_and_finished_leases(site_db):
    leases = open_lease_store(site_db)
    assert leases.claim("a", "w1", 60) == 1
    leases.release("a", "w1")
    assert leases.claim("a", "w2", 60) == 2
    leases.release("a", "w1")                             # not the holder: changes nothing
    assert leases.claim("a", "w3", 60) is None
    leases.finish("a", "w2")
    assert leases.is_done("a") and not leases.is_done("b")
    assert leases.claim("a", "w3", 60) is None            # done is done, whoever asks
    assert not leases.renew("a", "w2", 60)


def _claim_all(url: str, owner: str, ids: list[str], out) -> None:
    leases = Leases(url)
    out.put([i for i in ids if leases.claim(i, owner, 60)])


def test_concurrent_processes_claim_each_item_once(site_db):
    Leases(site_db)
    ids = [f"item-{i}" for i in range(200)]
    q = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_claim_all, args=(site_db, f"w{n}", ids, q)) for n in range(4)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    claimed = [i for part in got for i in part]
    assert sorted(claimed) == sorted(ids)                  # every item once, none twice


# -- the UID map ----------------------------------------------------------------------------------


def test_uid_map_round_trip_and_removed_attributes(site_db):
    store = SiteStore(site_db)
    store.put_uids("d1", {"2.25.1": "1.2.3", "2.25.2": "1.2.4"})
    store.put_patient("d1", "PSN1", {"PatientName": "A^B"})
    store.put_patient("d1", "PSN1", {"PatientName": "A^B", "PatientBirthDate": "19700101"})   # replaced
    store.put_study("d1", "2.25.1", {"AccessionNumber": "ACC1"})
    store.sync()
    store.close()
    again = SiteStore(site_db)                            # another connection sees it all
    assert again.original_uid("d1", "2.25.2") == "1.2.4"
    assert again.original_uid("d2", "2.25.2") is None     # domains are apart
    assert again.patient("d1", "PSN1") == {"PatientName": "A^B", "PatientBirthDate": "19700101"}
    assert again.study("d1", "2.25.1") == {"AccessionNumber": "ACC1"} and again.study("d1", "2.25.9") is None


def test_a_retried_write_keeps_the_first_mapping(site_db):
    first = SiteStore(site_db)
    first.put_uids("d", {"2.25.1": "1.2.3"})
    first.close()
    retry = SiteStore(site_db)                            # a new process: nothing cached
    retry.put_uids("d", {"2.25.1": "1.2.3", "2.25.2": "1.2.4"})
    retry.put_uids("d", {"2.25.1": "9.9.9"})               # never overwrites what results come back to
    assert retry.original_uid("d", "2.25.1") == "1.2.3"
    assert retry.db.one("SELECT COUNT(*) FROM uids")[0] == 2
    assert retry.put_pseudonym("d", "P1", "PSN-A") == "PSN-A"
    assert SiteStore(site_db).put_pseudonym("d", "P1", "PSN-B") == "PSN-A"   # the stored one wins
    assert retry.value_for("d", "PSN-A") == "P1" and retry.value_for("d", "PSN-B") is None


def test_uid_pairs_are_written_together_when_flushed(site_db, monkeypatch):
    """put_uids keeps the pairs of each instance; flush (sync, close, a read of the map) writes
    them in one transaction; a flush that fails keeps them for the next one."""
    store, other = SiteStore(site_db), SiteStore(site_db)
    store.put_uids("d", {"2.25.1": "1.2.1"})
    store.put_uids("d", {"2.25.2": "1.2.2", "2.25.1": "1.2.1"})
    assert other.original_uid("d", "2.25.1") is None              # not written yet
    assert store.original_uid("d", "2.25.2") == "1.2.2"           # a read flushes first
    assert other.original_uid("d", "2.25.1") == "1.2.1"
    store.put_uids("d", {"2.25.3": "1.2.3"})
    real = store.db.transaction

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(store.db, "transaction", broken)
    with pytest.raises(OSError):
        store.sync()
    monkeypatch.setattr(store.db, "transaction", real)
    store.put_uids("d", {"2.25.3": "1.2.3"})                     # known: not kept twice
    store.sync()
    assert other.original_uid("d", "2.25.3") == "1.2.3"
    assert other.db.one("SELECT COUNT(*) FROM uids")[0] == 3
    store.put_uids("d", {"2.25.4": "1.2.4"})
    store.close()
    assert other.original_uid("d", "2.25.4") == "1.2.4"


def _write_map(url: str, first: int, last: int, start, out) -> None:
    store = SiteStore(url)
    start.wait(30)
    pseudonyms = []
    for lo in range(first, last, 20):                     # one transaction per instance batch
        store.put_uids("d", {f"2.25.{i}": f"1.2.{i}" for i in range(lo, min(lo + 20, last))})
        pseudonyms.append(store.put_pseudonym("d", f"patient-{lo % 100}", f"psn-{first}-{lo}"))
    store.sync()
    out.put(pseudonyms)


def test_two_workers_write_the_uid_map_at_once(site_db):
    SiteStore(site_db).close()
    start, q = multiprocessing.Event(), multiprocessing.Queue()
    # overlapping studies: a retry on another host while the first attempt still runs
    procs = [multiprocessing.Process(target=_write_map, args=(site_db, a, b, start, q)) for a, b in ((0, 300), (100, 400))]
    for p in procs:
        p.start()
    start.set()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    store = SiteStore(site_db)
    rows = dict(store.db.all("SELECT pseudo, original FROM uids WHERE domain='d'"))
    assert rows == {f"2.25.{i}": f"1.2.{i}" for i in range(400)}
    # both workers got the same pseudonym for each patient they both saw
    seen = [dict(zip([f"patient-{lo % 100}" for lo in range(a, b, 20)], psns)) for (a, b), psns in zip(((0, 300), (100, 400)), sorted(got, key=lambda p: p[0]))]
    for value in set(seen[0]) & set(seen[1]):
        assert seen[0][value] == seen[1][value] == store.put_pseudonym("d", value, "late")


# -- the audit trail ------------------------------------------------------------------------------


def _audit_many(url: str, actor: str, start, n: int) -> None:
    trail = AuditTrail(url)
    start.wait(30)
    for i in range(n):
        trail.record(f"bk-{i % 3}", "step-completed", actor, attempt=i)


def test_audit_from_two_workers_at_once(site_db):
    AuditTrail(site_db)
    start = multiprocessing.Event()
    procs = [multiprocessing.Process(target=_audit_many, args=(site_db, f"CN=w{n}", start, 60)) for n in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    trail = AuditTrail(site_db)
    assert len(trail.events()) == 120 and len(trail.events("bk-1")) == 40
    for actor in ("CN=w0", "CN=w1"):                      # each writer's events in the order written
        assert [e.details["attempt"] for e in trail.events() if e.actor == actor] == list(range(60))


# -- URLs -----------------------------------------------------------------------------------------


def test_urls_resolve_against_the_configuration(tmp_path):
    assert resolve("leases.db", tmp_path) == str(tmp_path / "leases.db")
    assert resolve("sqlite:///sub/a.db", tmp_path) == str(tmp_path / "sub/a.db")
    assert resolve("sqlite:////abs/a.db", tmp_path) == "/abs/a.db"
    assert resolve("postgresql://omi@db.site/omi", tmp_path) == "postgresql://omi@db.site/omi"
    assert safe_target("postgresql://omi:s3cret@db.site:6543/omi") == "db.site:6543/omi"


def test_site_config_names_shared_state_by_url(tmp_path):
    from omi_dsf.worker.config import load_site_config

    (tmp_path / "site.yaml").write_text("lease_store: postgresql://omi@db.site/omi\naudit: state/audit.db\n")
    site = load_site_config(tmp_path / "site.yaml")
    assert site.lease_store == "postgresql://omi@db.site/omi"
    assert site.audit == str(tmp_path / "state/audit.db")


def test_unreachable_postgresql_is_one_line_without_the_password():
    with pytest.raises(UserError) as exc:
        SiteStore(f"postgresql://omi:s3cret-pw@127.0.0.1:{free_port()}/site")
    msg = str(exc.value)
    assert msg.startswith("database 127.0.0.1:") and "s3cret-pw" not in msg and "\n" not in msg


def test_memory_database_is_one_shared_connection():
    import threading

    store = SiteStore()
    threads = [threading.Thread(target=store.put_uids, args=("d", {f"2.25.{n}": f"1.{n}"})) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(store.original_uid("d", f"2.25.{n}") == f"1.{n}" for n in range(8))
