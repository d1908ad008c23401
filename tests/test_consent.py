"""Consent: MII Broad Consent evaluation for "use by an external AI service", gICS, the step.

The gICS server below is a STAND-IN written for these tests (gICS cannot run here): it answers
the TTP-FHIR gateway's $isConsented with FHIR Parameters, as documented by the gateway's IG.
"""

from __future__ import annotations

import datetime as dt
import json
from http.server import BaseHTTPRequestHandler

import pytest
from helpers_http import serve

from omi_dsf.consent.gics import GicsChecker
from omi_dsf.consent.mii import evaluate, evaluate_all
from omi_dsf.consent.policy import MDAT_SCIENTIFIC_USE, MII_POLICY_SYSTEM, codes_for
from omi_dsf.steps.consent import consent
from omi_dsf.steps.api import StepContext, StepError

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
OID = "2.16.840.1.113883.3.1937.777.24.5.3."
PROFILE = "https://www.medizininformatik-initiative.de/fhir/modul-consent/StructureDefinition/mii-pr-consent-einwilligung"


def code(n: int) -> dict:
    return {"coding": [{"system": MII_POLICY_SYSTEM, "code": f"{OID}{n}"}]}


def broad_consent(**changes) -> dict:
    """Shaped like the MII example: root deny, nested permits per module with their own periods."""
    c = {
        "resourceType": "Consent",
        "meta": {"profile": [PROFILE]},
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
        "patient": {"reference": "Patient/p1"},
        "dateTime": "2024-09-01",
        "policy": [{"uri": "urn:oid:2.16.840.1.113883.3.1937.777.24.2.1791"}],
        "provision": {
            "type": "deny",
            "period": {"start": "2024-09-01", "end": "2054-08-31"},
            "provision": [
                {"type": "permit", "period": {"start": "2024-09-01", "end": "2029-08-31"},
                 "code": [code(6), code(7)]},
                {"type": "permit", "period": {"start": "2024-09-01", "end": "2054-08-31"},
                 "code": [code(8)]},
            ],
        },
    }
    c.update(changes)
    return c


NEEDED = codes_for("external-ai-service")


def test_purpose_needs_scientific_use_code():
    assert NEEDED == (MDAT_SCIENTIFIC_USE,) == (OID + "8",)
    with pytest.raises(ValueError, match="unknown consent purpose"):
        codes_for("marketing")


def test_broad_consent_permits():
    d = evaluate(broad_consent(), NEEDED, NOW)
    assert d.permitted and "MDAT wissenschaftlich nutzen" in d.reason


def test_expired_consent_is_denied():
    d = evaluate(broad_consent(), NEEDED, dt.datetime(2055, 1, 1, tzinfo=dt.timezone.utc))
    assert not d.permitted and d.reason == "consent expired on 2054-08-31"


def test_not_yet_valid_and_future_dated():
    d = evaluate(broad_consent(), NEEDED, dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc))
    assert not d.permitted and "dated 2024-09-01" in d.reason


def test_nested_permit_period_expired_while_root_valid():
    c = broad_consent()
    c["provision"]["provision"][1]["period"]["end"] = "2026-01-31"
    d = evaluate(c, NEEDED, NOW)
    assert not d.permitted and "expired on 2026-01-31" in d.reason


def test_code_not_permitted_falls_back_to_root_deny():
    c = broad_consent()
    c["provision"]["provision"].pop()  # patient refused the scientific-use module
    d = evaluate(c, NEEDED, NOW)
    assert not d.permitted and d.reason.startswith("consent does not permit MDAT wissenschaftlich nutzen")


def test_deeper_deny_overrides_permit():
    c = broad_consent()
    c["provision"]["provision"][1]["provision"] = [
        {"type": "deny", "period": {"start": "2025-01-01", "end": "2054-08-31"}, "code": [code(8)]}]
    d = evaluate(c, NEEDED, NOW)
    assert not d.permitted and "is denied" in d.reason
    # before the withdrawal date the permit still held
    assert evaluate(c, NEEDED, dt.datetime(2024, 12, 1, tzinfo=dt.timezone.utc)).permitted


