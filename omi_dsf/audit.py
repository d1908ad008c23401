"""The site's audit trail: per business key, what was sent or received, when, by whom (which
certificate), in which pseudonym domain. Append-only, in the site's database (omi_dsf/database.py:
SQLite, or PostgreSQL shared by workers on several hosts); never patient data — callers pass
pseudonymized UIDs, counts, organization identifiers and certificate subjects only."""

from __future__ import annotations

import datetime as dt
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from omi_dsf.database import Database

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


SCHEMA = [
    """CREATE TABLE IF NOT EXISTS audit (
        seq AUTOINCREMENT_KEY, time TEXT NOT NULL, business_key TEXT NOT NULL,
        action TEXT NOT NULL, actor TEXT NOT NULL, details TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS audit_bk ON audit(business_key)",
]


class AuditTrail:
    """`url`: a SQLite path or `sqlite:///…`, or `postgresql://…`."""

    def __init__(self, url: str | Path):
        self.db = Database(url, SCHEMA)

    def record(self, business_key: str, action: str, actor: str, **details) -> Event:
        unknown = sorted(set(details) - ALLOWED_DETAILS)
        if unknown:
            raise ValueError(f"audit: detail(s) {unknown} are not auditable fields")
        ev = Event(dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), business_key, action, actor,
                   {k: v for k, v in details.items() if v is not None})
        self.db.run("INSERT INTO audit(time, business_key, action, actor, details) VALUES (?,?,?,?,?)",
                    (ev.time, business_key, action, actor, json.dumps(ev.details, sort_keys=True)))
        return ev

    def events(self, business_key: str | None = None) -> list[Event]:
        rows = self.db.all("SELECT time, business_key, action, actor, details FROM audit"
                           + (" WHERE business_key=?" if business_key else "") + " ORDER BY seq",
                           (business_key,) if business_key else ())
        return [Event(t, bk, a, who, json.loads(d)) for t, bk, a, who, d in rows]

    def close(self) -> None:
        self.db.close()


@functools.lru_cache(maxsize=16)
def trail(url: str) -> AuditTrail:
    """The trail at `url`, opened once per process (steps record several events per work item)."""
    return AuditTrail(url)


def certificate_subject(cert_file: str | Path) -> str:
    """The subject of a PEM certificate, as the audit names who acted."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(Path(cert_file).read_bytes()).subject.rfc4514_string()

