"""What the site keeps to undo the pseudonymization, in a database that never leaves the site
(omi_dsf/database.py: a SQLite file, or PostgreSQL when workers on several hosts share it).

Tables: embedded pseudonyms (domain, value <-> pseudonym), UIDs (domain, pseudonymized ->
original), and the patient and study attributes that de-identification removed, so that
returned results can carry them again. Every write is idempotent: a retried step, or two
workers pseudonymizing the same study at once, leave one row per key and the first value wins.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from omi_dsf.database import Database

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS pseudonyms (
    domain TEXT NOT NULL, value TEXT NOT NULL, pseudonym TEXT NOT NULL,
    PRIMARY KEY (domain, value), UNIQUE (domain, pseudonym))""",
    """CREATE TABLE IF NOT EXISTS uids (
    domain TEXT NOT NULL, pseudo TEXT NOT NULL, original TEXT NOT NULL,
    PRIMARY KEY (domain, pseudo))""",
    """CREATE TABLE IF NOT EXISTS patients (
    domain TEXT NOT NULL, pseudonym TEXT NOT NULL, attrs TEXT NOT NULL,
    PRIMARY KEY (domain, pseudonym))""",
    """CREATE TABLE IF NOT EXISTS studies (
    domain TEXT NOT NULL, pseudo_study_uid TEXT NOT NULL, attrs TEXT NOT NULL,
    PRIMARY KEY (domain, pseudo_study_uid))""",
]


class SiteStore:
    """Thread-safe; workers in several processes (SQLite: WAL, busy timeout) or on several hosts
    (PostgreSQL) may share it. `url`: a SQLite path or `sqlite:///…`, `:memory:`, `postgresql://…`."""

    def __init__(self, url: str | Path = ":memory:"):
        self.db = Database(url, SCHEMA)
        self.path = self.db.url
        self._known_uids: set[tuple[str, str]] = set()
        self._pending: list[tuple[str, str, str]] = []     # UID pairs not yet written (put_uids)
        self._lock = threading.Lock()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.db.close()

    def sync(self) -> None:
        """Write what `put_uids` keeps and make everything written so far durable (SQLite commits
        run without an fsync each; one checkpoint makes the map safe on disk; PostgreSQL commits
        are durable already)."""
        self.flush()
        self.db.sync()

    def flush(self) -> None:
        """Write the UID pairs `put_uids` keeps, in one transaction."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            with self.db.transaction() as tx:
                tx.many("INSERT INTO uids VALUES (?,?,?) ON CONFLICT DO NOTHING", pending)
        except BaseException:
            with self._lock:
                self._pending[:0] = pending     # kept for the next flush
            raise

    # -- embedded pseudonyms -------------------------------------------------------------
    def put_pseudonym(self, domain: str, value: str, pseudonym: str) -> str:
        """Record the pair unless the value already has one; return the stored pseudonym."""
        self.db.run("INSERT INTO pseudonyms VALUES (?,?,?) ON CONFLICT DO NOTHING", (domain, value, pseudonym))
        row = self.db.one("SELECT pseudonym FROM pseudonyms WHERE domain=? AND value=?", (domain, value))
        if row is None:
            raise ValueError(f"pseudonym store: the pseudonym for a value in domain {domain!r} is taken by another value")
        return row[0]

    def value_for(self, domain: str, pseudonym: str) -> str | None:
        row = self.db.one("SELECT value FROM pseudonyms WHERE domain=? AND pseudonym=?", (domain, pseudonym))
        return row[0] if row else None

    # -- UIDs ----------------------------------------------------------------------------
    def put_uids(self, domain: str, pairs: dict[str, str]) -> None:
        """pairs: pseudonymized -> original. Kept until `flush` (or `sync`, `close`, a read of the
        map), which writes every pair kept in one transaction: whoever lets an instance leave
        flushes first (the send step syncs before each STOW-RS batch, the deid command flushes
        before each file). One transaction per instance cost ~0.7 ms of each instance's time in
        the send step (py-spy, 400 slices, SQLite), more on PostgreSQL (a round trip each)."""
        with self._lock:
            new = [(domain, p, o) for p, o in pairs.items() if (domain, p) not in self._known_uids]
            self._pending.extend(new)
            self._known_uids.update((d, p) for d, p, _ in new)

    def original_uid(self, domain: str, pseudo: str) -> str | None:
        self.flush()
        row = self.db.one("SELECT original FROM uids WHERE domain=? AND pseudo=?", (domain, pseudo))
        return row[0] if row else None

    # -- removed attributes --------------------------------------------------------------
    def put_patient(self, domain: str, pseudonym: str, attrs: dict) -> None:
        self._put("patients", "pseudonym", domain, pseudonym, attrs)

    def patient(self, domain: str, pseudonym: str) -> dict | None:
        return self._get("patients", "pseudonym", domain, pseudonym)

    def put_study(self, domain: str, pseudo_study_uid: str, attrs: dict) -> None:
        self._put("studies", "pseudo_study_uid", domain, pseudo_study_uid, attrs)

    def study(self, domain: str, pseudo_study_uid: str) -> dict | None:
        return self._get("studies", "pseudo_study_uid", domain, pseudo_study_uid)

    def _put(self, table: str, column: str, domain: str, key: str, attrs: dict) -> None:
        self.db.run(f"INSERT INTO {table} VALUES (?,?,?) ON CONFLICT (domain, {column}) DO UPDATE SET attrs=excluded.attrs",
                    (domain, key, json.dumps(attrs, sort_keys=True)))

    def _get(self, table: str, column: str, domain: str, key: str) -> dict | None:
        row = self.db.one(f"SELECT attrs FROM {table} WHERE domain=? AND {column}=?", (domain, key))
        return json.loads(row[0]) if row else None