@pytest.mark.parametrize("status", ["inactive", "rejected", "draft", "entered-in-error"])
def test_not_active_is_denied(status):
    d = evaluate(broad_consent(status=status), NEEDED, NOW)
    assert not d.permitted and status in d.reason


def test_scope_must_be_research():
    treatment = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "treatment"}]}
    d = evaluate(broad_consent(scope=treatment), NEEDED, NOW)
    assert not d.permitted and "not research" in d.reason


def test_other_profile_and_invalid_resource():
    d = evaluate(broad_consent(meta={"profile": ["http://example.org/other"]}), NEEDED, NOW)
    assert not d.permitted and "MII Consent profile" in d.reason
    d = evaluate({"resourceType": "Consent", "status": "active", "provision": "nonsense"}, NEEDED, NOW)
    assert not d.permitted and "not a valid FHIR R4 Consent" in d.reason


def test_several_consents_latest_active_decides():
    old = broad_consent(dateTime="2024-09-01")
    withdrawn = broad_consent(dateTime="2025-06-01")
    withdrawn["provision"]["provision"] = []  # a later consent without the module
    assert not evaluate_all([old, withdrawn], NEEDED, NOW).permitted
    assert evaluate_all([old, broad_consent(dateTime="2023-01-01", status="inactive")], NEEDED, NOW).permitted
    assert evaluate_all([], NEEDED, NOW).reason == "no consent on record for this patient"
    assert "no active consent" in evaluate_all([broad_consent(status="inactive")], NEEDED, NOW).reason


# -- the step with consents from a folder --------------------------------------------------------
def step_ctx(cfg):
    return StepContext(topic="consent", business_key="bk", site={"consent": cfg})


