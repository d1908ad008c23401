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
"""

from __future__ import annotations

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, MetadataModelResponse, Parameters

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
        meta.parameters = Parameters(**self.model.metadata()["parameters"])
        return meta

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        try:
            tensors.check_declared(self.name, self.model.metadata()["inputs"], inputs)
            result = self.model.infer(inputs)
        except (tensors.TensorError, ModelInputError) as exc:
            raise MLServerError(str(exc), status_code=400) from None
        outputs = []
        for name, array in result.items():
            out = NumpyCodec.encode_output(name, array)
            out.shape = list(array.shape)   # the codec makes a 1-D array a column (a batch of one each)
            outputs.append(out)
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id, outputs=outputs)
