"""The reference lung model on KServe's Python model server (`kserve` on PyPI): a `kserve.Model`.

Runs in its own environment (tools/setup.sh makes `<venv>-kserve` with kserve, numpy and scipy;
nothing else of omi_dsf is imported), as a provider would build the predictor container of an
InferenceService:

    python -m omi_dsf.inference.kserve_model --http_port 8080 [--max_slices 600] [kserve's own options]

`python -m omi_dsf ai-service --server kserve` starts it so (omi_dsf/inference/servers.py). KServe
serves Open Inference Protocol v2 at /v2 with the binary tensor data extension (it does not list it
in its server metadata) and model metadata without "parameters": what the infer step needs beyond
inputs and outputs comes from the service's Device entry in the registry (docs/inference.md).
"""

from __future__ import annotations

import argparse
import uuid
from typing import Dict, Optional

import kserve
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InvalidInput

from omi_dsf.inference import lungseg, tensors
from omi_dsf.inference.lungseg import LungSegModel, ModelInputError


class LungSegKServe(kserve.Model):
    """`LungSegModel` as a KServe model: v2 inputs HU (INT16) and SPACING_MM (FP32), outputs
    LUNG_LABELS (UINT8) and LUNG_VOLUME_ML (FP32)."""

    def __init__(self, max_slices: int = lungseg.DEFAULT_MAX_SLICES):
        self.model = LungSegModel(max_slices=max_slices)
        super().__init__(self.model.name)
        self.ready = False

    def load(self) -> bool:
        self.ready = True   # no weights to load
        return self.ready

    def get_input_types(self) -> list[dict]:
        return self.model.metadata()["inputs"]

    def get_output_types(self) -> list[dict]:
        return self.model.metadata()["outputs"]

    def predict(self, payload: InferRequest, headers: Optional[Dict[str, str]] = None) -> InferResponse:
        inputs = {i.name: i.as_numpy() for i in payload.inputs}
        try:
            tensors.check_declared(self.name, self.get_input_types(), inputs)
            result = self.model.infer(inputs)
        except (tensors.TensorError, ModelInputError) as exc:
            raise InvalidInput(str(exc)) from None   # 400 with the message
        outputs = []
        for name, array in result.items():
            out = InferOutput(name=name, shape=list(array.shape), datatype=tensors.datatype_of(array))
            out.set_data_from_numpy(array, binary_data=True)   # to_rest() re-encodes as the request asked
            outputs.append(out)
        # the time in predict() is KServe's to report: Prometheus histogram request_predict_seconds at /metrics
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                             model_version=self.model.version, infer_outputs=outputs,
                             requested_outputs=payload.request_outputs,   # binary or JSON, as asked
                             use_binary_outputs=payload.use_binary_outputs)


def main() -> None:
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser], description=__doc__.splitlines()[0])
    parser.add_argument("--max_slices", type=int, default=lungseg.DEFAULT_MAX_SLICES)
    args, _ = parser.parse_known_args()
    model = LungSegKServe(max_slices=args.max_slices)
    model.load()
    kserve.ModelServer().start([model])


if __name__ == "__main__":
    main()
