"""The reference AI service: Open Inference Protocol v2 over HTTP (starlette + uvicorn).

It serves one model, "lung-seg" (see `lungseg.py`). Any other v2 server (Triton, KServe,
MLServer) can stand in for it as long as it offers a model with the same inputs and
outputs. Model metadata carries, besides the protocol's name/versions/platform/inputs/
outputs, a "parameters" object with what a caller must know before sending a study:
modality, body part, slice limits, label meaning, algorithm name and version.

Access and limits come from its configuration (`config.py`, sections shared with the other servers
in `omi_dsf/serving`): mutual TLS, bearer JWTs or, only when configured, anonymous; readiness
(`/v2/health/*`, `/v2/models/<m>/ready`) is open so a registry can check it. Requests are bounded in
size, time and number; anything malformed is a 4xx naming the problem.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from omi_dsf.inference import lungseg, tensors
from omi_dsf.inference.lungseg import LungSegModel, ModelInputError  # noqa: F401  (the model this service serves)
from omi_dsf.inference.config import ServiceConfig
from omi_dsf.inference.tensors import TensorError
from omi_dsf.serving.auth import AuthMiddleware
from omi_dsf.serving.config import AuthSettings
from omi_dsf.serving.limits import LimitsMiddleware, limit_error_handler

log = logging.getLogger(__name__)
SERVER_NAME = "omi-dsf-reference-ai-service"
SERVER_VERSION = "0.1.0"
OPEN_PATH = re.compile(r"^/v2/health/(live|ready)$|^/v2/models/[^/]+(/versions/[^/]+)?/ready$")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _object(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Refused(400, f"{what} must be an object")
    return value


def _requested_outputs(message: dict, declared: list[str], model: str) -> tuple[list[str], set[str]]:
    """The output names asked for (default: all) and those to send as binary data."""
    requested = message.get("outputs") or []
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise _Refused(400, "'outputs' must be a list of objects")
    names = [o.get("name") for o in requested]
    if any(not isinstance(n, str) for n in names):
        raise _Refused(400, "each of 'outputs' needs a 'name' (a string)")
    names = list(dict.fromkeys(names)) or declared
    unknown = [n for n in names if n not in declared]
    if unknown:
        raise _Refused(400, f"model '{model}' has no output {unknown[0][:100]!r} (outputs: {', '.join(declared)})")
    params = _object(message.get("parameters"), "'parameters'")
    binary = set(declared) if params.get("binary_data_output") is True else set()
    binary |= {o["name"] for o in requested if _object(o.get("parameters"), "an output's 'parameters'").get("binary_data")}
    return names, binary


async def _read_body(request: Request) -> bytearray:
    """The whole body in one buffer of its announced length (the limits middleware has checked that
    length and cuts off a body without one): no chunk list joined into a second copy."""
    length = request.headers.get("content-length")
    body = bytearray(int(length)) if length else bytearray()
    pos = 0
    async for chunk in request.stream():
        if length:
            if pos + len(chunk) > len(body):
                raise _Refused(400, "request body is longer than its Content-Length")
            body[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        else:
            body += chunk
    if length and pos != len(body):
        raise _Refused(400, "request body ended before its Content-Length")
    return body


def _decode(body: bytearray, header_length: str | None) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        return tensors.decode(body, header_length, "inputs")
    except RecursionError:
        raise TensorError("message is nested too deeply") from None
    except TensorError:
        raise
    except (ValueError, TypeError, OverflowError, KeyError, AttributeError) as exc:
        raise TensorError(f"malformed message ({type(exc).__name__}: {str(exc)[:200]})") from None


def create_app(models: list[Any] | None = None, cfg: ServiceConfig | None = None) -> Starlette:
    """The service's ASGI app. Without `cfg`: default limits and no authentication (in-process tests)."""
    cfg = cfg or ServiceConfig(auth=AuthSettings(anonymous=True))
    limits = cfg.limits
    registry: dict[str, Any] = {m.name: m for m in (models if models is not None else [LungSegModel()])}
    inferring = 0   # inference requests in progress (event loop only)

    def lookup(request: Request) -> tuple[Any, JSONResponse | None]:
        name = request.path_params["model"]
        model = registry.get(name)
        if model is None:
            return None, _error(404, f"unknown model {name[:100]!r} (models: {', '.join(registry) or 'none'})")
        version = request.path_params.get("version")
        if version is not None and version != model.version:
            return None, _error(404, f"model '{name}' has no version {version[:100]!r} (has {model.version})")
        return model, None

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        return Response(status_code=200 if all(m.ready for m in registry.values()) else 503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": SERVER_NAME, "version": SERVER_VERSION,
                             "extensions": ["binary_tensor_data"]})

    async def model_metadata(request: Request) -> Response:
        model, err = lookup(request)
        return err or JSONResponse(model.metadata())

    async def model_ready(request: Request) -> Response:
        model, err = lookup(request)
        if err:
            return err
        return Response(status_code=200) if model.ready else _error(503, f"model '{model.name}' is not ready")

    def check_sizes(request: Request) -> str | None:
        """The JSON part's announced length (checked against limits.max_json_mb before reading)."""
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise _Refused(415, f"Content-Encoding {encoding[:40]!r} is not supported (send the body as it is)")
        header_length = request.headers.get(tensors.HEADER_LENGTH)
        json_length = header_length if header_length is not None else request.headers.get("content-length")
        if json_length is not None:
            if not (json_length.isascii() and json_length.strip().isdigit()):   # "²".isdigit() is true
                raise _Refused(400, f"{tensors.HEADER_LENGTH} must be a number")
            if int(json_length) > limits.max_json:
                raise _Refused(413, f"JSON part of {int(json_length)} bytes is larger than limits.max_json_mb "
                                    f"({limits.max_json_mb:g} MB); send tensors as binary data")
        return header_length

    async def infer(request: Request) -> Response:
        nonlocal inferring
        model, err = lookup(request)
        if err:
            return err
        if not model.ready:
            return _error(503, f"model '{model.name}' is not ready")
        if inferring >= limits.max_concurrent_infer:
            return JSONResponse({"error": f"busy: {inferring} inference requests in progress "
                                          f"(limits.max_concurrent_infer); try again"},
                                status_code=503, headers={"Retry-After": "5", "Connection": "close"})
        inferring += 1
        try:
            return await _infer(request, model)
        except _Refused as exc:
            return _error(exc.status, str(exc))
        except ClientDisconnect:
            return Response(status_code=400)   # nobody is listening
        finally:
            inferring -= 1

    async def _infer(request: Request, model: Any) -> Response:
        header_length = check_sizes(request)
        body = await _read_body(request)
        if header_length is None and len(body) > limits.max_json:
            raise _Refused(413, f"JSON body larger than limits.max_json_mb ({limits.max_json_mb:g} MB)")
        try:
            message, inputs = await run_in_threadpool(_decode, body, header_length)
            tensors.check_declared(model.name, model.metadata()["inputs"], inputs)
        except TensorError as exc:
            return _error(400, str(exc))
        declared = [t["name"] for t in model.metadata()["outputs"]]
        names, binary = _requested_outputs(message, declared, model.name)
        try:
            start = time.perf_counter()
            result = await run_in_threadpool(model.infer, inputs)
            model_ms = (time.perf_counter() - start) * 1000
        except ModelInputError as exc:
            return _error(400, str(exc))
        except Exception:
            log.exception("model %s failed", model.name)  # tensors are never logged
            return _error(500, f"model '{model.name}' failed; see the service log")
        # the model's own compute time lets a caller tell model from protocol and transfer cost
        header: dict[str, Any] = {"model_name": model.name, "model_version": model.version,
                                  "parameters": {"model_time_ms": round(model_ms, 1)}}
        if isinstance(message.get("id"), str):
            header["id"] = message["id"]
        parts, headers = await run_in_threadpool(
            tensors.encode_parts, header, "outputs", {n: result[n] for n in names}, binary)

        async def body_chunks():  # slices of the label volume as they are, not one joined copy
            for chunk in tensors.chunks(parts):
                yield chunk

        return StreamingResponse(body_chunks(), headers=headers)

    routes = [
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
    ]
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [
            Route(base, model_metadata),
            Route(base + "/ready", model_ready),
            Route(base + "/infer", infer, methods=["POST"]),
        ]

    def is_open(path: str) -> bool:
        return bool(OPEN_PATH.match(path))

    middleware = [
        Middleware(LimitsMiddleware, limits=limits, exempt=is_open, respond=_error),
        Middleware(AuthMiddleware, anonymous=cfg.auth.anonymous,
                   client_cert_required=bool(cfg.tls and cfg.tls.require_client_cert), issuers=cfg.auth.jwt,
                   open_path=is_open, realm="omi-ai-service", respond=_error),
    ]
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: limit_error_handler(_error)})


def serve(cfg: ServiceConfig, log_level: str = "warning") -> None:
    import uvicorn

    from omi_dsf.serving.limits import uvicorn_config

    app = create_app([LungSegModel(max_slices=cfg.max_slices)], cfg)
    ways = [w for w, on in (("mutual TLS", cfg.tls and cfg.tls.require_client_cert), ("bearer JWT", cfg.auth.jwt),
                            ("anonymous", cfg.auth.anonymous)) if on]
    log.info("reference AI service on %s/v2 (model %s %s; access: %s)", cfg.base_url(), lungseg.NAME,
             lungseg.VERSION, ", ".join(ways))
    uvicorn.Server(uvicorn_config(app, host=cfg.listen.host, port=cfg.listen.port, tls=cfg.tls, limits=cfg.limits,
                                  log_level=log_level)).run()
