"""The site's audit trail: per business key, what was sent or received, when, by whom (which
certificate), in which pseudonym domain. Append-only SQLite at the site; never patient data —
callers pass pseudonymized UIDs, counts, organization identifiers and certificate subjects only."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

# the attributes an event may carry; anything else is refused so nothing identifying slips in
ALLOWED_DETAILS = {"study_uid", "pseudonymized_study_uid", "result_study_uid", "instances", "bytes", "target",
                   "source", "pseudonym_domain", "organization", "certificate", "outcome", "error", "attempt",
                   "item_id", "series_uids", "sent_now", "already_there"}


@dataclass(frozen=True)
class Event:
    time: str
    business_key: str
    action: str          # step-completed, step-failed, sent, received, returned, stored …
    actor: str           # who did it: the site's certificate subject or worker owner
    details: dict


class AuditTrail:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("""CREATE TABLE IF NOT EXISTS audit (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, business_key TEXT NOT NULL,
                action TEXT NOT NULL, actor TEXT NOT NULL, details TEXT NOT NULL)""")
            db.execute("CREATE INDEX IF NOT EXISTS audit_bk ON audit(business_key)")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def record(self, business_key: str, action: str, actor: str, **details) -> Event:
        unknown = sorted(set(details) - ALLOWED_DETAILS)
        if unknown:
            raise ValueError(f"audit: detail(s) {unknown} are not auditable fields")
        ev = Event(dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), business_key, action, actor,
                   {k: v for k, v in details.items() if v is not None})
        with self._db() as db:
            db.execute("INSERT INTO audit(time, business_key, action, actor, details) VALUES (?,?,?,?,?)",
                       (ev.time, business_key, action, actor, json.dumps(ev.details, sort_keys=True)))
        return ev

    def events(self, business_key: str | None = None) -> list[Event]:
        with self._db() as db:
            rows = db.execute("SELECT time, business_key, action, actor, details FROM audit"
                              + (" WHERE business_key=?" if business_key else "") + " ORDER BY seq",
                              (business_key,) if business_key else ()).fetchall()
        return [Event(t, bk, a, who, json.loads(d)) for t, bk, a, who, d in rows]


def certificate_subject(cert_file: str | Path) -> str:
    """The subject of a PEM certificate, as the audit names who acted."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(Path(cert_file).read_bytes()).subject.rfc4514_string()

