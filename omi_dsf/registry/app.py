"""The registry's HTTP interface (starlette): FHIR R4 REST under /fhir, the status page at /.

  GET  /fhir/metadata                              CapabilityStatement with the search parameters
  POST /fhir                                       transaction Bundle (register a service at once)
  GET  /fhir/{type}?...                            search (HealthcareService, Device, Endpoint)
  POST /fhir/{type}                                create
  GET  /fhir/{type}/{id}                           read (HealthcareService with its health)
  PUT  /fhir/{type}/{id}                           update (or create with that id)
  POST /fhir/HealthcareService/{id}/$heartbeat     the provider says its service is alive
  GET  /                                           status page
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from omi_dsf.registry import definitions as d
from omi_dsf.registry import page, search
from omi_dsf.registry import validation as v
from omi_dsf.registry.auth import Authenticator
from omi_dsf.registry.config import RegistryConfig
from omi_dsf.registry.errors import FhirError, invalid, operation_outcome
from omi_dsf.registry.health import HealthChecker
from omi_dsf.registry.registrations import Registry
from omi_dsf.registry.store import Store

log = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json"
MAX_BODY = 1 << 20


class FhirResponse(JSONResponse):
    media_type = FHIR_JSON


def _error(exc: FhirError) -> Response:
    return FhirResponse(exc.outcome(), status_code=exc.status)


def capability_statement(base_url: str) -> dict:
    resources = []
    for rtype, params in search.PARAMS.items():
        entry = {"type": rtype, "interaction": [{"code": c} for c in ("read", "search-type", "create", "update")],
                 "searchParam": [{"name": p.name, "type": p.type, "documentation": p.description}
                                 for p in params.values()]}
        if rtype == "HealthcareService":
            entry["searchInclude"] = sorted(search.INCLUDES)
            entry["operation"] = [{"name": "heartbeat", "definition": f"{d.BASE}/OperationDefinition/omi-registry-heartbeat"}]
        resources.append(entry)
    return {"resourceType": "CapabilityStatement", "status": "active", "date": "2026-11-28", "kind": "instance",
            "software": {"name": "omi-dsf service registry"}, "implementation": {"description": "OMI service registry",
                                                                                  "url": f"{base_url}/fhir"},
            "fhirVersion": "4.0.1", "format": ["json"],
            "rest": [{"mode": "server", "interaction": [{"code": "transaction"}], "resource": resources}]}


def create_app(cfg: RegistryConfig, store: Store | None = None, run_checks: bool = True) -> Starlette:
    store = store or Store(cfg.database)
    registry = Registry(store, cfg.health)
    authn = Authenticator(cfg.auth)
    checker = HealthChecker(store, cfg.health)
    base = cfg.base_url()

    def organization(request: Request) -> str:
        return authn.organization(request.scope, request.headers.get("authorization"))

    async def body_json(request: Request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype not in (FHIR_JSON, "application/json"):
            raise FhirError(415, "not-supported", f"Content-Type {ctype or '(none)'!r} is not supported; "
                            f"send {FHIR_JSON}")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise FhirError(413, "too-costly", f"request body larger than {MAX_BODY} bytes")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise invalid(f"request body is not JSON: {exc}") from None

    def guarded(handler):
        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except FhirError as exc:
                return _error(exc)
        return wrapped

    async def metadata(request: Request) -> Response:
        return FhirResponse(capability_statement(base))

    async def transaction(request: Request) -> Response:
        org = organization(request)
        bundle = await body_json(request)
        out = await run_in_threadpool(registry.transaction, bundle, org)
        log.info("transaction by %s: %s", org, ", ".join(e["response"]["location"] for e in out["entry"]))
        return FhirResponse(out)

    async def type_level(request: Request) -> Response:
        rtype = request.path_params["rtype"]
        if request.method == "GET":
            if not cfg.auth.public_read:
                organization(request)
            out = await run_in_threadpool(registry.search, rtype, request.query_params.multi_items(), f"{base}/fhir")
            return FhirResponse(out)
        org = organization(request)
        if rtype not in d.RESOURCE_TYPES:
            raise FhirError(404, "not-supported", f"resource type {rtype!r} is not served here")
        resource = await body_json(request)
        stored = await run_in_threadpool(registry.create, rtype, resource, org)
        loc = f"{base}/fhir/{rtype}/{stored['id']}/_history/{stored['meta']['versionId']}"
        return FhirResponse(stored, status_code=201, headers={"Location": loc})

    async def instance(request: Request) -> Response:
        rtype, rid = request.path_params["rtype"], request.path_params["rid"]
        if request.method == "GET":
            if not cfg.auth.public_read:
                organization(request)
            return FhirResponse(await run_in_threadpool(registry.read, rtype, rid))
        org = organization(request)
        if rtype not in d.RESOURCE_TYPES:
            raise FhirError(404, "not-supported", f"resource type {rtype!r} is not served here")
        resource = await body_json(request)
        stored, created = await run_in_threadpool(registry.update, rtype, rid, resource, org)
        return FhirResponse(stored, status_code=201 if created else 200)

    async def heartbeat(request: Request) -> Response:
        org = organization(request)
        note = None
        if await request.body():
            params = await body_json(request)
            if not isinstance(params, dict) or params.get("resourceType") != "Parameters":
                raise invalid("$heartbeat takes an optional Parameters resource (parameter 'note')")
            note = next((p.get("valueString") for p in params.get("parameter", []) if p.get("name") == "note"), None)
        at = await run_in_threadpool(registry.heartbeat, request.path_params["rid"], org, note)
        return FhirResponse({"resourceType": "Parameters", "parameter": [{"name": "received", "valueDateTime": at}]})

    async def status_page(request: Request) -> Response:
        def gather():
            services = store.all("HealthcareService")
            devices, checks = {}, {}
            for s in services:
                ref = v.algorithm_ref(s)
                got = store.read("Device", ref.partition("/")[2]) if ref else None
                devices[s["id"]] = got[0] if got else {}
                checks[s["id"]] = store.recent_checks(s["id"], 20)
            return page.render(services, registry.states(), devices, checks)
        return HTMLResponse(await run_in_threadpool(gather))

    async def alive(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        stop = asyncio.Event()
        task = asyncio.create_task(checker.run(stop)) if run_checks and cfg.health.interval > 0 else None
        try:
            yield
        finally:
            stop.set()
            if task:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(task, timeout=cfg.health.timeout * 3)

    routes = [
        Route("/", status_page, methods=["GET"]),
        Route("/health", alive, methods=["GET"]),
        Route("/fhir/metadata", guarded(metadata), methods=["GET"]),
        Route("/fhir", guarded(transaction), methods=["POST"]),
        Route("/fhir/HealthcareService/{rid}/$heartbeat", guarded(heartbeat), methods=["POST"]),
        Route("/fhir/{rtype}", guarded(type_level), methods=["GET", "POST"]),
        Route("/fhir/{rtype}/{rid}", guarded(instance), methods=["GET", "PUT"]),
    ]
    async def http_error(request: Request, exc) -> Response:
        # FHIR clients get an OperationOutcome for unknown paths and methods too
        if not request.url.path.startswith("/fhir"):
            return Response(exc.detail, status_code=exc.status_code)
        code = "not-supported" if exc.status_code == 405 else "not-found"
        return FhirResponse(operation_outcome(f"{request.method} {request.url.path}: {exc.detail}", code),
                            status_code=exc.status_code)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: http_error, 405: http_error})
    app.state.registry, app.state.checker, app.state.store = registry, checker, store
    return app
