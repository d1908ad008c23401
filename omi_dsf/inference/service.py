"""The reference AI service: Open Inference Protocol v2 over HTTP (starlette + uvicorn).

It serves one model, "lung-seg" (see `lungseg.py`). Any other v2 server (Triton, KServe,
MLServer) can stand in for it as long as it offers a model with the same inputs and
outputs. Model metadata carries, besides the protocol's name/versions/platform/inputs/
outputs, a "parameters" object with what a caller must know before sending a study:
modality, body part, slice limits, label meaning, algorithm name and version.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from omi_dsf.inference import lungseg, tensors
from omi_dsf.inference.tensors import TensorError

log = logging.getLogger(__name__)
SERVER_NAME = "omi-dsf-reference-ai-service"
SERVER_VERSION = "0.1.0"
DEFAULT_MAX_SLICES = 600


class ModelInputError(ValueError):
    """The inputs are well-formed tensors but not something this model can work on."""


class Model(Protocol):
    name: str
    version: str
    ready: bool

    def metadata(self) -> dict: ...

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class LungSegModel:
    """Both lungs on an axial chest CT volume given in Hounsfield units."""

    name = lungseg.NAME
    version = lungseg.VERSION

    def __init__(self, max_slices: int = DEFAULT_MAX_SLICES, min_slices: int = 3):
        self.max_slices, self.min_slices = max_slices, min_slices
        self.ready = True

    def metadata(self) -> dict:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "python-numpy-scipy",
            "inputs": [
                {"name": "HU", "datatype": "INT16", "shape": [-1, -1, -1]},
                {"name": "SPACING_MM", "datatype": "FP32", "shape": [3]},
            ],
            "outputs": [
                {"name": "LUNG_LABELS", "datatype": "UINT8", "shape": [-1, -1, -1]},
                {"name": "LUNG_VOLUME_ML", "datatype": "FP32", "shape": [2]},
            ],
            "parameters": {
                "description": "lung segmentation by thresholding, connected components and morphology",
                "algorithm_name": self.name,
                "algorithm_version": self.version,
                "modality": "CT",
                "body_part": "CHEST",
                "orientation": "axial, image orientation 1\\0\\0\\0\\1\\0",
                "min_slices": self.min_slices,
                "max_slices": self.max_slices,
                "inputs": {"HU": "volume (slices, rows, cols) in Hounsfield units, cranial slice first",
                           "SPACING_MM": "voxel spacing (between slices, rows, cols) in mm"},
                "labels": {"0": "background", str(lungseg.RIGHT): "right lung", str(lungseg.LEFT): "left lung"},
                "outputs": {"LUNG_VOLUME_ML": "(right, left) lung volume in ml"},
            },
        }

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hu, spacing = inputs["HU"], inputs["SPACING_MM"]
        if not self.min_slices <= hu.shape[0] <= self.max_slices:
            raise ModelInputError(f"input 'HU' has {hu.shape[0]} slices; model '{self.name}' accepts "
                                  f"{self.min_slices} to {self.max_slices}")
        if hu.shape[1] < 16 or hu.shape[2] < 16:
            raise ModelInputError(f"input 'HU' slices of {hu.shape[1]}x{hu.shape[2]} are too small (min 16x16)")
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise ModelInputError(f"input 'SPACING_MM' must be three positive numbers, got {spacing.tolist()}")
        labels = lungseg.segment_lungs(hu)
        right, left = lungseg.volumes_ml(labels, tuple(float(s) for s in spacing))
        return {"LUNG_LABELS": labels, "LUNG_VOLUME_ML": np.array([right, left], np.float32)}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(models: list[Any] | None = None) -> Starlette:
    registry: dict[str, Any] = {m.name: m for m in (models if models is not None else [LungSegModel()])}

    def lookup(request: Request) -> tuple[Any, JSONResponse | None]:
        name = request.path_params["model"]
        model = registry.get(name)
        if model is None:
            return None, _error(404, f"unknown model '{name}' (models: {', '.join(registry) or 'none'})")
        version = request.path_params.get("version")
        if version is not None and version != model.version:
            return None, _error(404, f"model '{name}' has no version '{version}' (has {model.version})")
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

    async def infer(request: Request) -> Response:
        model, err = lookup(request)
        if err:
            return err
        if not model.ready:
            return _error(503, f"model '{model.name}' is not ready")
        body = await request.body()
        try:
            message, inputs = await run_in_threadpool(
                tensors.decode, body, request.headers.get(tensors.HEADER_LENGTH), "inputs")
            _check_inputs(model, inputs)
        except TensorError as exc:
            return _error(400, str(exc))
        requested = message.get("outputs") or []
        if not isinstance(requested, list):
            return _error(400, "'outputs' must be a list")
        declared = [t["name"] for t in model.metadata()["outputs"]]
        names = [o.get("name") for o in requested if isinstance(o, dict)] or declared
        unknown = [n for n in names if n not in declared]
        if unknown:
            return _error(400, f"model '{model.name}' has no output {unknown[0]!r} (outputs: {', '.join(declared)})")
        params = message.get("parameters") or {}
        binary = {n for n in declared if params.get("binary_data_output") is True}
        binary |= {o["name"] for o in requested
                   if isinstance(o, dict) and (o.get("parameters") or {}).get("binary_data")}
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
        if "id" in message:
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
    return Starlette(routes=routes)


def _check_inputs(model: Any, inputs: dict[str, np.ndarray]) -> None:
    declared = {t["name"]: t for t in model.metadata()["inputs"]}
    for name in inputs:
        if name not in declared:
            raise TensorError(f"model '{model.name}' has no input '{name}' (inputs: {', '.join(declared)})")
    for name, spec in declared.items():
        if name not in inputs:
            raise TensorError(f"model '{model.name}' needs input '{name}' ({spec['datatype']} {spec['shape']})")
        got = tensors.datatype_of(inputs[name])
        if got != spec["datatype"]:
            raise TensorError(f"input '{name}' is {got}, model '{model.name}' expects {spec['datatype']}")
        if not tensors.shape_matches(inputs[name].shape, spec["shape"]):
            raise TensorError(f"input '{name}' has shape {list(inputs[name].shape)}, model '{model.name}' "
                              f"expects {spec['shape']}")


def serve(host: str = "127.0.0.1", port: int = 8500, max_slices: int | None = None) -> None:
    import uvicorn

    app = create_app([LungSegModel(max_slices=max_slices or DEFAULT_MAX_SLICES)])
    log.info("reference AI service on http://%s:%d/v2 (model %s %s)", host, port, lungseg.NAME, lungseg.VERSION)
    uvicorn.run(app, host=host, port=port, log_level="warning")
