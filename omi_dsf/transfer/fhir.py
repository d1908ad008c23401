"""Where the requester keeps the FHIR result: a folder (default) or a FHIR server.

Site settings, `steps.fhir_results` in the site YAML (FhirResultsSettings, omi_dsf.transfer.config):
a folder path, or {url: FHIR base, with the peer keys ca_file, client_cert, client_key, token_file, timeout}.
Folder: <folder>/<business key>.json (the collection Bundle), written whole and renamed.
Server: the Bundle as a transaction with PUT and ids derived from the result, so that a retried
step updates the same resources instead of creating new ones.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from omi_dsf.errors import RetryableError
from omi_dsf.peer import PeerConfigError, PeerTlsError, PeerUnreachable
from omi_dsf.transfer.config import FhirResultsSettings
from omi_dsf.transfer.errors import TransferError


class FhirUnavailable(ConnectionError, RetryableError):
    """The FHIR server did not answer or answered 5xx: retried."""


def _as_transaction(bundle: dict) -> dict:
    entries = []
    for entry in bundle.get("entry", []):
        res = dict(entry["resource"])
        rid = entry["fullUrl"].rsplit(":", 1)[-1]       # urn:uuid:<deterministic uuid>
        res["id"] = rid
        entries.append({"fullUrl": entry["fullUrl"], "resource": res,
                        "request": {"method": "PUT", "url": f"{res['resourceType']}/{rid}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def write_fhir_result(target: FhirResultsSettings | None, bundle: dict, business_key: str) -> str:
    """Store the bundle where the site says; returns where (for the audit: a folder or a base URL)."""
    if target is None:
        raise TransferError("site configuration steps.fhir_results is missing (a folder or {url: FHIR base})")
    if target.url:
        return _to_server(target, bundle)
    return _to_folder(Path(target.folder), bundle, business_key)


def _to_folder(folder: Path, bundle: dict, business_key: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", business_key) or "result"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(bundle, fh, indent=1)
        os.replace(tmp, folder / f"{name}.json")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(folder)


def _to_server(cfg: FhirResultsSettings, bundle: dict) -> str:
    try:
        peer = cfg.peer(cfg.url, "steps.fhir_results", timeout=60)
        http = peer.client(base_url=False)
    except PeerConfigError as exc:
        raise TransferError(str(exc)) from None
    base = peer.url
    try:
        with peer.errors("the FHIR result server"):
            resp = http.post(base, content=json.dumps(_as_transaction(bundle)),
                             headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})
    except PeerTlsError:
        raise TransferError("TLS with the FHIR result server failed (check steps.fhir_results ca_file)") from None
    except PeerUnreachable as exc:
        raise FhirUnavailable(f"the FHIR result server does not answer ({str(exc).rsplit(': ', 1)[-1]})") from None
    finally:
        http.close()
    if resp.status_code >= 500 or resp.status_code == 429:
        raise FhirUnavailable(f"the FHIR result server answered HTTP {resp.status_code}")
    if resp.status_code >= 400:
        raise TransferError(f"the FHIR result server refused the result bundle (HTTP {resp.status_code})")
    return base
