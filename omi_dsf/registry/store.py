"""Persistent storage of the registry: SQLite (default, a file) or PostgreSQL (a URL), through
omi_dsf/database.py.

Every write runs in one database transaction, so a registration is stored entirely or not at all.
Identifiers have a unique index per resource type: two registrations of the same service cannot
both win, even when they race in two processes.
"""

from __future__ import annotations

import datetime as dt
import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from omi_dsf import database

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS resources (
        rtype TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, owner TEXT NOT NULL,
        body TEXT NOT NULL, last_updated TEXT NOT NULL, PRIMARY KEY (rtype, id))""",
    """CREATE TABLE IF NOT EXISTS identifiers (
        rtype TEXT NOT NULL, system TEXT NOT NULL, value TEXT NOT NULL, id TEXT NOT NULL,
        PRIMARY KEY (rtype, system, value))""",
    """CREATE TABLE IF NOT EXISTS service_state (
        service_id TEXT PRIMARY KEY, status TEXT, checked_at TEXT, latency_ms DOUBLE PRECISION, detail TEXT,
        failures INTEGER NOT NULL DEFAULT 0, since TEXT, heartbeat_at TEXT, heartbeat_note TEXT)""",
    """CREATE TABLE IF NOT EXISTS checks (
        service_id TEXT NOT NULL, checked_at TEXT NOT NULL, status TEXT NOT NULL,
        latency_ms DOUBLE PRECISION, detail TEXT)""",
    "CREATE INDEX IF NOT EXISTS checks_by_service ON checks (service_id, checked_at)",
]
KEEP_CHECKS = 50  # per service: enough for the page's recent history, bounded table


class DuplicateError(Exception):
    """A unique key (resource id or identifier) is taken."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class ServiceState:
    service_id: str
    status: str = "unknown"
    checked_at: str | None = None
    latency_ms: float | None = None
    detail: str | None = None
    failures: int = 0
    since: str | None = None          # when the current status began
    heartbeat_at: str | None = None
    heartbeat_note: str | None = None


class Tx(database.Tx):
    """Operations inside one transaction."""

    def get(self, rtype: str, rid: str) -> tuple[dict, str, int] | None:
        row = self.one("SELECT body, owner, version FROM resources WHERE rtype=? AND id=?", (rtype, rid))
        return (json.loads(row[0]), row[1], row[2]) if row else None

    def id_for_identifier(self, rtype: str, system: str, value: str) -> str | None:
        row = self.one("SELECT id FROM identifiers WHERE rtype=? AND system=? AND value=?", (rtype, system, value))
        return row[0] if row else None

    def put(self, resource: dict, owner: str, identifiers: list[tuple[str, str]]) -> dict:
        """Create or replace; sets meta.versionId/lastUpdated; returns the stored resource."""
        rtype, rid = resource["resourceType"], resource["id"]
        old = self.get(rtype, rid)
        version = (old[2] + 1) if old else 1
        stamp = now()
        resource = {**resource, "meta": {**(resource.get("meta") or {}), "versionId": str(version),
                                         "lastUpdated": stamp}}
        body = json.dumps(resource, separators=(",", ":"))
        if old:
            self.run("UPDATE resources SET version=?, owner=?, body=?, last_updated=? WHERE rtype=? AND id=?",
                       (version, owner, body, stamp, rtype, rid))
            self.run("DELETE FROM identifiers WHERE rtype=? AND id=?", (rtype, rid))
        else:
            self.run("INSERT INTO resources (rtype, id, version, owner, body, last_updated) VALUES (?,?,?,?,?,?)",
                       (rtype, rid, version, owner, body, stamp))
        for system, value in identifiers:
            self.run("INSERT INTO identifiers (rtype, system, value, id) VALUES (?,?,?,?)", (rtype, system, value, rid))
        return resource


