"""Who may write what, and reading and searching with health: the registry's rules in front of its
FHIR store (store.py), which stores, versions, searches and pages.

A registration is a FHIR transaction Bundle (HealthcareService + Device + Endpoints, POST with
urn:uuid fullUrls or PUT Type/id), or a single resource (POST Type, PUT Type/id). All of it is
checked (FHIR validity, owner, links, duplicate identifiers) before it goes to the FHIR store as one
transaction, which stores all of it or nothing. Writes pass one at a time through this process, so
that two registrations of the same identifier cannot both pass the duplicate check.
"""

from __future__ import annotations

import copy
import datetime as dt
import threading
import uuid
from typing import Iterable
from urllib.parse import urlencode

from omi_dsf.registry import definitions as d
from omi_dsf.registry import search
from omi_dsf.registry import validation as v
from omi_dsf.registry.errors import FhirError, duplicate, forbidden, invalid, not_found
from omi_dsf.registry.health import HealthSettings, effective
from omi_dsf.registry.store import TAG, ServiceState, Store, tagged


def _escape(value: str) -> str:
    """A token search value with FHIR's escapes for , | $ and \\."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")


class Registry:
    def __init__(self, store: Store, health: HealthSettings | None = None):
        self.store = store
        self.health = health or HealthSettings()
        self._writes = threading.Lock()

    # -- writes -------------------------------------------------------------------------------

    def transaction(self, bundle: object, organization: str) -> dict:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise invalid("expected a Bundle of type transaction")
        if bundle.get("type") != "transaction":
            raise invalid(f"Bundle.type is {bundle.get('type')!r}; only 'transaction' is accepted", "Bundle.type")
        entries = bundle.get("entry")
        if not isinstance(entries, list) or not entries:
            raise invalid("Bundle.entry is empty", "Bundle.entry")
        work = []  # (method, url, fullUrl, resource)
        pending: dict[str, dict] = {}   # what references in the Bundle can point at
        for i, entry in enumerate(entries):
            where = f"Bundle.entry[{i}]"
            if not isinstance(entry, dict):
                raise invalid(f"{where} is not an object", where)
            request = entry.get("request")
            if not isinstance(request, dict) or not isinstance(request.get("url"), str):
                raise invalid(f"{where}.request must be an object with a method and a url (a string)",
                              f"{where}.request")
            method, url = request.get("method"), request["url"].strip("/")
            full_url = entry.get("fullUrl")
            if full_url is not None and not isinstance(full_url, str):
                raise invalid(f"{where}.fullUrl must be a string", f"{where}.fullUrl")
            resource = v.check_fhir(copy.deepcopy(entry.get("resource")), where)
            rtype = resource["resourceType"]
            if method == "POST":
                if url != rtype:
                    raise invalid(f"{where}.request.url must be {rtype!r} for POST", f"{where}.request.url")
                resource.pop("id", None)   # the FHIR store assigns it
            elif method == "PUT":
                if url.partition("/")[0] != rtype or not url.partition("/")[2]:
                    raise invalid(f"{where}.request.url must be '{rtype}/<id>' for PUT", f"{where}.request.url")
                rid = url.partition("/")[2]
                if resource.get("id") not in (None, rid):
                    raise invalid(f"{where}: resource id {resource['id']!r} differs from request.url {url!r}",
                                  f"{where}.resource.id")
                if not v.ID_RE.match(rid):
                    raise invalid(f"{where}.request.url: {rid!r} is not a valid FHIR id", f"{where}.request.url")
                resource["id"] = rid
                pending[f"{rtype}/{rid}"] = resource
            else:
                raise invalid(f"{where}.request.method must be POST or PUT, not {str(method)[:40]!r}",
                              f"{where}.request.method")
            if full_url:
                pending[full_url] = resource
            v.check_owner(resource, organization)
            if "extension" in resource:   # health is the registry's to say: never stored from a client
                resource["extension"] = [e for e in resource["extension"] if e.get("url") != d.EXT_HEALTH]
            meta = resource.setdefault("meta", {})
            meta["tag"] = [t for t in meta.get("tag", []) if t.get("system") != TAG["system"]] + [dict(TAG)]
            for key in ("versionId", "lastUpdated"):
                meta.pop(key, None)
            work.append((method, url if method == "POST" else f"{rtype}/{resource['id']}", full_url, resource))
        # every entry with a fullUrl (bdl-7; a validating FHIR store refuses relative references in a
        # Bundle otherwise): a PUT's is its URL at the FHIR store, a POST's a new urn:uuid
        full_urls = [f or (f"{self.store.base}/{u}" if m == "PUT" else f"urn:uuid:{uuid.uuid4()}")
                     for m, u, f, _ in work]
        with self._writes:
            self._check(work, pending, organization)
            answer = self.store.transaction({
                "resourceType": "Bundle", "type": "transaction",
                "entry": [{"fullUrl": f, "resource": r, "request": {"method": m, "url": u}}
                          for (m, u, _, r), f in zip(work, full_urls)]})
        out = []
        for (_, url, _, _), e in zip(work, answer.get("entry", [])):
            response = e.get("response") or {}
            resource = e.get("resource")
            location = response.get("location", "")
            if resource is None:   # a server that does not return what it stored
                rtype, _, rest = location.partition("/")
                resource = self.store.read(rtype, rest.partition("/")[0]) or {}
            location = f"{resource.get('resourceType')}/{resource.get('id')}/_history/" \
                       f"{(resource.get('meta') or {}).get('versionId')}"
            out.append({"response": {"status": response.get("status", "200 OK"), "location": location},
                        "resource": resource})
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": out}

    def _check(self, work: list, pending: dict[str, dict], organization: str) -> None:
        """Owner of what is replaced, duplicate identifiers, links: against the FHIR store."""
        wanted: dict[tuple[str, str, str], str | None] = {}   # (type, system, value) -> id in the Bundle
        for method, url, _, resource in work:
            rtype, rid = resource["resourceType"], resource.get("id")
            if method == "PUT":
                old = self.store.read_any(rtype, rid)
                if old is not None and not tagged(old):
                    raise duplicate(f"{rtype}/{rid} exists in the registry's FHIR store and is not a registry "
                                    "entry; choose another id", f"{rtype}.id")
                owner = v.owner_of(old) if old else None
                if old and owner != organization:
                    raise forbidden(f"{rtype}/{rid} belongs to organization {owner!r}; "
                                    "providers update their own entries only")
            idents = v.identifiers(resource)
            if len(set(idents)) != len(idents):
                raise invalid(f"{rtype}/{rid} lists the same identifier twice", f"{rtype}.identifier")
            for system, value in idents:
                key = (rtype, system, value)
                if key in wanted and wanted[key] != rid:
                    raise duplicate(f"duplicate: two {rtype} entries of the Bundle have identifier {system}|{value}",
                                    f"{rtype}.identifier")
                wanted[key] = rid
        for rtype in dict.fromkeys(r["resourceType"] for _, _, _, r in work):   # in the Bundle's order
            keys = [(s, val) for t, s, val in wanted if t == rtype]
            if not keys:
                continue
            found = self.store.search_all(rtype, [("identifier", ",".join(f"{_escape(s)}|{_escape(val)}"
                                                                          for s, val in keys))])
            for holder in found:
                for system, value in v.identifiers(holder):
                    key = (rtype, system, value)
                    if key in wanted and wanted[key] != holder["id"]:
                        raise duplicate(f"duplicate: {rtype} with identifier {system}|{value} is already "
                                        f"registered as {rtype}/{holder['id']}", f"{rtype}.identifier")

        def resolve(ref: str) -> dict | None:
            if ref in pending:
                return pending[ref]
            rtype, _, rid = ref.partition("/")
            if rtype not in d.RESOURCE_TYPES or not v.ID_RE.match(rid):
                return None
            got = self.store.read(rtype, rid)
            return got if got and v.owner_of(got) == organization else None

        for _, _, _, resource in work:
            if resource["resourceType"] == "HealthcareService":
                v.check_links(resource, resolve)

    def create(self, rtype: str, resource: object, organization: str) -> dict:
        self._expect_type(rtype, resource)
        bundle = {"resourceType": "Bundle", "type": "transaction",
                  "entry": [{"resource": resource, "request": {"method": "POST", "url": rtype}}]}
        return self.transaction(bundle, organization)["entry"][0]["resource"]

    def update(self, rtype: str, rid: str, resource: object, organization: str) -> tuple[dict, bool]:
        self._expect_type(rtype, resource)
        bundle = {"resourceType": "Bundle", "type": "transaction",
                  "entry": [{"resource": resource, "request": {"method": "PUT", "url": f"{rtype}/{rid}"}}]}
        entry = self.transaction(bundle, organization)["entry"][0]
        return entry["resource"], entry["response"]["status"].startswith("201")

    @staticmethod
    def _expect_type(rtype: str, resource: object) -> None:
        if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
            got = resource.get("resourceType") if isinstance(resource, dict) else type(resource).__name__
            raise invalid(f"expected a {rtype} resource, got {got!r}", "resourceType")

    def heartbeat(self, service_id: str, organization: str, note: str | None) -> str:
        got = self.store.read("HealthcareService", service_id) if v.ID_RE.match(service_id) else None
        if not got:
            raise not_found(f"HealthcareService/{service_id} is not registered")
        owner = v.owner_of(got)
        if owner != organization:
            raise forbidden(f"HealthcareService/{service_id} belongs to organization {owner!r}; "
                            "only its provider sends its heartbeats")
        return self.store.record_heartbeat(service_id, (note or "")[:200] or None)

    # -- reads --------------------------------------------------------------------------------

    def states(self) -> dict[str, ServiceState]:
        now = dt.datetime.now(dt.timezone.utc)
        return {k: effective(s, self.health, now) for k, s in self.store.states().items()}

    def with_health(self, service: dict, state: ServiceState | None) -> dict:
        state = state or ServiceState(service["id"])
        ext = [{"url": "status", "valueCode": state.status}]
        if state.checked_at:
            ext.append({"url": "checked", "valueDateTime": state.checked_at})
        if state.latency_ms is not None:
            ext.append({"url": "latency-ms", "valueDecimal": state.latency_ms})
        if state.since:
            ext.append({"url": "since", "valueDateTime": state.since})
        if state.heartbeat_at:
            ext.append({"url": "heartbeat", "valueDateTime": state.heartbeat_at})
        if state.detail:
            ext.append({"url": "detail", "valueString": state.detail})
        out = copy.deepcopy(service)
        out["extension"] = [e for e in out.get("extension", []) if e.get("url") != d.EXT_HEALTH]
        out["extension"].append({"url": d.EXT_HEALTH, "extension": ext})
        return out

    def read(self, rtype: str, rid: str) -> dict:
        if rtype not in d.RESOURCE_TYPES:
            raise not_found(f"resource type {rtype!r} is not served here")
        got = self.store.read(rtype, rid) if v.ID_RE.match(rid) else None
        if not got:
            raise not_found(f"{rtype}/{rid} is not registered")
        if rtype == "HealthcareService":
            return self.with_health(got, self.states().get(rid))
        return got

    def _health_ids(self, values: list[str], states: dict[str, ServiceState]) -> set[str]:
        wanted = set(values)
        out = {sid for sid, st in states.items() if st.status in wanted}
        if "unknown" in wanted:
            every = {r["id"] for r in self.store.search_all("HealthcareService", [("_elements", "id")])}
            out |= {sid for sid in every if sid not in states}
        return out

    def search(self, rtype: str, items: Iterable[tuple[str, str]], base_url: str = "") -> dict:
        if rtype not in d.RESOURCE_TYPES:
            raise not_found(f"resource type {rtype!r} is not served here")
        items = list(items)
        query = search.parse(rtype, items)
        states = self.states() if rtype == "HealthcareService" else {}
        params = list(query.server)
        if query.health:
            ids: set[str] | None = None
            for values in query.health:
                got = self._health_ids(values, states)
                ids = got if ids is None else ids & got
            if not ids:
                return {"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []}
            params.append(("_id", ",".join(sorted(ids))))
        page = self.store.search(rtype, params + [("_count", str(query.count)), ("_offset", str(query.offset)),
                                                  ("_total", "accurate")])
        entries = []
        matches = 0
        for e in page.get("entry", []):
            r = e["resource"]
            mode = (e.get("search") or {}).get("mode", "match")
            if mode == "match":
                matches += 1
                if rtype == "HealthcareService":
                    r = self.with_health(r, states.get(r["id"]))
            entries.append({"fullUrl": f"{base_url}/{r['resourceType']}/{r['id']}", "resource": r,
                            "search": {"mode": mode}})
        total = page.get("total")
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": total, "entry": entries}
        if total is None:
            bundle.pop("total")
        more = (query.offset + matches < total) if total is not None else \
            any(link.get("relation") == "next" for link in page.get("link", []))
        if matches and more:
            keep = [(k, val) for k, val in items if k not in ("_count", "_offset")]
            keep += [("_count", str(query.count)), ("_offset", str(query.offset + matches))]
            bundle["link"] = [{"relation": "next", "url": f"{base_url}/{rtype}?{urlencode(keep)}"}]
        return bundle


__all__ = ["Registry", "FhirError"]
