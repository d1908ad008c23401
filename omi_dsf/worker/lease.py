"""Leases on work items, so that several worker processes of a site never run the same item at once.

The DSF lets a QuestionnaireResponse change only from in-progress to completed, so a claim cannot
live on the resource itself: it lives here. SQLite (one machine, the default) or PostgreSQL (workers
on several machines) by URL. A lease that is not renewed expires, and another worker takes the item.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol


class LeaseStore(Protocol):
    def claim(self, item_id: str, owner: str, ttl: float) -> int | None: ...
    def renew(self, item_id: str, owner: str, ttl: float) -> bool: ...
    def release(self, item_id: str, owner: str) -> None: ...
    def finish(self, item_id: str, owner: str) -> None: ...
    def is_done(self, item_id: str) -> bool: ...


class SqliteLeases:
    """claim() returns the attempt number (1, 2, …) when the caller now holds the lease, else None."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.execute("""CREATE TABLE IF NOT EXISTS leases (
                item_id TEXT PRIMARY KEY, owner TEXT, expires REAL NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0, done INTEGER NOT NULL DEFAULT 0)""")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            self._local.db = db
        return db

    def claim(self, item_id: str, owner: str, ttl: float) -> int | None:
        now = time.time()
        db = self._db()
        db.execute("BEGIN IMMEDIATE")   # one writer at a time: the check and the write are atomic
        try:
            row = db.execute("SELECT owner, expires, attempts, done FROM leases WHERE item_id=?", (item_id,)).fetchone()
            if row is None:
                db.execute("INSERT INTO leases(item_id, owner, expires, attempts) VALUES (?,?,?,1)", (item_id, owner, now + ttl))
                attempts = 1
            elif row[3] or (row[0] not in (None, owner) and row[1] > now):
                db.execute("ROLLBACK")
                return None
            else:
                attempts = row[2] + 1
                db.execute("UPDATE leases SET owner=?, expires=?, attempts=? WHERE item_id=?", (owner, now + ttl, attempts, item_id))
            db.execute("COMMIT")
            return attempts
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def renew(self, item_id: str, owner: str, ttl: float) -> bool:
        cur = self._db().execute("UPDATE leases SET expires=? WHERE item_id=? AND owner=? AND done=0",
                                 (time.time() + ttl, item_id, owner))
        return cur.rowcount == 1

    def release(self, item_id: str, owner: str) -> None:
        self._db().execute("UPDATE leases SET owner=NULL, expires=0 WHERE item_id=? AND owner=? AND done=0", (item_id, owner))

    def finish(self, item_id: str, owner: str) -> None:
        self._db().execute("UPDATE leases SET done=1, expires=0 WHERE item_id=?", (item_id,))

    def is_done(self, item_id: str) -> bool:
        row = self._db().execute("SELECT done FROM leases WHERE item_id=?", (item_id,)).fetchone()
        return bool(row and row[0])


class PostgresLeases:
    """The same contract on PostgreSQL, for workers on several machines (psycopg 3)."""

    def __init__(self, url: str):
        import psycopg

        self._psycopg = psycopg
        self.url = url
        self._local = threading.local()
        with self._conn() as c:
            c.execute("""CREATE TABLE IF NOT EXISTS omi_leases (
                item_id TEXT PRIMARY KEY, owner TEXT, expires DOUBLE PRECISION NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0, done BOOLEAN NOT NULL DEFAULT FALSE)""")

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._psycopg.connect(self.url, autocommit=True)
            self._local.conn = conn
        return conn

    def claim(self, item_id: str, owner: str, ttl: float) -> int | None:
        now = time.time()
        # one statement: insert, or take over an expired / own lease; nothing when held or done
        row = self._conn().execute(
            """INSERT INTO omi_leases(item_id, owner, expires, attempts) VALUES (%s, %s, %s, 1)
               ON CONFLICT (item_id) DO UPDATE SET owner=EXCLUDED.owner, expires=EXCLUDED.expires,
                   attempts=omi_leases.attempts + 1
               WHERE NOT omi_leases.done AND (omi_leases.owner IS NULL OR omi_leases.owner = EXCLUDED.owner
                   OR omi_leases.expires < %s)
               RETURNING attempts""", (item_id, owner, now + ttl, now)).fetchone()
        return row[0] if row else None

    def renew(self, item_id: str, owner: str, ttl: float) -> bool:
        cur = self._conn().execute("UPDATE omi_leases SET expires=%s WHERE item_id=%s AND owner=%s AND NOT done",
                                   (time.time() + ttl, item_id, owner))
        return cur.rowcount == 1

    def release(self, item_id: str, owner: str) -> None:
        self._conn().execute("UPDATE omi_leases SET owner=NULL, expires=0 WHERE item_id=%s AND owner=%s AND NOT done",
                             (item_id, owner))

    def finish(self, item_id: str, owner: str) -> None:
        self._conn().execute("UPDATE omi_leases SET done=TRUE, expires=0 WHERE item_id=%s", (item_id,))

    def is_done(self, item_id: str) -> bool:
        row = self._conn().execute("SELECT done FROM omi_leases WHERE item_id=%s", (item_id,)).fetchone()
        return bool(row and row[0])


def open_lease_store(url: str) -> LeaseStore:
    """`sqlite:///path/to/leases.db` (or a plain path) or `postgresql://…`."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresLeases(url)
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url
    return SqliteLeases(path)
