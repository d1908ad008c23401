"""The THS TTP-FHIR gateway for gPAS: $pseudonymizeAllowCreate and $dePseudonymize (FHIR Parameters)."""

from __future__ import annotations

import httpx

from omi_dsf.peer import Peer, json_answer

from .base import PseudonymError, UnknownPseudonymError

FHIR_JSON = "application/fhir+json"


class TtpFhirProvider:
    """`base_url` is the gateway's gPAS base, e.g. https://ttp.example/ttp-fhir/fhir/gpas."""

    def __init__(self, base_url: str, timeout: float = 10.0, verify: bool | str = True,
                 cert: tuple[str, str] | None = None, client: httpx.Client | None = None):
        self._base = base_url.rstrip("/")
        self._http = client or Peer(base_url, ca_file=verify if isinstance(verify, str) else None,
                                    client_cert=cert[0] if cert else None, client_key=cert[1] if cert else None,
                                    timeout=timeout, where="TTP-FHIR").client(base_url=False)

    def pseudonymize(self, domain: str, value: str) -> str:
        body = _parameters(("target", domain), ("original", value))
        reply = self._post("$pseudonymizeAllowCreate", body, domain)
        return _part_value(reply, "pseudonym", "pseudonym", "$pseudonymizeAllowCreate")

    def depseudonymize(self, domain: str, pseudonym: str) -> str:
        body = _parameters(("target", domain), ("pseudonym", pseudonym))
        reply = self._post("$dePseudonymize", body, domain)
        return _part_value(reply, "original", "original", "$dePseudonymize")

    def _post(self, operation: str, body: dict, domain: str) -> dict:
        url = f"{self._base}/{operation}"
        try:
            resp = self._http.post(url, json=body, headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON})
        except httpx.HTTPError as exc:
            raise PseudonymError(f"TTP-FHIR {operation} unreachable: {type(exc).__name__}") from None
        if resp.status_code in (404, 422):
            raise UnknownPseudonymError(
                f"TTP-FHIR {operation} in domain {domain!r}: HTTP {resp.status_code} {_issue_code(resp)}")
        if resp.status_code != 200:
            raise PseudonymError(f"TTP-FHIR {operation}: HTTP {resp.status_code} {_issue_code(resp)}")
        return json_answer(resp, f"TTP-FHIR {operation}", PseudonymError, "Parameters")


def _parameters(*pairs: tuple[str, str]) -> dict:
    return {"resourceType": "Parameters",
            "parameter": [{"name": n, "valueString": v} for n, v in pairs]}


def _part_value(reply: dict, param: str, part: str, operation: str) -> str:
    """The value of `part` inside the first `param` (the gateway answers with Identifier parts)."""
    for p in reply.get("parameter") or ():
        if p.get("name") != param:
            continue
        for sub in p.get("part") or ():
            if sub.get("name") == part:
                ident = sub.get("valueIdentifier") or {}
                value = ident.get("value") or sub.get("valueString")
                if value:
                    return str(value)
    raise PseudonymError(f"TTP-FHIR {operation}: reply has no {param}.{part}")


def _issue_code(resp: httpx.Response) -> str:
    # OperationOutcome issue codes only; diagnostics may echo the value and stay out of messages
    try:
        issues = resp.json().get("issue") or []
        return ",".join(str(i.get("code", "")) for i in issues if isinstance(i, dict))
    except (ValueError, AttributeError):
        return ""
