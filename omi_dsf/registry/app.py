"""The registry's HTTP interface (starlette): FHIR R4 REST under /fhir, the status page at /.

  GET  /fhir/metadata                              CapabilityStatement with the search parameters
  POST /fhir                                       transaction Bundle (register a service at once)
  GET  /fhir/{type}?...                            search (HealthcareService, Device, Endpoint)
  POST /fhir/{type}                                create
  GET  /fhir/{type}/{id}                           read (HealthcareService with its health)
  PUT  /fhir/{type}/{id}                           update (or create with that id)
  POST /fhir/HealthcareService/{id}/$heartbeat     the provider says its service is alive
  GET  /                                           status page
GET  /health                                     the registry's own liveness
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
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
from omi_dsf.serving.limits import LimitsMiddleware, limit_error_handler

log = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json"
OPEN_PATHS = {"/health"}


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


def limit_answer(status: int, message: str) -> Response:
    """A limit's answer (413, 414, 408, 503, …): an OperationOutcome, the registry's error format."""
    code = {408: "timeout", 413: "too-costly", 414: "too-costly", 503: "transient"}.get(status, "invalid")
    return FhirResponse(operation_outcome(message, code), status_code=status)


def heartbeat_note(params: object) -> str | None:
    """The `note` of a $heartbeat's Parameters, or a 400 naming what is wrong with them."""
    if not isinstance(params, dict) or params.get("resourceType") != "Parameters":
        raise invalid("$heartbeat takes an optional Parameters resource (parameter 'note')")
    items = params.get("parameter", [])
    if not isinstance(items, list) or not all(isinstance(p, dict) for p in items):
        raise invalid("Parameters.parameter must be a list of objects", "Parameters.parameter")
    for i, p in enumerate(items):
        if p.get("name") == "note":
            if not isinstance(p.get("valueString"), str):
                raise invalid("the 'note' parameter needs a valueString", f"Parameters.parameter[{i}]")
            return p["valueString"]
    return None


def create_app(cfg: RegistryConfig, store: Store | None = None, run_checks: bool = True) -> Starlette:
    store = store or Store(cfg.store_peer())
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
        raw = await request.body()   # at most limits.max_body_mb (the limits middleware)
        try:
            return json.loads(raw)
        except RecursionError:
            raise invalid("request body is nested too deeply") from None
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
            note = heartbeat_note(await body_json(request))
        at = await run_in_threadpool(registry.heartbeat, request.path_params["rid"], org, note)
        return FhirResponse({"resourceType": "Parameters", "parameter": [{"name": "received", "valueDateTime": at}]})

    async def status_page(request: Request) -> Response:
        if not cfg.auth.public_read:
            organization(request)
        def gather():
            services, linked = store.services()
            devices, checks = {}, {}
            for s in services:
                devices[s["id"]] = linked.get(v.algorithm_ref(s) or "") or {}
                checks[s["id"]] = store.recent_checks(s["id"], 20)
            return page.render(services, registry.states(), devices, checks)
        return HTMLResponse(await run_in_threadpool(gather))

    async def alive(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(store.install_search_parameters)
        stop = asyncio.Event()
        task = asyncio.create_task(checker.run(stop)) if run_checks and cfg.health.interval > 0 else None
        try:
            yield
        finally:
            stop.set()
            if task:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(task, timeout=cfg.health.timeout * 3)
            store.close()

    routes = [
        Route("/", guarded(status_page), methods=["GET"]),
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
        return FhirResponse(operation_outcome(f"{request.method} {request.url.path[:200]}: {exc.detail}", code),
                            status_code=exc.status_code)

    middleware = [Middleware(LimitsMiddleware, limits=cfg.limits, exempt=OPEN_PATHS.__contains__, respond=limit_answer)]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware,
                    exception_handlers={404: http_error, 405: http_error, HTTPException: limit_error_handler(limit_answer)})
    app.state.registry, app.state.checker, app.state.store = registry, checker, store
    return app