class Store:
    def __init__(self, url: str):
        self.url = url
        self.db = database.Database(url, SCHEMA)

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Tx]:
        try:
            with self.db.transaction(write) as tx:
                yield Tx(tx._conn, tx._postgres)
        except self.db.integrity_error() as exc:
            raise DuplicateError(str(exc).splitlines()[0]) from exc

    def close(self) -> None:
        self.db.close()

    # -- reads --------------------------------------------------------------------------------

    def read(self, rtype: str, rid: str) -> tuple[dict, str] | None:
        with self.transaction(write=False) as tx:
            got = tx.get(rtype, rid)
        return (got[0], got[1]) if got else None

    def all(self, rtype: str) -> list[dict]:
        with self.transaction(write=False) as tx:
            rows = tx.all("SELECT body FROM resources WHERE rtype=? ORDER BY id", (rtype,))
        return [json.loads(r[0]) for r in rows]

    # -- health -------------------------------------------------------------------------------

    def state(self, service_id: str) -> ServiceState:
        return self.states([service_id]).get(service_id) or ServiceState(service_id)

    def states(self, service_ids: list[str] | None = None) -> dict[str, ServiceState]:
        with self.transaction(write=False) as tx:
            rows = tx.all("SELECT service_id, status, checked_at, latency_ms, detail, failures, since, "
                          "heartbeat_at, heartbeat_note FROM service_state")
        out = {r[0]: ServiceState(*r) for r in rows}
        return out if service_ids is None else {k: v for k, v in out.items() if k in service_ids}

    def record_check(self, service_id: str, status: str, latency_ms: float | None, detail: str,
                     at: str | None = None) -> ServiceState:
        at = at or now()
        with self.transaction() as tx:
            row = tx.one("SELECT status, failures, since FROM service_state WHERE service_id=?", (service_id,))
            failures = 0 if status == "up" else ((row[1] if row else 0) + 1)
            since = row[2] if row and row[0] == status and row[2] else at
            if row:
                tx.run("UPDATE service_state SET status=?, checked_at=?, latency_ms=?, detail=?, failures=?, since=? "
                         "WHERE service_id=?", (status, at, latency_ms, detail, failures, since, service_id))
            else:
                tx.run("INSERT INTO service_state (service_id, status, checked_at, latency_ms, detail, failures, since) "
                         "VALUES (?,?,?,?,?,?,?)", (service_id, status, at, latency_ms, detail, failures, since))
            tx.run("INSERT INTO checks (service_id, checked_at, status, latency_ms, detail) VALUES (?,?,?,?,?)",
                     (service_id, at, status, latency_ms, detail))
            # keep the newest KEEP_CHECKS rows of this service
            tx.run("DELETE FROM checks WHERE service_id=? AND checked_at < (SELECT MIN(checked_at) FROM "
                     "(SELECT checked_at FROM checks WHERE service_id=? ORDER BY checked_at DESC LIMIT ?) AS newest)",
                     (service_id, service_id, KEEP_CHECKS))
        return self.state(service_id)

    def record_heartbeat(self, service_id: str, note: str | None, at: str | None = None) -> str:
        at = at or now()
        with self.transaction() as tx:
            n = tx.run("UPDATE service_state SET heartbeat_at=?, heartbeat_note=? WHERE service_id=?",
                       (at, note, service_id))
            if not n:
                tx.run("INSERT INTO service_state (service_id, status, heartbeat_at, heartbeat_note, failures) "
                         "VALUES (?,?,?,?,0)", (service_id, "unknown", at, note))
        return at

    def recent_checks(self, service_id: str, limit: int = 10) -> list[dict]:
        with self.transaction(write=False) as tx:
            rows = tx.all("SELECT checked_at, status, latency_ms, detail FROM checks WHERE service_id=? "
                          "ORDER BY checked_at DESC LIMIT ?", (service_id, limit))
        return [{"checked_at": r[0], "status": r[1], "latency_ms": r[2], "detail": r[3]} for r in rows]
