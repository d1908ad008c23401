"""The DIC's view of the service registry: services with their provider, inputs and health."""

from __future__ import annotations

import ssl
from dataclasses import asdict, dataclass, field

import httpx

from omi_dsf.errors import UserError
from omi_dsf.peer import http_client
from omi_dsf.registry import definitions as d
from omi_dsf.registry import validation as v

FILTERS = ("modality", "body-site", "service-type", "organization", "health", "name")


@dataclass
class Service:
    id: str
    name: str
    provider: str | None
    service_type: list[str]
    modality: list[str]
    body_site: list[str]
    model: str | None
    model_version: str | None
    oip_url: str | None
    status: str = "unknown"
    checked: str | None = None
    latency_ms: float | None = None
    heartbeat: str | None = None
    detail: str | None = None
    dicomweb: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _health(service: dict) -> dict:
    for ext in service.get("extension", []):
        if ext.get("url") == d.EXT_HEALTH:
            return {e["url"]: next((val for k, val in e.items() if k.startswith("value")), None)
                    for e in ext.get("extension", [])}
    return {}


def services_from_bundle(bundle: dict) -> list[Service]:
    included = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"]
                for e in bundle.get("entry", []) if (e.get("search") or {}).get("mode") == "include"}
    out = []
    for e in bundle.get("entry", []):
        if (e.get("search") or {}).get("mode", "match") != "match":
            continue
        s = e["resource"]
        device = included.get(v.algorithm_ref(s) or "", {})
        endpoints = [included.get(r.get("reference", ""), {}) for r in s.get("endpoint", [])]
        h = _health(s)
        out.append(Service(
            id=s["id"], name=s.get("name", s["id"]), provider=v.owner_of(s),
            service_type=[c.get("code", "") for t in s.get("type", []) for c in t.get("coding", [])],
            modality=[c for _, c in v.device_property(device, "modality")],
            body_site=[c for _, c in v.device_property(device, "body-site")],
            model=v.model_name(device) if device else None,
            model_version=next((x.get("value") for x in device.get("version", [])), None),
            oip_url=next((ep.get("address") for ep in endpoints if ep and v.endpoint_kind(ep) == "oip"), None),
            dicomweb=sorted({ep.get("address") for ep in endpoints if ep and v.endpoint_kind(ep) == "dicomweb"}),
            status=h.get("status") or "unknown", checked=h.get("checked"), latency_ms=h.get("latency-ms"),
            heartbeat=h.get("heartbeat"), detail=h.get("detail")))
    return out


class RegistryClient:
    def __init__(self, url: str, verify: ssl.SSLContext | None = None, timeout: float = 15.0,
                 http: httpx.Client | None = None):
        """`verify`: the TLS context (omi_dsf.tls.client_context: a private CA); default the system CAs.
        Verification is always on."""
        self.url = url.rstrip("/")
        self._http = http or http_client(verify=verify, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _get(self, path: str, params) -> dict:
        url = f"{self.url}/fhir/{path}"
        try:
            r = self._http.get(url, params=params, headers={"Accept": "application/fhir+json"})
        except httpx.HTTPError as exc:
            raise UserError(f"registry {self.url}: {type(exc).__name__}: {str(exc) or 'no answer'}") from None
        if r.status_code != 200:
            from omi_dsf.dsf.errors import operation_outcome_text
            try:
                text = operation_outcome_text(r.json())
            except (ValueError, TypeError, AttributeError, KeyError):
                text = r.text[:200]
            raise UserError(f"registry {self.url}: HTTP {r.status_code}: {text}")
        try:
            data = r.json()
        except ValueError:
            raise UserError(f"registry {self.url}: the answer is not JSON "
                            f"({r.headers.get('content-type', 'no Content-Type')})") from None
        if not isinstance(data, dict):
            raise UserError(f"registry {self.url}: the answer is a JSON {type(data).__name__}, not a FHIR resource")
        return data

    def services(self, filters: dict[str, str] | None = None) -> list[Service]:
        params = [(k, val) for k, val in (filters or {}).items() if val]
        params += [("_include", "HealthcareService:algorithm"), ("_include", "HealthcareService:endpoint"),
                   ("_count", "1000")]
        bundle = self._get("HealthcareService", params)
        try:
            return services_from_bundle(bundle)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise UserError(f"registry {self.url}: the answer is not a searchset Bundle of services "
                            f"({type(exc).__name__}: {str(exc)[:100]})") from None

    def service(self, service_id: str) -> Service:
        found = self.services({"_id": service_id})
        if not found:
            raise UserError(f"no AI service {service_id!r} in the registry {self.url}")
        return found[0]
