"""Consent: MII Broad Consent evaluation for "use by an external AI service", gICS, the step.

The gICS server below is a STAND-IN written for these tests (gICS cannot run here): it answers
the TTP-FHIR gateway's $isConsented with FHIR Parameters, as documented by the gateway's IG.
MII Consent resources on a FHIR server are read from a real one: the DIC's FHIR store (HAPI FHIR
JPA, fixture fhir_store), loaded with the cases below.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from helpers_http import StandIn, serve

from omi_dsf.consent.gics import GicsChecker
from omi_dsf.consent.mii import evaluate, evaluate_all
from omi_dsf.consent.policy import DISPLAY, MDAT_SCIENTIFIC_USE, MII_POLICY_SYSTEM, codes_for
from omi_dsf.steps.consent import consent
from omi_dsf.config import ConfigError
from omi_dsf.steps.api import StepContext, StepError
from conftest import free_port

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
        consent({"patient-identifier": "PAT-1"}, step_ctx(None))
    with pytest.raises(ConfigError, match="consent.kind: required"):   # an incomplete block: refused at once
        step_ctx({})
    with pytest.raises(ConfigError, match="consent.path: required for kind folder"):
        step_ctx({"kind": "folder"})
    with pytest.raises(ConfigError, match="consent.purpose: unknown consent purpose"):
        step_ctx({"kind": "folder", "path": str(tmp_path), "purpose": "marketing"})
    with pytest.raises(StepError, match="patient-identifier is missing"):
        consent({}, step_ctx({"kind": "folder", "path": str(tmp_path)}))


# -- stand-in servers (helpers_http.serve) ---------------------------------------------------
class GicsStandIn(StandIn):
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


# -- the DIC's FHIR store: a real HAPI FHIR JPA server (session fixture fhir_store) -------------
MII_CATEGORY = {"system": "https://www.medizininformatik-initiative.de/fhir/modul-consent/CodeSystem/mii-cs-consent-consent_category",
                "code": "2.16.840.1.113883.3.1937.777.24.2.184"}
BROAD_CONSENT_POLICY = "urn:oid:2.16.840.1.113883.3.1937.777.24.2.1791"   # Patienteneinwilligung MII 1.6d
TODAY = dt.date.today()


def _years(n: int, start: dt.date = TODAY) -> str:
    return start.replace(year=start.year + n).isoformat()


def mii_consent(patient_ref: str, signed: dt.date, modules: dict[int, tuple[str, int]], *, status="active",
                root_years: int = 30) -> dict:
    """An MII Broad Consent as sites record it: root provision deny over the whole term, one nested
    provision per module (policy code) with its type and term in years (MII test data's shape)."""
    start = signed.isoformat()
    return {
        "resourceType": "Consent",
        "meta": {"profile": [PROFILE]},
        "status": status,
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}, {"coding": [MII_CATEGORY]}],
        "patient": {"reference": patient_ref},
        "dateTime": signed.isoformat(),
        "policy": [{"uri": BROAD_CONSENT_POLICY}],
        "provision": {
            "type": "deny",
            "period": {"start": start, "end": _years(root_years, signed)},
            "provision": [{"type": kind, "period": {"start": start, "end": _years(years, signed)},
                           "code": [{"coding": [{"system": MII_POLICY_SYSTEM, "code": f"{OID}{n}",
                                                 **({"display": DISPLAY[f"{OID}{n}"]} if f"{OID}{n}" in DISPLAY
                                                    else {})}]}]}
                          for n, (kind, years) in modules.items()],
        },
    }


ALL_MODULES = {6: ("permit", 5), 7: ("permit", 5), 8: ("permit", 30), 19: ("permit", 5), 20: ("permit", 30),
               22: ("permit", 30)}


PATIENT = "urn:uuid:patient"   # replaced by the patient entry's fullUrl when loaded


def load_patient(c, system: str, pid: str, consents: list[dict]) -> list[str]:
    """One transaction: the Patient (conditional create on its identifier) and its consents; the ids."""
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    entries = [{"fullUrl": patient_urn, "resource": {
        "resourceType": "Patient", "identifier": [{"system": system, "value": pid}], "gender": "unknown"},
        "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={system}|{pid}"}}]
    for cons in consents:
        entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {**cons, "patient": {"reference": patient_urn}},
                        "request": {"method": "POST", "url": "Consent"}})
    r = c.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
               headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 200, r.text
    return [e["response"]["location"].split("/_history")[0] for e in r.json()["entry"][1:]]


