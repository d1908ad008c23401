"""Registering, updating, reading and searching entries; every write is one store transaction.

A registration is a FHIR transaction Bundle (HealthcareService + Device + Endpoints, POST with
urn:uuid fullUrls or PUT Type/id), or a single resource (POST Type, PUT Type/id). All of it is
checked (FHIR validity, owner, links, duplicates) before anything is committed.
"""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from typing import Iterable
from urllib.parse import urlencode

from omi_dsf.registry import definitions as d
from omi_dsf.registry import search
from omi_dsf.registry import validation as v
from omi_dsf.registry.errors import FhirError, duplicate, forbidden, invalid, not_found
from omi_dsf.registry.health import HealthSettings, effective
from omi_dsf.registry.store import DuplicateError, ServiceState, Store


def _walk_references(node, mapping: dict[str, str]) -> None:
    if isinstance(node, dict):
        for k, val in node.items():
            if k == "reference" and isinstance(val, str) and val in mapping:
                node[k] = mapping[val]
            else:
                _walk_references(val, mapping)
    elif isinstance(node, list):
        for x in node:
            _walk_references(x, mapping)


class Registry:
    def __init__(self, store: Store, health: HealthSettings | None = None):
        self.store = store
        self.health = health or HealthSettings()

    # -- writes -------------------------------------------------------------------------------

    def transaction(self, bundle: object, organization: str) -> dict:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise invalid("expected a Bundle of type transaction")
        if bundle.get("type") != "transaction":
            raise invalid(f"Bundle.type is {bundle.get('type')!r}; only 'transaction' is accepted", "Bundle.type")
        entries = bundle.get("entry")
        if not isinstance(entries, list) or not entries:
            raise invalid("Bundle.entry is empty", "Bundle.entry")
        work = []  # (method, resource)
        mapping: dict[str, str] = {}
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
                resource["id"] = uuid.uuid4().hex
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
            else:
                raise invalid(f"{where}.request.method must be POST or PUT, not {str(method)[:40]!r}",
                              f"{where}.request.method")
            if full_url:
                mapping[full_url] = f"{rtype}/{resource['id']}"
            v.check_owner(resource, organization)
            if "extension" in resource:   # health is the registry's to say: never stored from a client
                resource["extension"] = [e for e in resource["extension"] if e.get("url") != d.EXT_HEALTH]
            work.append((method, resource))
        for _, resource in work:
            _walk_references(resource, mapping)
        results = self._commit(work, organization)
        return {"resourceType": "Bundle", "type": "transaction-response",
                "entry": [{"response": {"status": "201 Created" if created else "200 OK",
                                        "location": f"{r['resourceType']}/{r['id']}/_history/{r['meta']['versionId']}"},
                           "resource": r} for r, created in results]}

    def create(self, rtype: str, resource: object, organization: str) -> dict:
        res = self._single(rtype, resource, "POST", rtype, organization)
        return res

    def update(self, rtype: str, rid: str, resource: object, organization: str) -> tuple[dict, bool]:
        bundle = {"resourceType": "Bundle", "type": "transaction",
                  "entry": [{"resource": resource, "request": {"method": "PUT", "url": f"{rtype}/{rid}"}}]}
        self._expect_type(rtype, resource)
        entry = self.transaction(bundle, organization)["entry"][0]
        return entry["resource"], entry["response"]["status"].startswith("201")

    def _single(self, rtype, resource, method, url, organization) -> dict:
        self._expect_type(rtype, resource)
        bundle = {"resourceType": "Bundle", "type": "transaction",
                  "entry": [{"resource": resource, "request": {"method": method, "url": url}}]}
        return self.transaction(bundle, organization)["entry"][0]["resource"]

    @staticmethod
    def _expect_type(rtype: str, resource: object) -> None:
        if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
            got = resource.get("resourceType") if isinstance(resource, dict) else type(resource).__name__
            raise invalid(f"expected a {rtype} resource, got {got!r}", "resourceType")

    def _commit(self, work: list[tuple[str, dict]], organization: str) -> list[tuple[dict, bool]]:
        pending = {f"{r['resourceType']}/{r['id']}": r for _, r in work}
        results = []
        try:
            with self.store.transaction() as tx:
                for method, resource in work:
                    rtype, rid = resource["resourceType"], resource["id"]
                    old = tx.get(rtype, rid)
                    if old and old[1] != organization:
                        raise forbidden(f"{rtype}/{rid} belongs to organization {old[1]!r}; "
                                        "providers update their own entries only")
                    idents = v.identifiers(resource)
                    for system, value in idents:
                        holder = tx.id_for_identifier(rtype, system, value)
                        if holder is not None and holder != rid:
                            raise duplicate(f"duplicate: {rtype} with identifier {system}|{value} is already "
                                            f"registered as {rtype}/{holder}", f"{rtype}.identifier")
                    if len(set(idents)) != len(idents):
                        raise invalid(f"{rtype}/{rid} lists the same identifier twice", f"{rtype}.identifier")

                def resolve(ref: str) -> dict | None:
                    if ref in pending:
                        return pending[ref]
                    rtype, _, rid = ref.partition("/")
                    got = tx.get(rtype, rid) if rtype in d.RESOURCE_TYPES else None
                    return got[0] if got and got[1] == organization else None

                for _, resource in work:
                    if resource["resourceType"] == "HealthcareService":
                        v.check_links(resource, resolve)
                for method, resource in work:
                    created = tx.get(resource["resourceType"], resource["id"]) is None
                    stored = tx.put(resource, organization, v.identifiers(resource))
                    results.append((stored, created))
        except DuplicateError as exc:  # a concurrent registration won the race for the same key
            raise duplicate(f"duplicate: {exc}") from None
        return results

    def heartbeat(self, service_id: str, organization: str, note: str | None) -> str:
        got = self.store.read("HealthcareService", service_id)
        if not got:
            raise not_found(f"HealthcareService/{service_id} is not registered")
        if got[1] != organization:
            raise forbidden(f"HealthcareService/{service_id} belongs to organization {got[1]!r}; "
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
        got = self.store.read(rtype, rid)
        if not got:
            raise not_found(f"{rtype}/{rid} is not registered")
        if rtype == "HealthcareService":
            return self.with_health(got[0], self.states().get(rid))
        return got[0]

    def search(self, rtype: str, items: Iterable[tuple[str, str]], base_url: str = "") -> dict:
        if rtype not in d.RESOURCE_TYPES:
            raise not_found(f"resource type {rtype!r} is not served here")
        items = list(items)
        query = search.parse(rtype, items)
        resources = self.store.all(rtype)
        states = self.states() if rtype == "HealthcareService" else {}
        cache: dict[str, dict | None] = {}
        if rtype == "HealthcareService":   # their Devices and Endpoints, in one read each
            for t in ("Device", "Endpoint"):
                cache.update({f"{t}/{r['id']}": r for r in self.store.all(t)})

        def resolve(ref: str) -> dict | None:
            if ref not in cache:
                t, _, i = ref.partition("/")
                got = self.store.read(t, i) if t in d.RESOURCE_TYPES else None
                cache[ref] = got[0] if got else None
            return cache[ref]

        ctx = search.Context(resolve, lambda sid: (states.get(sid) or ServiceState(sid)).status)
        hits = [r for r in resources if search.matches(r, query, ctx)]
        page = hits[query.offset:query.offset + query.count]
        entries = []
        for r in page:
            if rtype == "HealthcareService":
                r = self.with_health(r, states.get(r["id"]))
            entries.append({"fullUrl": f"{base_url}/{rtype}/{r['id']}", "resource": r, "search": {"mode": "match"}})
        included: dict[str, dict] = {}
        for r in page:
            refs = []
            if "HealthcareService:algorithm" in query.includes and v.algorithm_ref(r):
                refs.append(v.algorithm_ref(r))
            if "HealthcareService:endpoint" in query.includes:
                refs += [e.get("reference", "") for e in r.get("endpoint", [])]
            for ref in refs:
                target = resolve(ref)
                if target is not None:
                    included[ref] = target
        entries += [{"fullUrl": f"{base_url}/{ref}", "resource": res, "search": {"mode": "include"}}
                    for ref, res in included.items()]
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(hits), "entry": entries}
        if query.offset + query.count < len(hits):
            keep = [(k, val) for k, val in items if k not in ("_count", "_offset")]
            keep += [("_count", str(query.count)), ("_offset", str(query.offset + query.count))]
            bundle["link"] = [{"relation": "next", "url": f"{base_url}/{rtype}?{urlencode(keep)}"}]
        return bundle


__all__ = ["Registry", "FhirError"]
