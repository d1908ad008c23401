"""The reference lung model on Seldon MLServer (`mlserver` on PyPI): a custom inference runtime.

Runs in its own environment (tools/setup.sh makes `<venv>-mlserver` with mlserver, numpy and scipy;
nothing else of omi_dsf is imported). MLServer loads it from a model repository folder, one folder
per model with its model-settings.json (`servers.mlserver_repository` writes both files):

    settings.json                    {"host": "127.0.0.1", "http_port": 8080, "parallel_workers": 0, ...}
    lung-seg/model-settings.json     {"name": "lung-seg",
                                      "implementation": "omi_dsf.inference.mlserver_runtime.LungSegRuntime",
                                      "parameters": {"version": "1.0.0", "extra": {"max_slices": 600}},
                                      "inputs": [...], "outputs": [...]}
    mlserver start <folder>

MLServer's REST interface speaks Open Inference Protocol v2 with tensors as JSON only (no binary
tensor data extension); its model metadata carries "parameters", so this runtime puts there what
the infer step needs (modality, slice limits, label meaning), as the reference service does.

Over gRPC MLServer unpacks raw tensor bytes into Python lists before the runtime sees them (and packs
lists likewise on the way out): 52 M voxels cost seconds each way. BYTES elements pass through as they
are, so the runtime also takes each input *packed* (one BYTES element holding the raw bytes,
`tensors.packed`) and gives packed outputs when the request asks (`packed_outputs: true`); its
metadata says so (`packed_tensors: true`). Tensors sent as declared (INT16, ...) work as well.
"""

from __future__ import annotations

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import MLServerError
from mlserver.types import (InferenceRequest, InferenceResponse, MetadataModelResponse, Parameters, RequestInput,
                            ResponseOutput)

from omi_dsf.inference import lungseg, tensors
from omi_dsf.inference.lungseg import LungSegModel, ModelInputError


class LungSegRuntime(MLModel):
    """`LungSegModel` as an MLServer runtime; model-settings `parameters.extra.max_slices` sets its limit."""

    async def load(self) -> bool:
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        self.model = LungSegModel(max_slices=int(extra.get("max_slices", lungseg.DEFAULT_MAX_SLICES)))
        return True

    async def metadata(self) -> MetadataModelResponse:
        meta = await super().metadata()
        meta.parameters = Parameters(**self.model.metadata()["parameters"], packed_tensors=True)
        return meta

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        try:
            inputs = {i.name: _decode(i) for i in payload.inputs}
            tensors.check_declared(self.name, self.model.metadata()["inputs"], inputs)
            result = self.model.infer(inputs)
        except (tensors.TensorError, ModelInputError) as exc:
            raise MLServerError(str(exc), status_code=400) from None
        pack = _parameters(payload.parameters).get("packed_outputs") is True
        outputs = []
        for name, array in result.items():
            if pack:
                raw, params = tensors.packed(array)
                out = ResponseOutput(name=name, datatype="BYTES", shape=[1], data=[raw], parameters=Parameters(**params))
            else:
                out = NumpyCodec.encode_output(name, array)
                out.shape = list(array.shape)   # the codec makes a 1-D array a column (a batch of one each)
            outputs.append(out)
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id, outputs=outputs)


def _parameters(parameters: Parameters | None) -> dict:
    return parameters.model_dump() if parameters is not None else {}


def _decode(tensor: RequestInput):
    """An input as a numpy array: unpacked (a view of the BYTES element, no copy) or by MLServer's codec."""
    params = _parameters(tensor.parameters)
    if not tensors.is_packed(tensor.datatype, params):
        return NumpyCodec.decode_input(tensor)
    data = getattr(tensor.data, "root", tensor.data)
    if not isinstance(data, list) or len(data) != 1:
        raise tensors.TensorError(f"tensor '{tensor.name}': a packed tensor has one element")
    return tensors.unpacked(tensor.name, data[0], params)