def test_consent_step_from_folder(tmp_path):
    (tmp_path / "PAT-1.json").write_text(json.dumps(
        {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": broad_consent(id="bc-1")}]}))
    out = consent({"patient-identifier": "PAT-1"}, step_ctx({"kind": "folder", "path": str(tmp_path)}))
    assert out["consented"] is True and out["consent-reference"] == "Consent/bc-1"
    # as the worker runtime calls it: only the work item's output items are answered
    ctx = StepContext(topic="consent", business_key="bk", site={"consent": {"kind": "folder", "path": str(tmp_path)}},
                      outputs=("consent-reference",))
    assert consent({"patient-identifier": "PAT-1"}, ctx) == {"consent-reference": "Consent/bc-1"}
    with pytest.raises(StepError, match="no consent on record"):
        consent({"patient-identifier": "PAT-2"}, step_ctx({"kind": "folder", "path": str(tmp_path)}))
    (tmp_path / "PAT-3.json").write_text("{broken")
    with pytest.raises(StepError, match="consent check failed: consent file unreadable"):
        consent({"patient-identifier": "PAT-3"}, step_ctx({"kind": "folder", "path": str(tmp_path)}))
    with pytest.raises(StepError, match="not allowed in a file name"):
        consent({"patient-identifier": "../PAT-1"}, step_ctx({"kind": "folder", "path": str(tmp_path)}))
    with pytest.raises(StepError, match="not configured"):
        consent({"patient-identifier": "PAT-1"}, step_ctx({}))
    with pytest.raises(StepError, match="patient-identifier is missing"):
        consent({}, step_ctx({"kind": "folder", "path": str(tmp_path)}))


# -- stand-in servers (helpers_http.serve) ---------------------------------------------------
class GicsStandIn(BaseHTTPRequestHandler):
    """Stand-in for the TTP-FHIR gateway's gICS $isConsented (not gICS itself)."""

    consented: dict = {}     # (patient, policy code) -> bool
    mode = "ok"
    seen: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(body)
        if not self.path.endswith("/ttp-fhir/fhir/gics/$isConsented"):
            return self._send(404, {})
        if self.mode == "error":
            return self._send(500, {"resourceType": "OperationOutcome", "issue": [{"code": "exception"}]})
        if self.mode == "garbage":
            return self._send(200, {"resourceType": "Parameters", "parameter": [{"name": "x"}]})
        p = {x["name"]: x for x in body["parameter"]}
        key = (p["personIdentifier"]["valueIdentifier"]["value"], p["policy"]["valueCoding"]["code"])
        return self._send(200, {"resourceType": "Parameters",
                                "parameter": [{"name": "consented", "valueBoolean": self.consented.get(key, False)}]})

    def _send(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_gics_is_consented_against_stand_in():
    GicsStandIn.consented = {("PAT-1", OID + "8"): True}
    GicsStandIn.mode, GicsStandIn.seen = "ok", []
    with serve(GicsStandIn) as base:
        cfg = {"kind": "gics", "url": f"{base}/ttp-fhir/fhir/gics", "domain": "MII",
               "identifier_system": "https://example.org/sid/patient-id"}
        out = consent({"patient-identifier": "PAT-1"}, step_ctx(cfg))
        assert out["consented"] is True and out["consent-reference"].startswith("gICS $isConsented domain=MII")
        sent = {x["name"]: x for x in GicsStandIn.seen[0]["parameter"]}
        assert sent["domain"]["valueString"] == "MII"
        assert sent["policy"]["valueCoding"] == {"system": MII_POLICY_SYSTEM, "code": OID + "8"}
        config = {x["name"]: x for x in sent["config"]["resource"]["parameter"]}
        assert config["unknownStateIsConsideredAsDecline"]["valueBoolean"] is True
        with pytest.raises(StepError, match=r"gICS: no consent for MDAT wissenschaftlich nutzen"):
            consent({"patient-identifier": "PAT-2"}, step_ctx(cfg))
        GicsStandIn.mode = "error"
        with pytest.raises(StepError, match="consent check failed: gICS answered HTTP 500"):
            consent({"patient-identifier": "PAT-1"}, step_ctx(cfg))
        GicsStandIn.mode = "garbage"
        with pytest.raises(StepError, match="no 'consented' boolean"):
            consent({"patient-identifier": "PAT-1"}, step_ctx(cfg))
    d = GicsChecker(f"{base}/ttp-fhir/fhir/gics", "MII", "sys", timeout=2).check("PAT-1", NEEDED)
    assert not d.permitted and "gICS unreachable" in d.reason


class ConsentServerStandIn(BaseHTTPRequestHandler):
    """A minimal FHIR server answering Consent searches, with paging (stand-in for the DIC's FHIR store)."""

    pages: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        page = 1 if "page=2" in self.path else 0
        if page == 0 and "patient.identifier=" not in self.path.replace("%7C", "|"):
            return self._send(400, {})
        bundle = {"resourceType": "Bundle", "type": "searchset",
                  "entry": [{"resource": r} for r in self.pages[page]]}
        if page == 0 and len(self.pages) > 1:
            port = self.server.server_address[1]
            bundle["link"] = [{"relation": "next", "url": f"http://127.0.0.1:{port}/fhir/Consent?page=2"}]
        self._send(200, bundle)

    _send = GicsStandIn._send


def test_consent_from_fhir_server_with_paging():
    withdrawn = broad_consent(dateTime="2025-06-01")
    withdrawn["provision"]["provision"] = []
    ConsentServerStandIn.pages = [[broad_consent()], [withdrawn]]
    with serve(ConsentServerStandIn) as base:
        cfg = {"kind": "fhir", "url": f"{base}/fhir", "identifier_system": "https://example.org/sid"}
        with pytest.raises(StepError, match="consent does not permit"):
            consent({"patient-identifier": "PAT-1"}, step_ctx(cfg))  # the later page decides
        ConsentServerStandIn.pages = [[broad_consent()]]
        assert consent({"patient-identifier": "PAT-1"}, step_ctx(cfg))["consented"] is True
    with pytest.raises(StepError, match="consent server unreachable"):
        consent({"patient-identifier": "PAT-1"}, step_ctx(cfg))
