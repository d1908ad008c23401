"""Where the registry keeps things: its entries in a FHIR R4 server (HAPI FHIR JPA, `python -m omi_dsf
fhir-store`, or any server that takes SearchParameter resources), the health of the services in memory.

The FHIR server does the FHIR: storage, versions, search, paging, `_include`, transactions (a
registration is stored entirely or not at all). Every entry carries the tag `TAG` and every search
asks for it, so the registry can share a FHIR server with other data (a DIC's ImagingStudies and
Endpoints) and sees its own entries only. The registry's search parameters that FHIR R4 does not
define are SearchParameter resources (`SEARCH_PARAMETERS`), put into the server at start.

Health (the registry's own checks and the providers' heartbeats) changes every round and is the
registry's to say, not the provider's: it stays in this process (`ServiceState`, the last
`KEEP_CHECKS` checks per service) and is added to a HealthcareService when it is read. After a
restart every service is `unknown` until the first round, which starts at once.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, replace
from urllib.parse import urlencode

import httpx

from omi_dsf.peer import Peer
from omi_dsf.registry import definitions as d
from omi_dsf.registry.errors import FhirError

log = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json"
KEEP_CHECKS = 50  # per service: enough for the page's recent history
TAG = {"system": f"{d.BASE}/CodeSystem/omi-registry", "code": "entry"}
TAG_PARAM = ("_tag", f"{TAG['system']}|{TAG['code']}")
FORM = {"Content-Type": "application/x-www-form-urlencoded", "Cache-Control": "no-cache"}
PAGE = 200   # the most a FHIR store gives per page (HAPI's default maximum)


def _property(code: str) -> str:
    return (f"property.where(type.coding.where(system='{d.CS_DEVICE_PROPERTY}' and code='{code}').exists())"
            ".valueCode")


def _search_parameter(code: str, base: list[str], ptype: str, expression: str, description: str,
                      target: list[str] | None = None) -> dict:
    sp = {"resourceType": "SearchParameter", "id": f"omi-registry-{code.removeprefix('omi-')}",
          "url": f"{d.BASE}/SearchParameter/omi-registry-{code.removeprefix('omi-')}",
          "name": code.replace("-", "_"), "status": "active", "description": description, "code": code,
          "base": base, "type": ptype, "expression": expression}
    if target:
        sp["target"] = target
    return sp


# The registry's search parameters that FHIR R4 does not have (docs/registry.md): loaded into the
# FHIR server as SearchParameter resources; the registry's own names map onto these codes (search.py).
SEARCH_PARAMETERS = [
    _search_parameter("omi-organization", list(d.RESOURCE_TYPES), "token",
                      "HealthcareService.providedBy.identifier | Device.owner.identifier | "
                      "Endpoint.managingOrganization.identifier",
                      "the provider organization by identifier (DSF organization identifier)"),
    _search_parameter("omi-algorithm", ["HealthcareService"], "reference",
                      f"HealthcareService.extension.where(url='{d.EXT_ALGORITHM}').value",
                      "the service's algorithm (Device)", ["Device"]),
    _search_parameter("omi-modality", ["Device"], "token", f"Device.{_property('modality')}",
                      "a modality the algorithm accepts (Device property modality)"),
    _search_parameter("omi-body-site", ["Device"], "token", f"Device.{_property('body-site')}",
                      "a body site the algorithm works on (Device property body-site)"),
    _search_parameter("omi-model-name", ["Device"], "string",
                      f"Device.deviceName.where(type='{d.DEVICE_NAME_MODEL}').name",
                      "the Open Inference Protocol model name"),
]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def tagged(resource: dict) -> bool:
    return any(t.get("system") == TAG["system"] and t.get("code") == TAG["code"]
               for t in (resource.get("meta") or {}).get("tag", []))


@dataclass
class ServiceState:
    service_id: str
    status: str = "unknown"
    checked_at: str | None = None
    latency_ms: float | None = None
    detail: str | None = None
    failures: int = 0
    since: str | None = None          # when the current status began
    heartbeat_at: str | None = None
    heartbeat_note: str | None = None


class Store:
    """The FHIR server holding the entries (`peer`), and the services' health in memory."""

    def __init__(self, peer: Peer):
        self.peer = peer
        self.base = peer.url.rstrip("/")
        self._http: httpx.Client | None = None
        self._installed = False
        self._lock = threading.Lock()
        self._states: dict[str, ServiceState] = {}
        self._checks: dict[str, collections.deque] = {}

    # -- the FHIR server --------------------------------------------------------------------------

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = self.peer.client(headers={"Accept": FHIR_JSON})
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        """A request to the FHIR server; no answer or a 5xx is a 503 for the registry's caller."""
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            log.warning("FHIR store %s: %s %s: %s", self.base, method, path.split("?")[0], type(exc).__name__)
            raise FhirError(503, "transient", f"the registry's FHIR store does not answer ({type(exc).__name__}); "
                                              "try again later") from None
        if r.status_code >= 500:
            log.warning("FHIR store %s: %s %s: HTTP %s %s", self.base, method, path.split("?")[0], r.status_code,
                        _diagnostics(r)[:300])
            raise FhirError(503, "transient", f"the registry's FHIR store failed (HTTP {r.status_code}); "
                                              "try again later")
        return r

    def fail(self, r: httpx.Response, what: str) -> FhirError:
        """A 4xx of the FHIR server, passed on with its own words (HAPI names the element at fault)."""
        status = r.status_code if r.status_code in (400, 404, 409, 410, 412, 422) else 400
        return FhirError(status, "processing" if status == 422 else "invalid", f"{what}: {_diagnostics(r)}")

    def read(self, rtype: str, rid: str) -> dict | None:
        """A registry entry, or None (absent, deleted, or not the registry's)."""
        res = self.read_any(rtype, rid)
        return res if res is not None and tagged(res) else None

    def read_any(self, rtype: str, rid: str) -> dict | None:
        """The resource `rtype/rid` in the FHIR store, the registry's or not; None if there is none."""
        r = self.request("GET", f"/{rtype}/{rid}")
        if r.status_code in (404, 410):
            return None
        if r.status_code != 200:
            raise self.fail(r, f"reading {rtype}/{rid}")
        return r.json()

    def services(self) -> tuple[list[dict], dict[str, dict]]:
        """Every HealthcareService, and the Devices and Endpoints they refer to ("Type/id" -> resource)."""
        found = self.search_all("HealthcareService", [("_include", "HealthcareService:omi-algorithm"),
                                                      ("_include", "HealthcareService:endpoint")])
        services = [r for r in found if r["resourceType"] == "HealthcareService"]
        linked = {f"{r['resourceType']}/{r['id']}": r for r in found if r["resourceType"] != "HealthcareService"}
        return sorted(services, key=lambda s: s["id"]), linked

    def search(self, rtype: str, params: list[tuple[str, str]]) -> dict:
        """One page of a search among the registry's entries (POST _search: long `_id` lists fit)."""
        r = self.request("POST", f"/{rtype}/_search", content=urlencode([TAG_PARAM, *params]), headers=FORM)
        if r.status_code != 200:
            raise self.fail(r, f"searching {rtype}")
        return r.json()

    def search_all(self, rtype: str, params: list[tuple[str, str]] = ()) -> list[dict]:
        """Every resource a search finds, matches and includes, over all pages."""
        out, offset = [], 0
        while True:
            page = self.search(rtype, [*params, ("_count", str(PAGE)), ("_offset", str(offset))])
            entries = page.get("entry", [])
            out += [e["resource"] for e in entries]
            matches = sum(1 for e in entries if (e.get("search") or {}).get("mode", "match") == "match")
            offset += matches
            if not matches or not any(link.get("relation") == "next" for link in page.get("link", [])):
                return out

    def transaction(self, bundle: dict) -> dict:
        r = self.request("POST", "", json=bundle, headers={"Content-Type": FHIR_JSON,
                                                           "Prefer": "return=representation"})
        if r.status_code != 200:
            raise self.fail(r, "the FHIR store refused the registration")
        return r.json()

    def install_search_parameters(self, timeout: float = 120) -> None:
        """Put the registry's SearchParameters into the server (unchanged ones are no-ops) and wait
        until it searches with them."""
        if self._installed:
            return
        for sp in SEARCH_PARAMETERS:
            r = self.request("PUT", f"/SearchParameter/{sp['id']}", json=sp, headers={"Content-Type": FHIR_JSON})
            if r.status_code not in (200, 201):
                raise self.fail(r, f"storing SearchParameter/{sp['id']}")
        end = time.monotonic() + timeout
        probe = [("omi-organization", "x"), ("omi-algorithm.omi-modality", "x"), ("omi-algorithm.omi-body-site", "x"),
                 ("_count", "1")]
        while True:
            r = self.request("POST", "/HealthcareService/_search", content=urlencode(probe), headers=FORM)
            if r.status_code == 200:
                self._installed = True
                return
            if time.monotonic() > end:
                raise self.fail(r, "the FHIR store does not search with the registry's SearchParameters")
            time.sleep(0.5)

    def clear(self) -> int:
        """Delete every registry entry (tests, benchmarks): one transaction, services first."""
        entries = [f"{r['resourceType']}/{r['id']}" for t in d.RESOURCE_TYPES for r in self.search_all(t)]
        if entries:
            order = {t: i for i, t in enumerate(d.RESOURCE_TYPES)}
            entries.sort(key=lambda ref: order[ref.partition("/")[0]])
            self.transaction({"resourceType": "Bundle", "type": "transaction",
                              "entry": [{"request": {"method": "DELETE", "url": ref}} for ref in entries]})
        with self._lock:
            self._states.clear()
            self._checks.clear()
        return len(entries)

    # -- health (in memory) ------------------------------------------------------------------------

    def state(self, service_id: str) -> ServiceState:
        with self._lock:
            st = self._states.get(service_id)
            return replace(st) if st else ServiceState(service_id)

    def states(self, service_ids: list[str] | None = None) -> dict[str, ServiceState]:
        with self._lock:
            return {k: replace(v) for k, v in self._states.items() if service_ids is None or k in service_ids}

    def record_check(self, service_id: str, status: str, latency_ms: float | None, detail: str,
                     at: str | None = None) -> ServiceState:
        at = at or now()
        with self._lock:
            old = self._states.get(service_id) or ServiceState(service_id)
            failures = 0 if status == "up" else old.failures + 1
            since = old.since if old.status == status and old.since else at
            self._states[service_id] = replace(old, status=status, checked_at=at, latency_ms=latency_ms,
                                               detail=detail, failures=failures, since=since)
            self._checks.setdefault(service_id, collections.deque(maxlen=KEEP_CHECKS)).append(
                {"checked_at": at, "status": status, "latency_ms": latency_ms, "detail": detail})
            return replace(self._states[service_id])

    def record_heartbeat(self, service_id: str, note: str | None, at: str | None = None) -> str:
        at = at or now()
        with self._lock:
            old = self._states.get(service_id) or ServiceState(service_id)
            self._states[service_id] = replace(old, heartbeat_at=at, heartbeat_note=note)
        return at

    def recent_checks(self, service_id: str, limit: int = 10) -> list[dict]:
        """The newest first."""
        with self._lock:
            return list(reversed(self._checks.get(service_id, ())))[:limit]


def _diagnostics(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return f"HTTP {r.status_code}"
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = [i for i in body.get("issue", []) if isinstance(i, dict)]
        issues = [i for i in issues if i.get("severity") in ("error", "fatal")] or issues
        texts = [(i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code", ""))
                 + (f" ({', '.join(map(str, i['expression']))})" if isinstance(i.get("expression"), list) else "")
                 for i in issues]
        return "; ".join(t for t in texts if t)[:500] or f"HTTP {r.status_code}"
    return f"HTTP {r.status_code}"


__all__ = ["KEEP_CHECKS", "SEARCH_PARAMETERS", "ServiceState", "Store", "TAG", "now", "tagged"]
