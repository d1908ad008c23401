"""The site audit trail: events per business key, no free-form (possibly identifying) fields (on SQLite
and PostgreSQL: the `site_db` fixture)."""

from __future__ import annotations

import json

import pytest

from helpers_cli import run_cli
from omi_dsf.audit import AuditTrail, certificate_subject


def test_events_are_kept_per_business_key_in_order(site_db):
    trail = AuditTrail(site_db)
    trail.record("bk-1", "sent", "CN=dic", pseudonymized_study_uid="2.25.1", instances=3, target="https://ai/dicomweb")
    trail.record("bk-2", "step-completed", "CN=dic", outcome="consent")
    trail.record("bk-1", "step-completed", "CN=dic", outcome="send")
    assert [e.action for e in trail.events("bk-1")] == ["sent", "step-completed"]
    assert trail.events("bk-1")[0].details == {"pseudonymized_study_uid": "2.25.1", "instances": 3, "target": "https://ai/dicomweb"}
    assert len(trail.events()) == 3


def test_unknown_details_are_refused(site_db):
    trail = AuditTrail(site_db)
    with pytest.raises(ValueError, match=r"\['patient_name'\] are not auditable"):
        trail.record("bk", "sent", "CN=dic", patient_name="Mustermann^Max")
    assert trail.events() == []


def test_audit_cli_lists_events(tmp_path):
    (tmp_path / "site.yaml").write_text("audit: trail.sqlite\n")
    AuditTrail(tmp_path / "trail.sqlite").record("bk-9", "received", "CN=ai", instances=2)
    p = run_cli("audit", "--site", str(tmp_path / "site.yaml"), "bk-9", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)[0]["details"] == {"instances": 2}


def test_certificate_subject(tmp_path):
    from helpers_pki import CLIENT, issue, make_ca, write_pem

    cert, _ = write_pem(tmp_path, "dic", *issue(*make_ca("audit test CA"), "dic.omi.test client", CLIENT))
    assert "CN=dic.omi.test client" in certificate_subject(cert)
