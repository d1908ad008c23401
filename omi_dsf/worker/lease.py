"""Leases on work items, so that several worker processes of a site never run the same item at once.

The DSF lets a QuestionnaireResponse change only from in-progress to completed, so a claim cannot
live on the resource itself: it lives here, in the site's database (omi_dsf/database.py: SQLite on
one machine, PostgreSQL for workers on several). A lease that is not renewed expires, and another
worker takes the item.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from omi_dsf.database import Database

SCHEMA = ["""CREATE TABLE IF NOT EXISTS leases (
    item_id TEXT PRIMARY KEY, owner TEXT, expires DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, done INTEGER NOT NULL DEFAULT 0)"""]


class LeaseStore(Protocol):
    def claim(self, item_id: str, owner: str, ttl: float) -> int | None: ...
    def renew(self, item_id: str, owner: str, ttl: float) -> bool: ...
    def release(self, item_id: str, owner: str) -> None: ...
    def finish(self, item_id: str, owner: str) -> None: ...
    def is_done(self, item_id: str) -> bool: ...


class Leases:
    """claim() returns the attempt number (1, 2, …) when the caller now holds the lease, else None."""

    def __init__(self, url: str | Path):
        self.db = Database(url, SCHEMA)

    def claim(self, item_id: str, owner: str, ttl: float) -> int | None:
        now = time.time()
        # one statement, atomic on both engines: insert, or take over a free, expired or own lease;
        # nothing when another owner holds it or the item is done
        row = self.db.one(
            """INSERT INTO leases(item_id, owner, expires, attempts) VALUES (?, ?, ?, 1)
               ON CONFLICT (item_id) DO UPDATE SET owner=excluded.owner, expires=excluded.expires,
                   attempts=leases.attempts + 1
               WHERE leases.done = 0 AND (leases.owner IS NULL OR leases.owner = excluded.owner
                   OR leases.expires < ?)
               RETURNING attempts""", (item_id, owner, now + ttl, now))
        return row[0] if row else None

    def renew(self, item_id: str, owner: str, ttl: float) -> bool:
        return self.db.run("UPDATE leases SET expires=? WHERE item_id=? AND owner=? AND done=0",
                           (time.time() + ttl, item_id, owner)) == 1

    def release(self, item_id: str, owner: str) -> None:
        self.db.run("UPDATE leases SET owner=NULL, expires=0 WHERE item_id=? AND owner=? AND done=0", (item_id, owner))

    def finish(self, item_id: str, owner: str) -> None:
        self.db.run("UPDATE leases SET done=1, expires=0 WHERE item_id=?", (item_id,))

    def is_done(self, item_id: str) -> bool:
        row = self.db.one("SELECT done FROM leases WHERE item_id=?", (item_id,))
        return bool(row and row[0])

    def close(self) -> None:
        self.db.close()


def open_lease_store(url: str | Path) -> LeaseStore:
    """`sqlite:///path/to/leases.db` (or a plain path) or `postgresql://…`."""
    return Leases(url)
