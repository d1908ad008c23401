"""gICS consent check through the THS TTP-FHIR gateway: $isConsented, one call per policy code.

Unknown consent state counts as decline (config unknownStateIsConsideredAsDecline=true); any
failure to get a clear `consented: true` is a deny with the reason.
"""

from __future__ import annotations

import datetime as dt
from typing import Iterable

import httpx

from omi_dsf.peer import Peer

from .mii import Decision
from .policy import MII_POLICY_SYSTEM, label

FHIR_JSON = "application/fhir+json"
GICS_ID_MATCHING = "https://ths-greifswald.de/fhir/CodeSystem/gics/IdMatchingType"


class GicsChecker:
    """`base_url`: the gateway's gICS base, e.g. https://ttp.example/ttp-fhir/fhir/gics."""

    def __init__(self, base_url: str, domain: str, identifier_system: str,
                 policy_system: str = MII_POLICY_SYSTEM, timeout: float = 10.0,
                 verify: bool | str = True, cert: tuple[str, str] | None = None,
                 client: httpx.Client | None = None):
        self._url = base_url.rstrip("/") + "/$isConsented"
        self.domain = domain
        self.identifier_system = identifier_system
        self.policy_system = policy_system
        self._http = client or Peer(base_url, ca_file=verify if isinstance(verify, str) else None,
                                    client_cert=cert[0] if cert else None, client_key=cert[1] if cert else None,
                                    timeout=timeout, where="gICS").client(base_url=False)

    def check(self, patient_id: str, codes: Iterable[str], at: dt.date | None = None) -> Decision:
        codes = tuple(codes)
        day = (at or dt.date.today()).isoformat()
        for code in codes:
            body = self._request(patient_id, code, day)
            try:
                resp = self._http.post(self._url, json=body,
                                       headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON})
            except httpx.HTTPError as exc:
                return Decision(False, f"consent check failed: gICS unreachable ({type(exc).__name__})", codes)
            if resp.status_code != 200:
                return Decision(False, f"consent check failed: gICS answered HTTP {resp.status_code}", codes)
            consented = _consented(resp)
            if consented is None:
                return Decision(False, "consent check failed: gICS reply has no 'consented' boolean", codes)
            if not consented:
                return Decision(False, f"gICS: no consent for {label(code)} in domain {self.domain!r}", codes)
        return Decision(True, "permitted by gICS: " + ", ".join(label(c) for c in codes), codes,
                        f"gICS $isConsented domain={self.domain} policy={','.join(codes)}")

    def _request(self, patient_id: str, code: str, day: str) -> dict:
        return {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "personIdentifier",
                 "valueIdentifier": {"system": self.identifier_system, "value": patient_id}},
                {"name": "domain", "valueString": self.domain},
                {"name": "policy", "valueCoding": {"system": self.policy_system, "code": code}},
                {"name": "config", "resource": {"resourceType": "Parameters", "parameter": [
                    {"name": "idMatchingType",
                     "valueCoding": {"system": GICS_ID_MATCHING, "code": "AT_LEAST_ONE"}},
                    {"name": "ignoreVersionNumber", "valueBoolean": True},
                    {"name": "unknownStateIsConsideredAsDecline", "valueBoolean": True},
                    {"name": "requestDate", "valueDate": day},
                ]}},
            ],
        }


def _consented(resp: httpx.Response) -> bool | None:
    try:
        data = resp.json()
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("resourceType") != "Parameters":
        return None
    for p in data.get("parameter") or ():
        if isinstance(p, dict) and p.get("name") == "consented" and isinstance(p.get("valueBoolean"), bool):
            return p["valueBoolean"]
    return None
