"""Where a patient's Consent resources come from: a FHIR server or a folder of JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from omi_dsf.peer import http_client, json_answer


class ConsentLookupError(Exception):
    """The consents could not be read; the caller denies with this reason."""


MAX_CONSENTS = 500      # one patient's consents; more is a misconfigured search, not a record


def from_fhir_server(base_url: str, identifier_system: str, patient_id: str,
                     client: httpx.Client | None = None, timeout: float = 10.0,
                     page_size: int = 50) -> list[dict]:
    """Consent?patient.identifier=system|value on the DIC's FHIR store, following the Bundle's next
    links (on the same server only), at most MAX_CONSENTS."""
    if client is None:
        with http_client(timeout=timeout) as http:
            return from_fhir_server(base_url, identifier_system, patient_id, http, timeout, page_size)
    http = client
    url: str | None = base_url.rstrip("/") + "/Consent"
    origin = httpx.URL(url)
    params: dict | None = {"patient.identifier": f"{identifier_system}|{patient_id}", "_count": str(page_size)}
    out: list[dict] = []
    while url:
        nxt = httpx.URL(url)
        if (nxt.scheme, nxt.host, nxt.port) != (origin.scheme, origin.host, origin.port):
            raise ConsentLookupError("consent server's next page is on another server")
        if len(out) > MAX_CONSENTS:
            raise ConsentLookupError(f"consent server returned more than {MAX_CONSENTS} consents for one patient")
        try:
            # no-cache: a consent withdrawn a moment ago counts (HAPI caches searches for a minute)
            resp = http.get(url, params=params, headers={"Accept": "application/fhir+json", "Cache-Control": "no-cache"})
        except httpx.HTTPError as exc:
            raise ConsentLookupError(f"consent server unreachable ({type(exc).__name__})") from None
        if resp.status_code != 200:
            raise ConsentLookupError(f"consent server answered HTTP {resp.status_code}")
        bundle = json_answer(resp, "consent server", ConsentLookupError, "Bundle")
        out.extend(_consents_in(bundle))
        url = next((link.get("url") for link in bundle.get("link") or () if link.get("relation") == "next"), None)
        params = None
    return out


def from_folder(folder: str | Path, patient_id: str) -> list[dict]:
    """<folder>/<patient id>.json holding a Consent or a Bundle of them; missing file: none."""
    safe = "".join(ch for ch in patient_id if ch.isalnum() or ch in "-_.")
    if not safe or safe != patient_id:
        raise ConsentLookupError("patient identifier has characters not allowed in a file name")
    path = Path(folder) / f"{safe}.json"
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConsentLookupError(f"consent file unreadable ({type(exc).__name__})") from None
    return _consents_in(data)


def _consents_in(data) -> list[dict]:
    if not isinstance(data, dict):
        raise ConsentLookupError("consent data is not a FHIR resource")
    if data.get("resourceType") == "Consent":
        return [data]
    if data.get("resourceType") == "Bundle":
        return [e["resource"] for e in data.get("entry") or ()
                if isinstance(e, dict) and (e.get("resource") or {}).get("resourceType") == "Consent"]
    raise ConsentLookupError(f"expected Consent or Bundle, got {data.get('resourceType')!r}")
