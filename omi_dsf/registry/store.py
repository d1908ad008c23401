"""Persistent storage of the registry: SQLite (default, a file) or PostgreSQL (a URL).

Every write runs in one database transaction, so a registration is stored entirely or not at all.
Identifiers have a unique index per resource type: two registrations of the same service cannot
both win, even when they race in two processes.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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


class Tx:
    """Operations inside one transaction."""

    def __init__(self, conn, q):
        self._c, self._q = conn, q

    def _exec(self, sql: str, args=()):
        cur = self._c.cursor()
        cur.execute(self._q(sql), args)
        return cur

    def get(self, rtype: str, rid: str) -> tuple[dict, str, int] | None:
        row = self._exec("SELECT body, owner, version FROM resources WHERE rtype=? AND id=?", (rtype, rid)).fetchone()
        return (json.loads(row[0]), row[1], row[2]) if row else None

    def id_for_identifier(self, rtype: str, system: str, value: str) -> str | None:
        row = self._exec("SELECT id FROM identifiers WHERE rtype=? AND system=? AND value=?",
                         (rtype, system, value)).fetchone()
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
            self._exec("UPDATE resources SET version=?, owner=?, body=?, last_updated=? WHERE rtype=? AND id=?",
                       (version, owner, body, stamp, rtype, rid))
            self._exec("DELETE FROM identifiers WHERE rtype=? AND id=?", (rtype, rid))
        else:
            self._exec("INSERT INTO resources (rtype, id, version, owner, body, last_updated) VALUES (?,?,?,?,?,?)",
                       (rtype, rid, version, owner, body, stamp))
        for system, value in identifiers:
            self._exec("INSERT INTO identifiers (rtype, system, value, id) VALUES (?,?,?,?)", (rtype, system, value, rid))
        return resource


class Store:
    def __init__(self, url: str):
        self.url = url
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        if not self.postgres:
            path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url
            self.path = str(Path(path))
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self.transaction() as tx:
            for stmt in SCHEMA:
                tx._exec(stmt)

    # -- connections --------------------------------------------------------------------------

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def _connect(self):
        if self.postgres:
            import psycopg
            return psycopg.connect(self.url, autocommit=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        return conn

    def _conn(self):
        # one connection per thread: sqlite3 and psycopg connections are not shared across threads
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Tx]:
        conn = self._conn()
        integrity = self._integrity_errors()
        try:
            if self.postgres:
                with conn.transaction():
                    yield Tx(conn, self._q)
            else:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")  # one writer at a time, no lost updates
                try:
                    yield Tx(conn, self._q)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        except integrity as exc:
            raise DuplicateError(str(exc).splitlines()[0]) from exc

    def _integrity_errors(self):
        if self.postgres:
            import psycopg
            return psycopg.errors.UniqueViolation
        return sqlite3.IntegrityError

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- reads --------------------------------------------------------------------------------

    def read(self, rtype: str, rid: str) -> tuple[dict, str] | None:
        with self.transaction(write=False) as tx:
            got = tx.get(rtype, rid)
        return (got[0], got[1]) if got else None

    def all(self, rtype: str) -> list[dict]:
        with self.transaction(write=False) as tx:
            rows = tx._exec("SELECT body FROM resources WHERE rtype=? ORDER BY id", (rtype,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    # -- health -------------------------------------------------------------------------------

    def state(self, service_id: str) -> ServiceState:
        return self.states([service_id]).get(service_id) or ServiceState(service_id)

    def states(self, service_ids: list[str] | None = None) -> dict[str, ServiceState]:
        with self.transaction(write=False) as tx:
            rows = tx._exec("SELECT service_id, status, checked_at, latency_ms, detail, failures, since, "
                            "heartbeat_at, heartbeat_note FROM service_state").fetchall()
        out = {r[0]: ServiceState(*r) for r in rows}
        return out if service_ids is None else {k: v for k, v in out.items() if k in service_ids}

    def record_check(self, service_id: str, status: str, latency_ms: float | None, detail: str,
                     at: str | None = None) -> ServiceState:
        at = at or now()
        with self.transaction() as tx:
            row = tx._exec("SELECT status, failures, since FROM service_state WHERE service_id=?",
                           (service_id,)).fetchone()
            failures = 0 if status == "up" else ((row[1] if row else 0) + 1)
            since = row[2] if row and row[0] == status and row[2] else at
            if row:
                tx._exec("UPDATE service_state SET status=?, checked_at=?, latency_ms=?, detail=?, failures=?, since=? "
                         "WHERE service_id=?", (status, at, latency_ms, detail, failures, since, service_id))
            else:
                tx._exec("INSERT INTO service_state (service_id, status, checked_at, latency_ms, detail, failures, since) "
                         "VALUES (?,?,?,?,?,?,?)", (service_id, status, at, latency_ms, detail, failures, since))
            tx._exec("INSERT INTO checks (service_id, checked_at, status, latency_ms, detail) VALUES (?,?,?,?,?)",
                     (service_id, at, status, latency_ms, detail))
            # keep the newest KEEP_CHECKS rows of this service
            tx._exec("DELETE FROM checks WHERE service_id=? AND checked_at < (SELECT MIN(checked_at) FROM "
                     "(SELECT checked_at FROM checks WHERE service_id=? ORDER BY checked_at DESC LIMIT ?) AS newest)",
                     (service_id, service_id, KEEP_CHECKS))
        return self.state(service_id)

    def record_heartbeat(self, service_id: str, note: str | None, at: str | None = None) -> str:
        at = at or now()
        with self.transaction() as tx:
            n = tx._exec("UPDATE service_state SET heartbeat_at=?, heartbeat_note=? WHERE service_id=?",
                         (at, note, service_id)).rowcount
            if not n:
                tx._exec("INSERT INTO service_state (service_id, status, heartbeat_at, heartbeat_note, failures) "
                         "VALUES (?,?,?,?,0)", (service_id, "unknown", at, note))
        return at

    def recent_checks(self, service_id: str, limit: int = 10) -> list[dict]:
        with self.transaction(write=False) as tx:
            rows = tx._exec("SELECT checked_at, status, latency_ms, detail FROM checks WHERE service_id=? "
                            "ORDER BY checked_at DESC LIMIT ?", (service_id, limit)).fetchall()
        return [{"checked_at": r[0], "status": r[1], "latency_ms": r[2], "detail": r[3]} for r in rows]
