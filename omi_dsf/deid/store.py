"""What the site keeps to undo the pseudonymization: a SQLite file that never leaves the site.

Tables: embedded pseudonyms (domain, value <-> pseudonym), UIDs (domain, pseudonymized ->
original), and the patient and study attributes that de-identification removed, so that
returned results can carry them again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pseudonyms (
    domain TEXT NOT NULL, value TEXT NOT NULL, pseudonym TEXT NOT NULL,
    PRIMARY KEY (domain, value), UNIQUE (domain, pseudonym));
CREATE TABLE IF NOT EXISTS uids (
    domain TEXT NOT NULL, pseudo TEXT NOT NULL, original TEXT NOT NULL,
    PRIMARY KEY (domain, pseudo));
CREATE TABLE IF NOT EXISTS patients (
    domain TEXT NOT NULL, pseudonym TEXT NOT NULL, attrs TEXT NOT NULL,
    PRIMARY KEY (domain, pseudonym));
CREATE TABLE IF NOT EXISTS studies (
    domain TEXT NOT NULL, pseudo_study_uid TEXT NOT NULL, attrs TEXT NOT NULL,
    PRIMARY KEY (domain, pseudo_study_uid));
"""


class SiteStore:
    """Thread-safe; several workers may share the file (WAL, busy timeout)."""

    def __init__(self, path: str | Path = ":memory:"):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False,
                                   isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self._known_uids: set[tuple[str, str]] = set()

    def close(self) -> None:
        self._db.close()

    def sync(self) -> None:
        """Make everything written so far durable. Commits run with synchronous=NORMAL (no fsync
        per instance); one full checkpoint at the end of a study makes the map safe on disk
        before the step reports success."""
        if self.path != ":memory:":
            with self._lock:
                self._db.execute("PRAGMA wal_checkpoint(FULL)")

    # -- embedded pseudonyms -------------------------------------------------------------
    def put_pseudonym(self, domain: str, value: str, pseudonym: str) -> str:
        """Record the pair unless the value already has one; return the stored pseudonym."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO pseudonyms VALUES (?,?,?)", (domain, value, pseudonym))
            row = self._db.execute("SELECT pseudonym FROM pseudonyms WHERE domain=? AND value=?",
                                   (domain, value)).fetchone()
        return row[0]

    def value_for(self, domain: str, pseudonym: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM pseudonyms WHERE domain=? AND pseudonym=?",
                                   (domain, pseudonym)).fetchone()
        return row[0] if row else None

    # -- UIDs ----------------------------------------------------------------------------
    def put_uids(self, domain: str, pairs: dict[str, str]) -> None:
        """pairs: pseudonymized -> original. Written in one transaction before anything leaves."""
        new = [(domain, p, o) for p, o in pairs.items() if (domain, p) not in self._known_uids]
        if not new:
            return
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO uids VALUES (?,?,?)", new)
            self._db.execute("COMMIT")
        self._known_uids.update((d, p) for d, p, _ in new)

    def original_uid(self, domain: str, pseudo: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT original FROM uids WHERE domain=? AND pseudo=?",
                                   (domain, pseudo)).fetchone()
        return row[0] if row else None

    # -- removed attributes --------------------------------------------------------------
    def put_patient(self, domain: str, pseudonym: str, attrs: dict) -> None:
        self._put("patients", domain, pseudonym, attrs)

    def patient(self, domain: str, pseudonym: str) -> dict | None:
        return self._get("patients", "pseudonym", domain, pseudonym)

    def put_study(self, domain: str, pseudo_study_uid: str, attrs: dict) -> None:
        self._put("studies", domain, pseudo_study_uid, attrs)

    def study(self, domain: str, pseudo_study_uid: str) -> dict | None:
        return self._get("studies", "pseudo_study_uid", domain, pseudo_study_uid)

    def _put(self, table: str, domain: str, key: str, attrs: dict) -> None:
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO {table} VALUES (?,?,?)",
                             (domain, key, json.dumps(attrs, sort_keys=True)))

    def _get(self, table: str, column: str, domain: str, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute(f"SELECT attrs FROM {table} WHERE domain=? AND {column}=?",
                                   (domain, key)).fetchone()
        return json.loads(row[0]) if row else None