@pytest.fixture(scope="module")
def consent_store(fhir_store):
    """The cases, loaded once into the real FHIR store: {patient id: [Consent/<id>, ...]}."""
    system = f"https://dic.example.org/sid/patient-id/{uuid.uuid4()}"
    y = TODAY.year
    cases = {
        "PERMIT": [mii_consent(PATIENT, TODAY.replace(year=y - 1), ALL_MODULES)],
        "DENY": [mii_consent(PATIENT, TODAY.replace(year=y - 1),
                             {**ALL_MODULES, 8: ("deny", 30)})],
        "EXPIRED": [mii_consent(PATIENT, TODAY.replace(year=y - 31), ALL_MODULES)],
        "MODULE-EXPIRED": [mii_consent(PATIENT, TODAY.replace(year=y - 6), {**ALL_MODULES, 8: ("permit", 5)})],
        "WITHDRAWN": [mii_consent(PATIENT, TODAY.replace(year=y - 2), ALL_MODULES),
                      mii_consent(PATIENT, TODAY.replace(year=y - 1), {8: ("deny", 30)})],
        "REVOKED": [mii_consent(PATIENT, TODAY.replace(year=y - 2), ALL_MODULES, status="inactive")],
        "SOME-PURPOSES": [mii_consent(PATIENT, TODAY.replace(year=y - 1),
                                      {6: ("permit", 5), 7: ("permit", 5), 19: ("permit", 5)})],
        "SEVERAL": [mii_consent(PATIENT, TODAY.replace(year=y - 3), {6: ("permit", 5)}),
                    mii_consent(PATIENT, TODAY.replace(year=y - 2), {8: ("deny", 30)}, status="inactive"),
                    mii_consent(PATIENT, TODAY.replace(year=y - 1), ALL_MODULES)],
    }
    with fhir_store.client() as c:
        ids = {pid: load_patient(c, system, pid, consents) for pid, consents in cases.items()}
    return {"system": system, "url": fhir_store.state().base_url, "ids": ids}


def _decide(store, pid, **cfg):
    ctx = step_ctx({"kind": "fhir", "url": store["url"], "identifier_system": store["system"], **cfg})
    return consent({"patient-identifier": pid}, ctx)


@pytest.mark.integration
def test_mii_consent_permit_from_fhir_store(consent_store):
    out = _decide(consent_store, "PERMIT")
    assert out["consented"] is True and out["consent-reference"] == consent_store["ids"]["PERMIT"][0]
    assert "MDAT wissenschaftlich nutzen EU DSGVO NIVEAU" in out["consent-reason"]


@pytest.mark.integration
@pytest.mark.parametrize("pid, reason", [
    ("DENY", r"MDAT wissenschaftlich nutzen EU DSGVO NIVEAU \(\.8\) is denied by the consent"),
    ("EXPIRED", r"consent expired on "),
    ("MODULE-EXPIRED", r"permission for MDAT wissenschaftlich nutzen EU DSGVO NIVEAU \(\.8\) expired on "),
    ("WITHDRAWN", r"MDAT wissenschaftlich nutzen EU DSGVO NIVEAU \(\.8\) is denied by the consent"),
    ("REVOKED", r"no active consent on record"),
    ("SOME-PURPOSES", r"consent does not permit MDAT wissenschaftlich nutzen EU DSGVO NIVEAU"),
    ("NOBODY", r"no consent on record for this patient"),
])
def test_mii_consent_denials_from_fhir_store(consent_store, pid, reason):
    with pytest.raises(StepError, match="consent denied: " + reason):
        _decide(consent_store, pid)


@pytest.mark.integration
def test_mii_consent_some_purposes_and_several_consents(consent_store):
    # the same consent permits a purpose that needs only what it grants (.7: MDAT speichern, verarbeiten)
    assert _decide(consent_store, "SOME-PURPOSES", codes=[OID + "7"])["consented"] is True
    # several consents of one patient: the most recent active one decides, whatever the order
    out = _decide(consent_store, "SEVERAL")
    assert out["consent-reference"] == consent_store["ids"]["SEVERAL"][2]
    # the non-EU purpose needs .49, which no consent grants
    with pytest.raises(StepError, match=r"does not permit MDAT wissenschaftlich nutzen ohne EU DSGVO"):
        _decide(consent_store, "PERMIT", purpose="external-ai-service-non-eu")


@pytest.mark.integration
def test_consent_search_follows_the_store_paging(consent_store):
    from omi_dsf.consent.sources import from_fhir_server

    found = from_fhir_server(consent_store["url"], consent_store["system"], "SEVERAL", page_size=1)
    assert sorted(f"Consent/{c['id']}" for c in found) == sorted(consent_store["ids"]["SEVERAL"])
    assert from_fhir_server(consent_store["url"], consent_store["system"], "PERMIT", page_size=1)[0]["status"] == "active"
    # another system: none of these patients
    assert from_fhir_server(consent_store["url"], "https://other.example.org/sid", "PERMIT") == []


def test_consent_server_unreachable_is_a_deny():
    cfg = {"kind": "fhir", "url": f"http://127.0.0.1:{free_port()}/fhir", "identifier_system": "https://example.org/sid"}
    with pytest.raises(StepError, match="consent server unreachable"):
        consent({"patient-identifier": "PAT-1"}, step_ctx(cfg))
